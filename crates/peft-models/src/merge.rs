//! Writing a model with its active adapter folded in as a plain checkpoint: a Hugging Face
//! token classifier (`model.safetensors` + `config.json` + the tokenizer files) that
//! transformers loads as `BertForTokenClassification` without peft, or an image classifier in
//! torchvision's state-dict layout (BatchNorm statistics included) that `load_state_dict`
//! takes with `strict=True`.

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

/// Every tensor of the model with the active adapter merged, by its module name: the layers'
/// merged weights, biases and tables, the BatchNorms' affine and running statistics (with
/// `num_batches_tracked`, as torchvision keeps it), the other base tensors from `stored`
/// (a checkpoint key to its tensor), and the trained heads. Merges the adapter (refused for
/// methods without a merge).
pub fn merged_tensors(
    parts: &TunedParts,
    stored: &dyn Fn(&str) -> Result<Tensor>,
) -> Result<BTreeMap<String, Tensor>> {
    parts.registry.merge()?;
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
    for bn in parts.registry.batch_norms() {
        let (mean, var) = bn.running_stats();
        let path = bn.path();
        current.insert(format!("{path}.weight"), bn.weight().clone());
        current.insert(format!("{path}.bias"), bn.bias().clone());
        current.insert(format!("{path}.running_mean"), mean);
        current.insert(format!("{path}.running_var"), var);
        let tracked = i64::try_from(bn.tracked_batches()).unwrap_or(i64::MAX);
        out.insert(
            format!("{path}.num_batches_tracked"),
            Tensor::new(tracked, &Device::Cpu)?,
        );
    }
    for (name, key) in &parts.base_tensors {
        let t = match current.get(name) {
            Some(t) => t.detach(),
            None => stored(key)?,
        };
        out.insert(name.clone(), t);
    }
    for (name, var) in adapter_io::base_trainables(parts)?.named_vars() {
        out.insert(name, var.as_tensor().clone());
    }
    Ok(out)
}

/// `tensors` as `model.safetensors` in `out` (created), written atomically.
fn write_weights(tensors: &BTreeMap<String, Tensor>, out: &Path) -> Result<()> {
    std::fs::create_dir_all(out).map_err(|e| PeftError::io(out, e))?;
    write_atomic_with(&out.join("model.safetensors"), |tmp| {
        let meta = std::collections::HashMap::from([("format".to_string(), "pt".to_string())]);
        safetensors::serialize_to_file(
            tensors.iter().map(|(k, v)| (k.as_str(), v)),
            Some(meta),
            tmp,
        )
        .map_err(|e| PeftError::io(tmp, e))
    })
}

/// Writes the merged checkpoint of a token classifier with labels `id2label` to `out`, each
/// file atomically; returns the number of tensors.
pub fn write_merged_token_classifier(
    parts: &TunedParts,
    files: &ModelFiles,
    id2label: &BTreeMap<String, String>,
    out: &Path,
) -> Result<usize> {
    // SAFETY: read-only mapping of checkpoint files we do not modify.
    let base = unsafe { MmapedSafetensors::multi(&files.weights) }?;
    let stored = |key: &str| {
        base.load(key, &Device::Cpu)
            .map_err(|e| PeftError::candle(format!("base tensor `{key}`"), e))
    };
    let tensors = merged_tensors(parts, &stored)?;
    write_weights(&tensors, out)?;
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

/// Writes the merged checkpoint of an image classifier of torchvision architecture
/// `architecture` with labels `id2label` to `out`: `model.safetensors` (torchvision's state-dict
/// keys) and a `config.json` naming the architecture and classes, each file atomically; returns
/// the number of tensors. `stored` gives base tensors by checkpoint key.
pub fn write_merged_image_classifier(
    parts: &TunedParts,
    stored: &dyn Fn(&str) -> Result<Tensor>,
    architecture: &str,
    id2label: &BTreeMap<String, String>,
    out: &Path,
) -> Result<usize> {
    let tensors = merged_tensors(parts, stored)?;
    write_weights(&tensors, out)?;
    let config = serde_json::json!({
        "architecture": architecture,
        "format": "torchvision state_dict (load_state_dict(strict=True))",
        "num_labels": id2label.len(),
        "id2label": id2label,
    });
    let text = serde_json::to_string_pretty(&config).unwrap_or_default();
    write_atomic(&out.join("config.json"), text.as_bytes())?;
    Ok(tensors.len())
}
