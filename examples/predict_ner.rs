//! Tag a sentence with a trained adapter through the library API.
//!
//! ```sh
//! cargo run --release -p peft-cli --example predict_ner -- adapters/minilm-conll03-lora "Angela Merkel visited Paris ."
//! ```
use std::path::PathBuf;

use candle_core::Device;
use peft_data::Collator;
use peft_train::ner::load_ner_adapter;
use peft_train::tasks::token_classification::predict_tags;

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let dir = PathBuf::from(
        args.next()
            .unwrap_or_else(|| "adapters/minilm-conll03-lora".into()),
    );
    let text = args
        .next()
        .unwrap_or_else(|| "Angela Merkel visited Paris on Monday .".into());
    // Loads the base model named in the adapter, checks its fingerprint, loads the adapter.
    let ner = load_ner_adapter(&dir, None, &Device::Cpu)?;
    let words: Vec<String> = text.split_whitespace().map(String::from).collect();
    let encoded = vec![ner.aligner.encode_words(&words)?];
    let tags = predict_tags(
        &ner.model,
        &encoded,
        &ner.labels,
        &Collator::new(ner.aligner.pad_id()),
        1,
    )?;
    for (w, t) in words.iter().zip(&tags[0]) {
        println!("{w}\t{t}");
    }
    Ok(())
}
