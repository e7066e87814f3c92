//! `peft-rs predict`: tag sentences with an adapter.

use std::io::BufRead;
use std::path::Path;

use anyhow::Result;
use candle_core::Device;
use peft_data::Collator;
use peft_train::ner::load_ner_adapter;
use peft_train::tasks::token_classification::predict_tags;

/// Splits text into words at whitespace and around punctuation, as BERT's basic tokenizer does.
pub fn split_words(text: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut current = String::new();
    for c in text.chars() {
        if c.is_whitespace() || c.is_ascii_punctuation() {
            if !current.is_empty() {
                words.push(std::mem::take(&mut current));
            }
            if c.is_ascii_punctuation() {
                words.push(c.to_string());
            }
        } else {
            current.push(c);
        }
    }
    if !current.is_empty() {
        words.push(current);
    }
    words
}

/// Entity spans `(text, type)` from IOB2 word tags.
fn entities(words: &[String], tags: &[String]) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = Vec::new();
    let mut open = false;
    for (w, t) in words.iter().zip(tags) {
        if let Some(kind) = t.strip_prefix("B-") {
            out.push((w.clone(), kind.to_string()));
            open = true;
        } else if let (Some(kind), true) = (t.strip_prefix("I-"), open) {
            match out.last_mut() {
                Some(last) if last.1 == kind => {
                    last.0.push(' ');
                    last.0.push_str(w);
                }
                _ => out.push((w.clone(), kind.to_string())),
            }
        } else if let Some(kind) = t.strip_prefix("I-") {
            out.push((w.clone(), kind.to_string()));
            open = true;
        } else {
            open = false;
        }
    }
    out
}

pub fn run(adapter: &Path, text: &[String], base: Option<&str>, json: bool) -> Result<()> {
    if super::is_image_adapter(adapter)? {
        // For an image classifier the arguments are image files.
        return super::eval_image::predict(adapter, text, json);
    }
    let ner = load_ner_adapter(adapter, base, &Device::Cpu)?;
    let lines: Vec<String> = if text.is_empty() {
        std::io::stdin()
            .lock()
            .lines()
            .collect::<std::io::Result<_>>()?
    } else {
        text.to_vec()
    };
    let sentences: Vec<Vec<String>> = lines
        .iter()
        .map(|l| split_words(l))
        .filter(|w| !w.is_empty())
        .collect();
    let encoded = sentences
        .iter()
        .map(|w| ner.aligner.encode_words(w))
        .collect::<std::result::Result<Vec<_>, _>>()?;
    let collator = Collator::new(ner.aligner.pad_id());
    let tags = predict_tags(&ner.model, &encoded, &ner.labels, &collator, 32)?;
    for (words, tags) in sentences.iter().zip(&tags) {
        let ents = entities(words, tags);
        if json {
            let ents: Vec<_> = ents
                .iter()
                .map(|(t, k)| serde_json::json!({"text": t, "type": k}))
                .collect();
            println!(
                "{}",
                serde_json::json!({"words": words, "tags": tags, "entities": ents})
            );
        } else {
            let tagged: Vec<String> = words
                .iter()
                .zip(tags)
                .map(|(w, t)| {
                    if t == "O" {
                        w.clone()
                    } else {
                        format!("{w}/{t}")
                    }
                })
                .collect();
            println!("{}", tagged.join(" "));
            for (t, k) in ents {
                println!("  {k:<5} {t}");
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_punctuation_and_groups_entities() {
        assert_eq!(
            split_words("Merkel visited Paris, on Monday."),
            ["Merkel", "visited", "Paris", ",", "on", "Monday", "."]
        );
        let w: Vec<String> = ["Angela", "Merkel", "visited", "New", "York"]
            .map(String::from)
            .to_vec();
        let t: Vec<String> = ["B-PER", "I-PER", "O", "B-LOC", "I-LOC"]
            .map(String::from)
            .to_vec();
        assert_eq!(
            entities(&w, &t),
            [
                ("Angela Merkel".to_string(), "PER".to_string()),
                ("New York".into(), "LOC".into())
            ]
        );
    }
}
