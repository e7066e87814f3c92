//! Writes one adapter folder per method that Python peft reads (LoRA, rsLoRA, DoRA, LoRA on
//! embeddings, PiSSA (saved as a rank-2r LoRA), IA3, prompt tuning, prefix tuning with and without
//! its MLP) on the tiny test BERT,
//! with every adapter tensor and the head randomised, plus the logits peft-rs computes for them:
//!
//!     cargo run --example export_adapters -- OUT_DIR
//!
//! For the mergeable methods it also writes `merged_<method>/`, the checkpoint `peft-rs merge`
//! writes. `scripts/check-peft-interop.sh` then loads each folder with `PeftModel.from_pretrained`
//! (and each merged one with plain transformers) and compares the logits with ours
//! (tests/fixtures/methods/check_peft_loads.py, check_merged_loads.py).

use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use peft_core::{
    adapter_io, AdapterConfig, Ia3Config, LoraConfig, PrefixTuningConfig, PromptTuningConfig,
    TuningPlan,
};
use peft_models::{bert_token_classifier, resolve_model, write_merged_token_classifier};

const BASE: &str = "tests/fixtures/tiny-bert";
const LABELS: usize = 7;
const LABEL_NAMES: [&str; LABELS] = ["O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC"];

fn methods() -> Vec<(&'static str, AdapterConfig)> {
    let lora = LoraConfig::new(4, 8.0, &["query", "value", "dense"]);
    let mut rslora = LoraConfig::new(3, 8.0, &["query", "key"]);
    rslora.use_rslora = true;
    let mut dora = lora.clone();
    dora.use_dora = true;
    let embedding = LoraConfig::new(4, 8.0, &["word_embeddings", "query"]);
    let mut pissa = LoraConfig::new(2, 2.0, &["query", "value"]);
    pissa.init = peft_core::LoraInit::Pissa;
    let prompt = PromptTuningConfig {
        num_virtual_tokens: 4,
        prompt_tuning_init: Default::default(),
        prompt_tuning_init_text: None,
        tokenizer_name_or_path: None,
        init_token_ids: None,
    };
    let prefix = |projection| PrefixTuningConfig {
        num_virtual_tokens: 5,
        prefix_projection: projection,
        encoder_hidden_size: 16,
    };
    vec![
        ("lora", AdapterConfig::Lora(lora)),
        ("rslora", AdapterConfig::Lora(rslora)),
        ("dora", AdapterConfig::Lora(dora)),
        ("lora_embedding", AdapterConfig::Lora(embedding)),
        ("pissa", AdapterConfig::Lora(pissa)),
        ("ia3", AdapterConfig::Ia3(Ia3Config::bert_default())),
        ("prompt", AdapterConfig::PromptTuning(prompt)),
        ("prefix", AdapterConfig::PrefixTuning(prefix(false))),
        (
            "prefix_projection",
            AdapterConfig::PrefixTuning(prefix(true)),
        ),
    ]
}

fn main() -> Result<()> {
    let out = PathBuf::from(
        std::env::args()
            .nth(1)
            .context("usage: export_adapters OUT_DIR")?,
    );
    std::fs::create_dir_all(&out)?;
    let files = resolve_model(BASE)?;
    let fixture = candle_core::safetensors::load(
        "tests/fixtures/methods/dora_tiny.safetensors",
        &Device::Cpu,
    )?;
    let u = |k: &str| fixture[k].to_dtype(DType::U32);
    let (ids, types, mask) = (u("input_ids")?, u("token_type_ids")?, u("attention_mask")?);
    for (i, (name, config)) in methods().into_iter().enumerate() {
        let plan = TuningPlan {
            adapter: Some(config),
            unfreeze: vec![],
            seed: i as u64,
        };
        let model = bert_token_classifier(&files, plan, LABELS, &Device::Cpu, DType::F32)?;
        // Move every trainable tensor off its initial value, so the adapter changes the output.
        for (_, var) in model.parts.params.named_vars() {
            let noise = Tensor::randn(0f32, 0.2, var.dims(), &Device::Cpu)?;
            var.set(&(var.as_tensor() + noise)?)?;
        }
        let logits = model.forward(&ids, &types, &mask, false)?;
        let dir = out.join(name);
        adapter_io::save_named(&dir, &model.parts, "default", BASE, "TOKEN_CLS", None)?;
        let tensors: HashMap<&str, Tensor> = HashMap::from([
            ("input_ids", fixture["input_ids"].clone()),
            ("token_type_ids", fixture["token_type_ids"].clone()),
            ("attention_mask", fixture["attention_mask"].clone()),
            ("logits", logits),
        ]);
        candle_core::safetensors::save(&tensors, out.join(format!("{name}.safetensors")))?;
        println!("{}", dir.display());
        // The mergeable methods also as a merged plain checkpoint (what `peft-rs merge` writes).
        if model
            .parts
            .registry
            .adapter("default")
            .is_some_and(|e| e.config.is_mergeable())
        {
            let id2label = LABEL_NAMES
                .iter()
                .enumerate()
                .map(|(i, l)| (i.to_string(), l.to_string()))
                .collect();
            let merged = out.join(format!("merged_{name}"));
            write_merged_token_classifier(&model.parts, &files, &id2label, &merged)?;
            println!("{}", merged.display());
        }
    }
    Ok(())
}
