//! peft-models: model definitions with Hugging Face module paths, written against
//! [`peft_core::ModelBuilder`] so that adapters are injected at construction.

pub mod bert;
pub mod resolve;

pub use bert::{BertConfig, BertForTokenClassification, BertModel};
pub use resolve::{resolve_model, ModelFiles, ResolveError};
pub mod load;
pub mod merge;

pub use load::{bert_token_classifier, read_bert_config};
pub use merge::{merged_tensors, write_merged_token_classifier};
