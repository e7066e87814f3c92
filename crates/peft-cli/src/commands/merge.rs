//! `peft-rs merge`: fold the adapter into the base weights and write a plain Hugging Face
//! `BertForTokenClassification` checkpoint that transformers loads without peft.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result};
use candle_core::safetensors::MmapedSafetensors;
use candle_core::{Device, Tensor};
use peft_core::fsio::{write_atomic, write_atomic_with};
use peft_train::ner::{load_ner_adapter, NerModel};

/// Tokenizer files copied beside the merged weights when the base has them.
const TOKENIZER_FILES: [&str; 4] = [
    "tokenizer.json",
    "vocab.txt",
    "tokenizer_config.json",
    "special_tokens_map.json",
];

/// Every tensor of the merged model by its transformers name.
pub fn merged_tensors(ner: &NerModel) -> Result<BTreeMap<String, Tensor>> {
    let parts = &ner.model.parts;
    parts.registry.merge_all()?;
    // SAFETY: read-only mapping of checkpoint files we do not modify.
    let base = unsafe { MmapedSafetensors::multi(&ner.files.weights) }?;
    // The layers' current (merged) weights, biases and tables, by tensor name.
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
    let mut out = BTreeMap::new();
    for (name, key) in &parts.base_tensors {
        let t = match current.get(name) {
            Some(t) => t.detach(),
            None => base
                .load(key, &Device::Cpu)
                .with_context(|| format!("base tensor `{key}`"))?,
        };
        out.insert(name.clone(), t);
    }
    for (name, var) in peft_core::adapter_io::base_trainables(parts)?.named_vars() {
        out.insert(name, var.as_tensor().clone());
    }
    Ok(out)
}

pub fn run(adapter: &Path, out: &Path, base: Option<&str>) -> Result<()> {
    let ner = load_ner_adapter(adapter, base, &Device::Cpu)?;
    let tensors = merged_tensors(&ner)?;
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let weights = out.join("model.safetensors");
    write_atomic_with(&weights, |tmp| {
        let meta = std::collections::HashMap::from([("format".to_string(), "pt".to_string())]);
        safetensors::serialize_to_file(
            tensors.iter().map(|(k, v)| (k.as_str(), v)),
            Some(meta),
            tmp,
        )
        .map_err(|e| peft_core::PeftError::io(tmp, e))
    })?;
    let config_text = std::fs::read_to_string(&ner.files.config)?;
    let mut config: serde_json::Value = serde_json::from_str(&config_text)?;
    let label2id: BTreeMap<String, usize> = ner.labels.to_label2id();
    config["architectures"] = serde_json::json!(["BertForTokenClassification"]);
    config["id2label"] = serde_json::json!(ner.labels.to_id2label());
    config["label2id"] = serde_json::json!(label2id);
    write_atomic(
        &out.join("config.json"),
        serde_json::to_string_pretty(&config)?.as_bytes(),
    )?;
    let base_dir = ner
        .files
        .config
        .parent()
        .context("config.json has no folder")?;
    for f in TOKENIZER_FILES {
        let src = base_dir.join(f);
        if src.is_file() {
            write_atomic(&out.join(f), &std::fs::read(&src)?)?;
        }
    }
    println!(
        "merged {} adapted layers into {} ({} tensors)",
        ner.model.parts.registry.adapted_paths().len(),
        out.display(),
        tensors.len()
    );
    Ok(())
}
