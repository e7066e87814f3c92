//! `peft-rs eval`: entity-level precision, recall and F1 of an adapter on a split.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use candle_core::Device;
use peft_data::{Collator, TagScheme};
use peft_train::ner::{load_ner_adapter, load_split};
use peft_train::tasks::token_classification::evaluate_tags;

pub fn run(
    adapter: &Path,
    split: &str,
    data: Option<&Path>,
    base: Option<&str>,
    json: bool,
) -> Result<()> {
    if super::is_image_adapter(adapter)? {
        return super::eval_image::eval(adapter, split, data, json);
    }
    let ner = load_ner_adapter(adapter, base, &Device::Cpu)?;
    let path = match data {
        Some(p) => p.to_path_buf(),
        None => ner
            .meta
            .settings
            .get(&format!("data_{split}"))
            .and_then(|v| v.as_str())
            .map(PathBuf::from)
            .with_context(|| format!("the adapter stores no `{split}` split; pass --data FILE"))?,
    };
    let scheme: TagScheme = ner
        .meta
        .settings
        .get("tag_scheme")
        .and_then(|v| serde_json::from_value(v.clone()).ok())
        .unwrap_or_default();
    let data = load_split(&path, scheme, &ner.labels, &ner.aligner, split)?;
    let collator = Collator::new(ner.aligner.pad_id());
    let scores = evaluate_tags(
        &ner.model,
        &data.encoded.items,
        &data.gold(),
        &ner.labels,
        &collator,
        64,
    )?;
    if json {
        println!("{}", serde_json::to_string_pretty(&scores)?);
        return Ok(());
    }
    println!(
        "{} ({} sentences, {} tokens)",
        path.display(),
        data.sentences.len(),
        scores.tokens
    );
    println!(
        "{:<8} {:>9} {:>9} {:>9} {:>7}",
        "type", "precision", "recall", "f1", "gold"
    );
    for (kind, s) in &scores.per_type {
        println!(
            "{kind:<8} {:>9.4} {:>9.4} {:>9.4} {:>7}",
            s.precision, s.recall, s.f1, s.gold
        );
    }
    let o = &scores.overall;
    println!(
        "{:<8} {:>9.4} {:>9.4} {:>9.4} {:>7}",
        "micro", o.precision, o.recall, o.f1, o.gold
    );
    println!("token accuracy {:.4}", scores.token_accuracy);
    Ok(())
}
