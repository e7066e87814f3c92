//! Train a LoRA adapter for NER through the library API, without a recipe.
//!
//! ```sh
//! scripts/setup-assets.sh
//! cargo run --release -p peft-cli --example train_ner -- 500   # first 500 training sentences
//! ```
use std::path::Path;

use candle_core::Device;
use peft_core::adapter_io::{self, AdapterMeta};
use peft_core::{AdapterConfig, LoraConfig, TargetModules, TuningPlan};
use peft_data::{AlignOptions, Batcher, Collator, LabelSet, TagScheme};
use peft_models::{bert_token_classifier, resolve_model};
use peft_train::ner::{aligner_for, load_split, settings, TASK};
use peft_train::optim::AdamWConfig;
use peft_train::tasks::token_classification::TokenClassification;
use peft_train::{ScheduleConfig, Trainer, TrainerConfig};

fn main() -> anyhow::Result<()> {
    // Reuse freed activation buffers instead of page-faulting fresh ones every step.
    peft_core::device::keep_freed_cpu_buffers();
    let limit: usize = std::env::args().nth(1).map_or(Ok(500), |s| s.parse())?;
    let data = Path::new("assets/data/conll2003");
    // The base model: a Hugging Face id (from the hub cache) or a local folder.
    let files = resolve_model("sentence-transformers/all-MiniLM-L6-v2")?;
    let options = AlignOptions {
        label_all_subtokens: false,
        max_len: Some(128),
    };
    let aligner = aligner_for(&files, options)?;
    let mut sentences = peft_data::read_conll(data.join("train.txt"), TagScheme::Auto)?;
    sentences.truncate(limit);
    let labels = LabelSet::from_sentences(&sentences);
    let train = aligner.encode_all(&sentences, &labels)?.items;
    let valid = load_split(
        &data.join("valid.txt"),
        TagScheme::Auto,
        &labels,
        &aligner,
        "valid",
    )?;

    // LoRA r=8 on query and value; the new classifier head always trains.
    let plan = TuningPlan {
        adapter: Some(AdapterConfig::Lora(LoraConfig {
            r: 8,
            lora_alpha: 16.0,
            lora_dropout: 0.1,
            target_modules: TargetModules::Names(vec!["query".into(), "value".into()]),
            layers_to_transform: None,
            layers_pattern: vec![],
            use_rslora: false,
            use_dora: false,
            init: Default::default(),
        })),
        unfreeze: vec![],
        seed: 42,
    };
    let model = bert_token_classifier(
        &files,
        plan,
        labels.len(),
        &Device::Cpu,
        candle_core::DType::F32,
    )?;
    let collator = Collator::new(aligner.pad_id());
    let batcher = Batcher::new(train.iter().map(|e| e.len()).collect(), 32, 42)?;
    let task = TokenClassification::new(
        &model,
        train,
        valid.encoded.items.clone(),
        valid.gold(),
        labels.clone(),
        collator,
        batcher,
    );
    let config = TrainerConfig {
        epochs: 1,
        optimizer: AdamWConfig {
            lr: 1e-3,
            weight_decay: 0.01,
            ..Default::default()
        },
        schedule: ScheduleConfig::Linear {
            warmup_steps: None,
            warmup_ratio: Some(0.06),
        },
        max_grad_norm: Some(1.0),
        grad_accumulation: 1,
        early_stopping_patience: None,
        log_every: 10,
        run_dir: "runs/example".into(),
        progress: true,
    };
    let summary = Trainer::new(config, model.parts.params.named_vars())?.fit(&task)?;
    println!("valid F1 {:.4}", summary.best.map_or(0.0, |b| b.score));

    // The adapter folder: peft's adapter_config.json + adapter_model.safetensors, plus labels.
    let meta = AdapterMeta {
        base_model_fingerprint: model.parts.base_fingerprint.clone(),
        task: TASK.into(),
        unfreeze: vec![],
        id2label: labels.to_id2label(),
        tokenizer: files.name.clone(),
        settings: settings(
            &options,
            TagScheme::Auto,
            &[("valid", &data.join("valid.txt"))],
        ),
    };
    adapter_io::save(
        Path::new("runs/example/adapter"),
        &model.parts,
        &files.name,
        "TOKEN_CLS",
        &meta,
    )?;
    println!("wrote runs/example/adapter");
    Ok(())
}
