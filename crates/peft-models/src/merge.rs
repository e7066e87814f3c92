//! Writing a model with its active adapter folded in as a plain checkpoint, without peft:
//! - a Hugging Face token classifier (`model.safetensors` + `config.json` + the tokenizer files)
//!   that transformers loads as `BertForTokenClassification`;
//! - a Hugging Face ViT or DINOv2 image classifier (`model.safetensors` under the transformers 4
//!   key names that Hub checkpoints and `save_pretrained` use, `config.json`, and a
//!   `preprocessor_config.json`: the adapter's preprocessing, or the base's) that transformers 4
//!   and 5 load as `ViTForImageClassification` / `Dinov2ForImageClassification` (also for a
//!   DINOv2 read from an ONNX graph, with a `config.json` made from the graph);
//! - a torchvision CNN in torchvision's state-dict layout (BatchNorm statistics included) that
//!   `load_state_dict` takes with `strict=True`.
//!
//! Every file is written atomically; methods without a merge (prompt and prefix tuning,
//! bottleneck adapters) are refused before anything is written.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor};
use peft_core::fsio::{write_atomic, write_atomic_with};
use peft_core::{adapter_io, PeftError, Result, TunedParts, WeightSource};
use serde_json::Value;

use crate::dinov2::{dinov2_weights, legacy_dinov2_key};
use crate::resolve::ModelFiles;
use crate::vit::{legacy_vit_key, vit_weights};

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
    let mut config = read_config(&files.config)?;
    set_labels(&mut config, "BertForTokenClassification", id2label);
    let beside = read_beside(&files.config, &TOKENIZER_FILES)?;
    write_weights(&tensors, out)?;
    write_config_and_copies(&config, &beside, out)?;
    Ok(tensors.len())
}

/// The base's `config.json`, a JSON object; errors name the file.
fn read_config(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).map_err(|e| PeftError::io(path, e))?;
    match serde_json::from_str(&text) {
        Ok(v @ Value::Object(_)) => Ok(v),
        Ok(_) => Err(PeftError::io(path, "invalid config: not a JSON object")),
        Err(e) => Err(PeftError::io(path, format!("invalid config: {e}"))),
    }
}

/// Sets a classifier's `architectures`, `id2label`, `label2id` and `num_labels` in `config`.
fn set_labels(config: &mut Value, architecture: &str, id2label: &BTreeMap<String, String>) {
    let label2id: BTreeMap<&String, usize> = id2label
        .iter()
        .filter_map(|(id, label)| id.parse().ok().map(|i| (label, i)))
        .collect();
    config["architectures"] = serde_json::json!([architecture]);
    config["id2label"] = serde_json::json!(id2label);
    config["label2id"] = serde_json::json!(label2id);
    config["num_labels"] = serde_json::json!(id2label.len());
}

/// The files among `names` that sit beside `config` (read now, so that nothing is written when
/// one cannot be read).
fn read_beside(config: &Path, names: &[&str]) -> Result<Vec<(String, Vec<u8>)>> {
    let Some(dir) = config.parent() else {
        return Ok(Vec::new());
    };
    let mut out = Vec::new();
    for name in names {
        let src = dir.join(name);
        if src.is_file() {
            let bytes = std::fs::read(&src).map_err(|e| PeftError::io(&src, e))?;
            out.push((name.to_string(), bytes));
        }
    }
    Ok(out)
}

/// Writes `config.json` and the copied files to `out`, each atomically.
fn write_config_and_copies(config: &Value, copies: &[(String, Vec<u8>)], out: &Path) -> Result<()> {
    let text = serde_json::to_string_pretty(config).unwrap_or_default();
    write_atomic(&out.join("config.json"), text.as_bytes())?;
    for (name, bytes) in copies {
        write_atomic(&out.join(name), bytes)?;
    }
    Ok(())
}

/// Where a Hugging Face image classifier's tensors go: its transformers class, how its base
/// checkpoint loads under module names, and a module name's key in a checkpoint.
struct HfImageLayout {
    architecture: &'static str,
    weights: fn(&[PathBuf]) -> Result<WeightSource>,
    checkpoint_key: fn(&str) -> String,
}

/// The layout of the model whose config (at `path`) says `model_type`.
fn hf_image_layout(config: &Value, path: &Path) -> Result<HfImageLayout> {
    match config.get("model_type").and_then(Value::as_str) {
        Some("vit") => Ok(HfImageLayout {
            architecture: "ViTForImageClassification",
            weights: vit_weights,
            checkpoint_key: legacy_vit_key,
        }),
        Some("dinov2") => Ok(HfImageLayout {
            architecture: "Dinov2ForImageClassification",
            weights: dinov2_weights,
            checkpoint_key: legacy_dinov2_key,
        }),
        other => Err(PeftError::Config {
            key: "model_type".into(),
            message: format!(
                "{}: merging writes ViT and DINOv2 image classifiers (model_type vit, dinov2), \
                 not {}",
                path.display(),
                other.map_or("a config without one".into(), |t| format!("`{t}`"))
            ),
        }),
    }
}

/// Writes the merged checkpoint of a Hugging Face ViT or DINOv2 image classifier (base files
/// `files`) with labels `id2label` to `out`: `model.safetensors` in f32 under the transformers 4
/// key names (`vit.encoder.layer.<i>.attention.attention.query.weight`, ...) that transformers 4
/// and 5 both load, the base `config.json` naming `ViTForImageClassification` /
/// `Dinov2ForImageClassification` and the classes, and `preprocessor`
/// (`ImageConfig::hf_image_processor` of the preprocessing the adapter was trained with) as
/// `preprocessor_config.json`, or without it the base's when it has one; each file atomically.
/// Returns the number of tensors.
pub fn write_merged_hf_image_classifier(
    parts: &TunedParts,
    files: &ModelFiles,
    id2label: &BTreeMap<String, String>,
    preprocessor: Option<&Value>,
    out: &Path,
) -> Result<usize> {
    let config = read_config(&files.config)?;
    let layout = hf_image_layout(&config, &files.config)?;
    let base = (layout.weights)(&files.weights)?;
    let beside = match preprocessor {
        Some(p) => vec![preprocessor_file(p)],
        None => read_beside(&files.config, &[PREPROCESSOR])?,
    };
    write_hf_image_classifier(parts, &base, &layout, config, &beside, id2label, out)
}

/// Writes the merged checkpoint of a DINOv2 image classifier whose base is the backbone of the
/// ONNX graph at `graph` ([`crate::onnx`]): the same Hugging Face `Dinov2ForImageClassification`
/// folder as [`write_merged_hf_image_classifier`], with a `config.json` made from the
/// configuration the graph implies (and `preprocessor` as `preprocessor_config.json` if given:
/// the graph has none).
pub fn write_merged_onnx_dinov2_classifier(
    parts: &TunedParts,
    graph: &Path,
    id2label: &BTreeMap<String, String>,
    preprocessor: Option<&Value>,
    out: &Path,
) -> Result<usize> {
    let backbone = crate::onnx::read_onnx_dinov2(graph)?;
    let config = backbone.config.to_json();
    let layout = hf_image_layout(&config, graph)?;
    let base = WeightSource::Map(backbone.weights);
    let beside: Vec<_> = preprocessor.map(preprocessor_file).into_iter().collect();
    write_hf_image_classifier(parts, &base, &layout, config, &beside, id2label, out)
}

const PREPROCESSOR: &str = "preprocessor_config.json";

/// `preprocessor` as the `preprocessor_config.json` file to write.
fn preprocessor_file(preprocessor: &Value) -> (String, Vec<u8>) {
    let text = serde_json::to_string_pretty(preprocessor).unwrap_or_default();
    (PREPROCESSOR.to_string(), text.into_bytes())
}

/// The merged tensors under the layout's checkpoint keys in f32, `config` naming the
/// architecture and the classes, and the `beside` copies, each written atomically.
fn write_hf_image_classifier(
    parts: &TunedParts,
    base: &WeightSource,
    layout: &HfImageLayout,
    mut config: Value,
    beside: &[(String, Vec<u8>)],
    id2label: &BTreeMap<String, String>,
    out: &Path,
) -> Result<usize> {
    let stored = |key: &str| base.load_stored(key);
    let mut tensors = BTreeMap::new();
    for (name, t) in merged_tensors(parts, &stored)? {
        let key = (layout.checkpoint_key)(&name);
        let t = if t.dtype().is_float() {
            t.to_dtype(DType::F32)?
        } else {
            t
        };
        if tensors.insert(key.clone(), t).is_some() {
            return Err(PeftError::Config {
                key,
                message: "two tensors of the merged model map to this checkpoint key".into(),
            });
        }
    }
    set_labels(&mut config, layout.architecture, id2label);
    for key in ["torch_dtype", "dtype"] {
        if config.get(key).is_some_and(|v| !v.is_null()) {
            config[key] = Value::from("float32");
        }
    }
    write_weights(&tensors, out)?;
    write_config_and_copies(&config, beside, out)?;
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
