//! Writing a model with its active adapter folded in as a plain Hugging Face checkpoint
//! (`model.safetensors` + `config.json` + the tokenizer files), which transformers loads as
//! `BertForTokenClassification` without peft.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{Device, Tensor};
use peft_core::fsio::{write_atomic, write_atomic_with};
use peft_core::{adapter_io, PeftError, Result, TunedParts};

use crate::resolve::ModelFiles;

/// Tokenizer files copied beside the merged weights when the base has them.
const TOKENIZER_FILES: [&str; 4] = [
    "tokenizer.json",
    "vocab.txt",
    "tokenizer_config.json",
    "special_tokens_map.json",
];

/// Every tensor of the model with the active adapter merged, by its transformers name: the
/// layers' merged weights, biases and tables, the other base tensors from the checkpoint, and
/// the trained heads. Merges the adapter (refused for methods without a merge).
pub fn merged_tensors(parts: &TunedParts, files: &ModelFiles) -> Result<BTreeMap<String, Tensor>> {
    parts.registry.merge()?;
    // SAFETY: read-only mapping of checkpoint files we do not modify.
    let base = unsafe { MmapedSafetensors::multi(&files.weights) }?;
    let mut current: BTreeMap<String, Tensor> = BTreeMap::new();
    for l in parts.registry.linears() {
        current.insert(format!("{}.weight", l.path()), l.weight());
        if let Some(b) = l.bias() {
            current.insert(format!("{}.bias", l.path()), b);
        }
    }
    for e in parts.registry.embeddings() {
        current.insert(format!("{}.weight", e.path()), e.table());
    }
    for c in parts.registry.convs() {
        current.insert(format!("{}.weight", c.path()), c.weight());
        if let Some(b) = c.bias() {
            current.insert(format!("{}.bias", c.path()), b);
        }
    }
    let mut out = BTreeMap::new();
    for (name, key) in &parts.base_tensors {
        let t = match current.get(name) {
            Some(t) => t.detach(),
            None => base
                .load(key, &Device::Cpu)
                .map_err(|e| PeftError::candle(format!("base tensor `{key}`"), e))?,
        };
        out.insert(name.clone(), t);
    }
    for (name, var) in adapter_io::base_trainables(parts)?.named_vars() {
        out.insert(name, var.as_tensor().clone());
    }
    Ok(out)
}

/// Writes the merged checkpoint of a token classifier with labels `id2label` to `out`, each
/// file atomically; returns the number of tensors.
pub fn write_merged_token_classifier(
    parts: &TunedParts,
    files: &ModelFiles,
    id2label: &BTreeMap<String, String>,
    out: &Path,
) -> Result<usize> {
    let tensors = merged_tensors(parts, files)?;
    std::fs::create_dir_all(out).map_err(|e| PeftError::io(out, e))?;
    write_atomic_with(&out.join("model.safetensors"), |tmp| {
        let meta = std::collections::HashMap::from([("format".to_string(), "pt".to_string())]);
        safetensors::serialize_to_file(
            tensors.iter().map(|(k, v)| (k.as_str(), v)),
            Some(meta),
            tmp,
        )
        .map_err(|e| PeftError::io(tmp, e))
    })?;
    let text =
        std::fs::read_to_string(&files.config).map_err(|e| PeftError::io(&files.config, e))?;
    let mut config: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| PeftError::io(&files.config, format!("invalid config: {e}")))?;
    let label2id: BTreeMap<&String, usize> = id2label
        .iter()
        .filter_map(|(id, label)| id.parse().ok().map(|i| (label, i)))
        .collect();
    config["architectures"] = serde_json::json!(["BertForTokenClassification"]);
    config["id2label"] = serde_json::json!(id2label);
    config["label2id"] = serde_json::json!(label2id);
    let config_text = serde_json::to_string_pretty(&config).unwrap_or_default();
    write_atomic(&out.join("config.json"), config_text.as_bytes())?;
    if let Some(base_dir) = files.config.parent() {
        for f in TOKENIZER_FILES {
            let src = base_dir.join(f);
            if src.is_file() {
                let bytes = std::fs::read(&src).map_err(|e| PeftError::io(&src, e))?;
                write_atomic(&out.join(f), &bytes)?;
            }
        }
    }
    Ok(tensors.len())
}
