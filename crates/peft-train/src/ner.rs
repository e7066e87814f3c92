//! Named-entity recognition end to end: reading CoNLL splits, encoding them for a model, and
//! saving and loading NER adapters with what inference needs (labels, tokenizer, settings).

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use peft_core::adapter_io::{self, AdapterMeta};
use peft_data::{read_conll, AlignOptions, Aligner, EncodedSplit, LabelSet, Sentence, TagScheme};
use peft_models::{bert_token_classifier, resolve_model, BertForTokenClassification, ModelFiles};

use crate::error::{Result, TrainError};

/// The task name stored in adapter metadata.
pub const TASK: &str = "token_classification";

/// A CoNLL split read from disk and encoded for the model.
pub struct Split {
    /// Where it came from.
    pub path: PathBuf,
    /// The sentences with gold tags.
    pub sentences: Vec<Sentence>,
    /// The encoded sentences.
    pub encoded: EncodedSplit,
}

impl Split {
    /// Gold word tags.
    pub fn gold(&self) -> Vec<Vec<String>> {
        self.sentences.iter().map(|s| s.tags.clone()).collect()
    }
}

/// Reads `path` and encodes it; every label must be in `labels` (named `split_name` in errors).
pub fn load_split(
    path: &Path,
    scheme: TagScheme,
    labels: &LabelSet,
    aligner: &Aligner,
    split_name: &str,
) -> Result<Split> {
    let sentences = read_conll(path, scheme)?;
    labels.check_split(&sentences, split_name)?;
    let encoded = aligner.encode_all(&sentences, labels)?;
    if encoded.truncated_words > 0 {
        tracing::warn!(
            "{}: {} words in {} sentences lie beyond max_length and are predicted as O",
            path.display(),
            encoded.truncated_words,
            encoded.truncated_sentences
        );
    }
    Ok(Split {
        path: path.to_path_buf(),
        sentences,
        encoded,
    })
}

/// The tokenizer of a resolved model, with the alignment options.
pub fn aligner_for(files: &ModelFiles, options: AlignOptions) -> Result<Aligner> {
    let path = files.tokenizer.as_ref().ok_or_else(|| {
        TrainError::config(
            "model",
            format!("model `{}` has no tokenizer.json", files.name),
        )
    })?;
    Ok(Aligner::from_file(path, options)?)
}

/// A model with a trained NER adapter, ready for inference.
pub struct NerModel {
    /// The model.
    pub model: BertForTokenClassification,
    /// Its labels.
    pub labels: LabelSet,
    /// Its tokenizer and alignment.
    pub aligner: Aligner,
    /// The adapter's metadata.
    pub meta: AdapterMeta,
    /// The base model's files.
    pub files: ModelFiles,
}

/// Settings stored with an NER adapter.
pub fn settings(
    options: &AlignOptions,
    scheme: TagScheme,
    data: &[(&str, &Path)],
) -> serde_json::Map<String, serde_json::Value> {
    let mut m = serde_json::Map::new();
    m.insert("max_length".into(), serde_json::json!(options.max_len));
    m.insert(
        "label_all_subtokens".into(),
        serde_json::json!(options.label_all_subtokens),
    );
    m.insert(
        "tag_scheme".into(),
        serde_json::to_value(scheme).unwrap_or_default(),
    );
    for (split, path) in data {
        m.insert(
            format!("data_{split}"),
            serde_json::json!(path.display().to_string()),
        );
    }
    m
}

/// Loads the base model named in the adapter (or `base` if given), checks the fingerprint, and
/// loads the adapter weights.
pub fn load_ner_adapter(dir: &Path, base: Option<&str>, device: &Device) -> Result<NerModel> {
    let (plan, file) = adapter_io::read_plan(dir)?;
    let meta = adapter_io::read_meta(dir)?.ok_or_else(|| {
        TrainError::config(
            "adapter",
            format!(
                "{}: no {} (labels and tokenizer unknown); was it made by peft-rs?",
                dir.display(),
                adapter_io::META_FILE
            ),
        )
    })?;
    if meta.task != TASK {
        return Err(TrainError::config(
            "adapter",
            format!("{}: task `{}` is not {TASK}", dir.display(), meta.task),
        ));
    }
    let base = base
        .map(str::to_string)
        .or(file.base_model_name_or_path)
        .ok_or_else(|| {
            TrainError::config(
                "adapter",
                "adapter_config.json names no base model; pass --base",
            )
        })?;
    let files = resolve_model(&base)?;
    let labels = LabelSet::from_id2label(&meta.id2label)?;
    let options: AlignOptions = AlignOptions {
        label_all_subtokens: meta
            .settings
            .get("label_all_subtokens")
            .and_then(|v| v.as_bool())
            .unwrap_or(false),
        max_len: meta
            .settings
            .get("max_length")
            .and_then(|v| v.as_u64())
            .map(|v| v as usize),
    };
    let aligner = aligner_for(&files, options)?;
    let model = bert_token_classifier(&files, plan, labels.len(), device, DType::F32)?;
    adapter_io::check_fingerprint(dir, &meta, &model.parts)?;
    adapter_io::load_weights(dir, &model.parts.params)?;
    Ok(NerModel {
        model,
        labels,
        aligner,
        meta,
        files,
    })
}
