//! peft-models
