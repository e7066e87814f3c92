//! `peft-rs merge`: fold the adapter into the base weights and write a plain Hugging Face
//! `BertForTokenClassification` checkpoint that transformers loads without peft.

use std::path::Path;

use anyhow::{Context, Result};
use candle_core::Device;
use peft_train::ner::load_ner_adapter;

pub fn run(adapter: &Path, out: &Path, base: Option<&str>) -> Result<()> {
    let ner = load_ner_adapter(adapter, base, &Device::Cpu)?;
    let n = peft_models::write_merged_token_classifier(
        &ner.model.parts,
        &ner.files,
        &ner.labels.to_id2label(),
        out,
    )
    .with_context(|| format!("merging {} into {}", adapter.display(), out.display()))?;
    println!(
        "merged {} adapted layers into {} ({n} tensors)",
        ner.model.parts.registry.adapted_paths().len(),
        out.display(),
    );
    Ok(())
}
