//! The error type of this crate.
//!
//! Every message names what was being done (the file, the configuration key, the parameter or
//! optimizer-state entry) and what was expected.

use std::path::PathBuf;

/// Errors raised by optimizers, schedules, metrics, logs and checkpoint writes.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// An error from peft-core (model building, adapter files, atomic writes).
    #[error(transparent)]
    Core(Box<peft_core::PeftError>),
    /// An error in the data (file, line and what was expected).
    #[error(transparent)]
    Data(Box<peft_data::DataError>),
    /// A model that cannot be found.
    #[error(transparent)]
    Resolve(Box<peft_models::ResolveError>),
    /// An error from candle, with the context in which it happened.
    #[error("{context}: {source}")]
    Candle {
        /// What was being done, e.g. the parameter name.
        context: String,
        /// The underlying candle error.
        #[source]
        source: candle_core::Error,
    },
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A line of a JSON-lines metrics log is not a valid record.
    #[error("{path}:{line}: invalid metrics record: {source}")]
    Json {
        /// The log file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// The underlying parse error.
        #[source]
        source: serde_json::Error,
    },
    /// A configuration value is invalid.
    #[error("invalid configuration `{key}`: {message}")]
    Config {
        /// The offending key, e.g. `optimizer.beta1`.
        key: String,
        /// What was expected.
        message: String,
    },
    /// Optimizer state does not fit the parameters it is loaded into.
    #[error("optimizer state `{key}`: {message}")]
    OptimizerState {
        /// The state entry (or parameter name) at fault.
        key: String,
        /// What does not fit.
        message: String,
    },
    /// Gold and predicted label sequences do not have the same shape.
    #[error("label shape mismatch: {message}")]
    LabelShape {
        /// Which sentence differs and how.
        message: String,
    },
}

impl From<peft_core::PeftError> for TrainError {
    fn from(e: peft_core::PeftError) -> Self {
        Self::Core(Box::new(e))
    }
}

impl From<peft_data::DataError> for TrainError {
    fn from(e: peft_data::DataError) -> Self {
        Self::Data(Box::new(e))
    }
}

impl From<peft_models::ResolveError> for TrainError {
    fn from(e: peft_models::ResolveError) -> Self {
        Self::Resolve(Box::new(e))
    }
}

/// Shorthand for results of this crate.
pub type Result<T> = std::result::Result<T, TrainError>;

impl TrainError {
    /// Wraps a candle error with a short description of what was being done.
    pub fn candle(context: impl Into<String>, source: candle_core::Error) -> Self {
        Self::Candle {
            context: context.into(),
            source,
        }
    }

    /// Wraps an I/O error with the file it concerns.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }

    /// An invalid configuration value.
    pub fn config(key: impl Into<String>, message: impl Into<String>) -> Self {
        Self::Config {
            key: key.into(),
            message: message.into(),
        }
    }
}

/// Adds a context string to candle results.
pub(crate) trait CandleContext<T> {
    /// Converts a candle error into [`TrainError::Candle`] with the given context.
    fn ctx(self, context: impl FnOnce() -> String) -> Result<T>;
}

impl<T> CandleContext<T> for candle_core::Result<T> {
    fn ctx(self, context: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|e| TrainError::candle(context(), e))
    }
}
