//! Errors of the core crate: each names the module path, tensor, file or key at fault.

use std::path::PathBuf;

/// Everything that can go wrong while building, tuning, saving or loading a model.
#[derive(Debug, thiserror::Error)]
pub enum PeftError {
    /// An error from candle, with the context in which it happened.
    #[error("{context}: {source}")]
    Candle {
        /// What was being done, e.g. the tensor name.
        context: String,
        /// The underlying candle error.
        #[source]
        source: candle_core::Error,
    },
    /// A tensor the model needs is absent from the checkpoint.
    #[error("checkpoint {files} has no tensor `{name}` (needed by the model as `{path}`)")]
    MissingTensor {
        /// The files searched.
        files: String,
        /// The name looked up.
        name: String,
        /// The model path that asked for it.
        path: String,
    },
    /// A tensor has the wrong shape for the model.
    #[error("tensor `{name}` in {file} has shape {found:?}, but the model expects {expected:?}")]
    ShapeMismatch {
        /// The tensor name.
        name: String,
        /// The file it came from.
        file: String,
        /// The shape the model needs.
        expected: Vec<usize>,
        /// The shape found.
        found: Vec<usize>,
    },
    /// A configuration value is invalid.
    #[error("invalid configuration `{key}`: {message}")]
    Config {
        /// The offending key.
        key: String,
        /// What was expected.
        message: String,
    },
    /// A file could not be read or written.
    #[error("{path}: {message}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// An adapter file does not fit the model it is loaded into.
    #[error("adapter {path}: {message}")]
    AdapterMismatch {
        /// The adapter folder or file.
        path: PathBuf,
        /// What does not fit.
        message: String,
    },
}

impl PeftError {
    /// Wraps a candle error with context.
    pub fn candle(context: impl Into<String>, source: candle_core::Error) -> Self {
        Self::Candle {
            context: context.into(),
            source,
        }
    }

    /// An I/O-style error for a path.
    pub fn io(path: impl Into<PathBuf>, message: impl std::fmt::Display) -> Self {
        Self::Io {
            path: path.into(),
            message: message.to_string(),
        }
    }
}

impl From<candle_core::Error> for PeftError {
    fn from(source: candle_core::Error) -> Self {
        Self::Candle {
            context: "tensor operation".into(),
            source,
        }
    }
}

/// Result alias of the core crate.
pub type Result<T> = std::result::Result<T, PeftError>;
