//! The error type of this crate.
//!
//! Every message names where the problem is (file and line, split, or option) and what was
//! expected, so that a user can fix their data without reading the source.

use std::path::Path;

/// Errors raised while reading datasets, aligning labels and batching.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file as the caller named it.
        path: String,
        /// The underlying I/O error.
        #[source]
        source: std::io::Error,
    },

    /// A file is not valid UTF-8.
    #[error("{path}:{line}: invalid UTF-8 (expected a UTF-8 text file)")]
    Utf8 {
        /// The file as the caller named it.
        path: String,
        /// 1-based line holding the first invalid byte.
        line: usize,
    },

    /// A CoNLL line has too few columns.
    #[error(
        "{path}:{line}: expected at least 2 whitespace-separated columns (token ... tag), found {found}"
    )]
    Columns {
        /// The file as the caller named it.
        path: String,
        /// 1-based line number.
        line: usize,
        /// Number of columns found on that line.
        found: usize,
    },

    /// A tag is not `O`, `B-<type>` or `I-<type>`.
    #[error(
        "{path}:{line}: invalid tag `{tag}`: expected `O`, `B-<type>` or `I-<type>` (IOB1/IOB2)"
    )]
    InvalidTag {
        /// The file as the caller named it.
        path: String,
        /// 1-based line number.
        line: usize,
        /// The offending tag.
        tag: String,
    },

    /// A file declared IOB2 has an `I-X` tag that does not continue an entity of type X.
    #[error(
        "{path}:{line}: tag `{tag}` does not continue an entity (previous tag: {previous}), which \
         IOB2 forbids; read the file as IOB1 or Auto to convert it"
    )]
    NotIob2 {
        /// The file as the caller named it.
        path: String,
        /// 1-based line number.
        line: usize,
        /// The offending `I-X` tag.
        tag: String,
        /// The tag before it, or `start of sentence`.
        previous: String,
    },

    /// A dataset split holds no sentences.
    #[error("empty dataset: {path} holds no sentences")]
    EmptyDataset {
        /// The file or split name.
        path: String,
    },

    /// An evaluation split uses a label the training split never saw.
    #[error(
        "{split}: label `{label}` (first at line {line}) does not occur in the training split; \
         known labels: {known}"
    )]
    LabelAbsentFromTrain {
        /// The split's name (usually its file).
        split: String,
        /// The unknown label.
        label: String,
        /// 1-based line of its first occurrence.
        line: usize,
        /// The known labels, comma-separated.
        known: String,
    },

    /// A sentence carries a label that is not in the label set.
    #[error("line {line}: label `{label}` is not in the label set; known labels: {known}")]
    UnknownLabel {
        /// The unknown label.
        label: String,
        /// 1-based line of the word carrying it.
        line: usize,
        /// The known labels, comma-separated.
        known: String,
    },

    /// A predicted or requested label id is outside the label set.
    #[error("label id {id} is out of range: the label set has {len} labels")]
    LabelIdOutOfRange {
        /// The offending id.
        id: usize,
        /// Number of labels in the set.
        len: usize,
    },

    /// An `id2label` map (as in a transformers `config.json`) is malformed.
    #[error("invalid id2label: {reason}")]
    Id2Label {
        /// What is wrong with it.
        reason: String,
    },

    /// The tokenizer failed.
    #[error("tokenizer: {context}: {message}")]
    Tokenizer {
        /// What was being done (e.g. `encoding the sentence at line 12`).
        context: String,
        /// The tokenizer's own message.
        message: String,
    },

    /// An image file cannot be decoded: unknown format, corrupt or truncated data.
    #[error("cannot decode image {path}: {reason}")]
    Image {
        /// The image file.
        path: String,
        /// The decoder's reason.
        reason: String,
    },

    /// An image has a pixel format other than 8-bit gray, gray+alpha, RGB or RGBA.
    #[error(
        "{path}: unsupported pixel format {found} (expected 8-bit gray, gray+alpha, RGB or RGBA)"
    )]
    ImageFormat {
        /// The image file.
        path: String,
        /// The format found (e.g. `Rgb16`).
        found: String,
    },

    /// An IDX (MNIST-style) file is malformed or disagrees with its companion file.
    #[error("{path}: invalid IDX file: {reason}")]
    Idx {
        /// The IDX file.
        path: String,
        /// What is wrong with it.
        reason: String,
    },

    /// A class folder of an image folder dataset holds no image files.
    #[error("class folder {path} holds no image files (expected .png, .jpg, .jpeg or .bmp)")]
    EmptyClassFolder {
        /// The class folder.
        path: String,
    },

    /// An image folder dataset does not have the expected layout.
    #[error("image folder {path}: {reason}")]
    ImageFolder {
        /// The folder.
        path: String,
        /// What is wrong with it and what was expected.
        reason: String,
    },

    /// A CSV file of image paths and labels is malformed.
    #[error("{path}:{line}: {reason}")]
    Csv {
        /// The CSV file.
        path: String,
        /// 1-based line number (1 = header).
        line: usize,
        /// What is wrong with the line.
        reason: String,
    },

    /// The background batch loader failed (a worker stopped unexpectedly).
    #[error("image loader: {reason}")]
    Loader {
        /// What happened.
        reason: String,
    },

    /// An option or argument is out of its valid range.
    #[error("invalid {name}: {reason}")]
    InvalidArgument {
        /// The option or argument name.
        name: &'static str,
        /// What was expected.
        reason: String,
    },
}

/// Result alias for this crate.
pub type Result<T, E = DataError> = std::result::Result<T, E>;

impl DataError {
    /// Builds an [`DataError::Io`] naming `path`.
    pub fn io(path: &Path, source: std::io::Error) -> Self {
        DataError::Io {
            path: path.display().to_string(),
            source,
        }
    }

    /// Builds a [`DataError::Tokenizer`] from a tokenizers error.
    pub(crate) fn tokenizer(context: impl Into<String>, err: impl std::fmt::Display) -> Self {
        DataError::Tokenizer {
            context: context.into(),
            message: err.to_string(),
        }
    }

    /// Builds a [`DataError::InvalidArgument`].
    pub(crate) fn arg(name: &'static str, reason: impl Into<String>) -> Self {
        DataError::InvalidArgument {
            name,
            reason: reason.into(),
        }
    }
}
