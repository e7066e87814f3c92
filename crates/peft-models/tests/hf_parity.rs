//! Parity with Hugging Face transformers and peft on all-MiniLM-L6-v2, using fixtures made by
//! tests/fixtures/bert/gen_fixtures.py (transformers 5.24, peft 0.21.2, f32).
//!
//! Needs the model in the Hugging Face cache (`scripts/setup-assets.sh`). Without it the tests
//! print a note and pass, unless PEFT_RS_REQUIRE_ASSETS=1 (set in CI), where they fail.

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use peft_core::{adapter_io, TuningPlan};
use peft_models::{bert_token_classifier, read_bert_config, resolve_model, BertModel, ModelFiles};

const MODEL: &str = "sentence-transformers/all-MiniLM-L6-v2";
/// Max abs difference allowed against transformers in f32.
const TOL: f32 = 1e-4;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/bert")
}

fn model() -> Option<ModelFiles> {
    match resolve_model(MODEL) {
        Ok(m) => Some(m),
        Err(e) if std::env::var("PEFT_RS_REQUIRE_ASSETS").is_ok_and(|v| v == "1") => panic!("{e}"),
        Err(e) => {
            eprintln!("skipping: {e}");
            None
        }
    }
}

fn load(name: &str) -> std::collections::HashMap<String, Tensor> {
    candle_core::safetensors::load(fixtures().join(name), &Device::Cpu).expect("fixture")
}

fn inputs(f: &std::collections::HashMap<String, Tensor>) -> (Tensor, Tensor, Tensor) {
    let u = |k: &str| f[k].to_dtype(candle_core::DType::U32).unwrap();
    (u("input_ids"), u("token_type_ids"), u("attention_mask"))
}

/// Max abs difference over the positions the attention mask keeps.
fn masked_max_diff(a: &Tensor, b: &Tensor, mask: &Tensor) -> f32 {
    let m = mask
        .to_dtype(candle_core::DType::F32)
        .unwrap()
        .unsqueeze(2)
        .unwrap();
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .broadcast_mul(&m)
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

#[test]
fn hidden_states_match_transformers_bert_model() {
    let Some(files) = model() else { return };
    let cfg = read_bert_config(&files).unwrap();
    let weights = peft_core::WeightSource::from_safetensors(&files.weights).unwrap();
    let b = peft_core::ModelBuilder::new(
        weights,
        TuningPlan::default(),
        candle_core::DType::F32,
        Device::Cpu,
    )
    .unwrap();
    let bert = BertModel::new(&cfg, &b).unwrap();
    let f = load("minilm_hidden.safetensors");
    let (ids, tt, mask) = inputs(&f);
    let states = bert.hidden_states(&ids, &tt, &mask, false).unwrap();
    for (i, key) in [(0, "hidden_0"), (1, "hidden_1")] {
        let d = masked_max_diff(&states[i], &f[key], &f["attention_mask"]);
        assert!(d < TOL, "{key}: max abs diff {d}");
    }
    let d = masked_max_diff(
        states.last().unwrap(),
        &f["last_hidden_state"],
        &f["attention_mask"],
    );
    assert!(d < TOL, "last_hidden_state: max abs diff {d}");
}

fn check_peft_adapter(dir: &str, logits_file: &str) {
    let Some(files) = model() else { return };
    let dir = fixtures().join(dir);
    let (adapter, _) = adapter_io::read_config(&dir).unwrap();
    let plan = TuningPlan {
        adapter: Some(adapter),
        unfreeze: vec![],
        seed: 0,
    };
    let model =
        bert_token_classifier(&files, plan, 9, &Device::Cpu, candle_core::DType::F32).unwrap();
    adapter_io::load_weights(&dir, &model.parts.params).unwrap();
    let f = load(logits_file);
    let (ids, tt, mask) = inputs(&f);
    let logits = model.forward(&ids, &tt, &mask, false).unwrap();
    let d = masked_max_diff(&logits, &f["logits"], &f["attention_mask"]);
    assert!(d < TOL, "{dir:?} unmerged logits: max abs diff {d}");
    model.parts.registry.merge_all().unwrap();
    let merged = model.forward(&ids, &tt, &mask, false).unwrap();
    let d = masked_max_diff(&merged, &f["merged_logits"], &f["attention_mask"]);
    assert!(d < TOL, "{dir:?} merged logits: max abs diff {d}");
}

#[test]
fn peft_lora_adapter_gives_peft_logits() {
    check_peft_adapter("peft_lora_minilm", "lora_logits.safetensors");
}

#[test]
fn peft_rslora_adapter_gives_peft_logits() {
    check_peft_adapter("peft_rslora_minilm", "rslora_logits.safetensors");
}
