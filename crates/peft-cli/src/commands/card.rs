//! The model card written into every adapter folder `train` produces.

use std::path::Path;

use anyhow::Result;
use peft_train::metrics::EntityScores;
use peft_train::TrainSummary;

/// What the card reports.
pub struct CardFacts<'a> {
    pub recipe: &'a Path,
    pub overrides: &'a [String],
    pub base_model: &'a str,
    pub data: &'a [(&'a str, &'a Path)],
    pub trainable: usize,
    pub adapter_bytes: u64,
    pub summary: &'a TrainSummary,
    pub test: Option<&'a EntityScores>,
    pub labels: &'a [String],
}

/// Writes `README.md` into the adapter folder (atomically).
pub fn write(dir: &Path, f: &CardFacts) -> Result<()> {
    let mut s = String::new();
    s.push_str(&format!(
        "# {}\n\n",
        dir.file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_default()
    ));
    s.push_str(&format!(
        "A LoRA adapter for token classification (NER) on `{}`, trained by peft-rs from `{}`{}.\n\n",
        f.base_model,
        f.recipe.display(),
        if f.overrides.is_empty() { String::new() } else { format!(" with `{}`", f.overrides.join(" ")) }
    ));
    s.push_str(&format!("Labels: {}\n\n", f.labels.join(", ")));
    s.push_str("| | |\n| --- | --- |\n");
    for (split, path) in f.data {
        s.push_str(&format!("| {split} data | `{}` |\n", path.display()));
    }
    s.push_str(&format!("| trainable parameters | {} |\n", f.trainable));
    s.push_str(&format!("| adapter files | {} bytes |\n", f.adapter_bytes));
    if let Some(best) = &f.summary.best {
        s.push_str(&format!(
            "| best validation entity F1 | {:.4} (epoch {}) |\n",
            best.score, f.summary.best_epoch
        ));
    }
    if let Some(t) = f.test {
        let o = &t.overall;
        s.push_str(&format!(
            "| test entity micro F1 | {:.4} (P {:.4}, R {:.4}) |\n",
            o.f1, o.precision, o.recall
        ));
        for (kind, k) in &t.per_type {
            s.push_str(&format!("| test F1 {kind} | {:.4} |\n", k.f1));
        }
    }
    s.push_str(&format!(
        "| training | {} epochs, {} steps, {:.0} s wall ({:.0} tokens/s) |\n\n",
        f.summary.epochs_run, f.summary.steps, f.summary.train_seconds, f.summary.tokens_per_second
    ));
    s.push_str("Files: `adapter_config.json` and `adapter_model.safetensors` in Hugging Face peft's format ");
    s.push_str("(`PeftModel.from_pretrained(BertForTokenClassification.from_pretrained(base, num_labels=...), dir)`), ");
    s.push_str("and `peft_rs.json` with the labels, tokenizer and base-model fingerprint.\n\n");
    s.push_str(&format!(
        "Use: `peft-rs predict --adapter {} \"Angela Merkel visited Paris .\"`\n",
        dir.display()
    ));
    peft_core::fsio::write_atomic(&dir.join("README.md"), s.as_bytes())?;
    Ok(())
}
