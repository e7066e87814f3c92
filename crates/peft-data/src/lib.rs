//! peft-data
