//! peft-train
