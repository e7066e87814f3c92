//! peft-core
