//! Every adapter method against Hugging Face peft on the same weights: adapters saved by peft
//! 0.21.2 (tests/fixtures/methods/gen_fixtures.py, transformers 5.24, f32) load here and give
//! peft's logits, with the adapter disabled the base logits, and merged (where peft merges) the
//! merged logits. Tolerance: 1e-4 max abs over the positions the attention mask keeps.
//!
//! The tiny-BERT cases need nothing but the committed fixtures; the all-MiniLM-L6-v2 cases need
//! the model in the Hugging Face cache (`scripts/setup-assets.sh`) and otherwise print a note and
//! pass, unless PEFT_RS_REQUIRE_ASSETS=1 (CI), where they fail.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use peft_core::methods::{add_weighted_adapter, Combination};
use peft_core::{adapter_io, AdapterConfig, TuningPlan};
use peft_models::{bert_token_classifier, resolve_model, BertForTokenClassification, ModelFiles};

const TOL: f32 = 1e-4;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn tiny() -> Option<(ModelFiles, usize)> {
    Some((
        resolve_model(fixtures().join("tiny-bert").to_str().expect("utf-8 path")).expect("tiny"),
        7,
    ))
}

fn minilm() -> Option<(ModelFiles, usize)> {
    match resolve_model("sentence-transformers/all-MiniLM-L6-v2") {
        Ok(m) => Some((m, 9)),
        Err(e) if std::env::var("PEFT_RS_REQUIRE_ASSETS").is_ok_and(|v| v == "1") => panic!("{e}"),
        Err(e) => {
            eprintln!("skipping: {e}");
            None
        }
    }
}

fn load(name: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixtures().join("methods").join(name), &Device::Cpu)
        .expect("fixture")
}

struct Inputs {
    ids: Tensor,
    types: Tensor,
    mask: Tensor,
}

fn inputs(f: &HashMap<String, Tensor>) -> Inputs {
    let u = |k: &str| f[k].to_dtype(DType::U32).unwrap();
    Inputs {
        ids: u("input_ids"),
        types: u("token_type_ids"),
        mask: u("attention_mask"),
    }
}

fn logits(m: &BertForTokenClassification, i: &Inputs) -> Tensor {
    m.forward(&i.ids, &i.types, &i.mask, false).unwrap()
}

/// Max abs difference over the positions the attention mask keeps; peft's prompt-tuning logits
/// have `virtual_rows` rows for the virtual tokens first, which are skipped.
fn diff(ours: &Tensor, peft: &Tensor, mask: &Tensor, virtual_rows: usize) -> f32 {
    let seq = ours.dim(1).unwrap();
    let peft = peft.narrow(1, virtual_rows, seq).unwrap();
    let m = mask.to_dtype(DType::F32).unwrap().unsqueeze(2).unwrap();
    (ours - peft)
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

fn model_with(
    files: &ModelFiles,
    labels: usize,
    adapter: Option<AdapterConfig>,
) -> BertForTokenClassification {
    let plan = TuningPlan {
        adapter,
        unfreeze: vec![],
        seed: 0,
    };
    bert_token_classifier(files, plan, labels, &Device::Cpu, DType::F32).unwrap()
}

/// Loads peft's adapter `case` into a fresh model and checks the logits unmerged, disabled and
/// (when `merged`) merged; returns the model.
fn check(base: Option<(ModelFiles, usize)>, case: &str, merged: bool) {
    let Some((files, labels)) = base else { return };
    let dir = fixtures().join("methods").join(case);
    let (adapter, _) = adapter_io::read_config(&dir).unwrap();
    let virtual_rows = match &adapter {
        AdapterConfig::PromptTuning(c) => c.num_virtual_tokens,
        _ => 0,
    };
    let model = model_with(&files, labels, Some(adapter));
    adapter_io::load_weights(&dir, &model.parts.params).unwrap();
    let f = load(&format!("{case}.safetensors"));
    let i = inputs(&f);
    let d = diff(&logits(&model, &i), &f["logits"], &i.mask, virtual_rows);
    assert!(d < TOL, "{case}: logits differ from peft's by {d}");
    let registry = &model.parts.registry;
    registry.disable().unwrap();
    // peft's base logits come from the base model alone: no virtual rows.
    let d = diff(&logits(&model, &i), &f["base_logits"], &i.mask, 0);
    assert!(
        d < TOL,
        "{case}: disabled logits differ from peft's base by {d}"
    );
    registry.enable();
    if merged {
        registry.merge().unwrap();
        let d = diff(&logits(&model, &i), &f["merged_logits"], &i.mask, 0);
        assert!(d < TOL, "{case}: merged logits differ from peft's by {d}");
        registry.unmerge().unwrap();
        let d = diff(&logits(&model, &i), &f["logits"], &i.mask, virtual_rows);
        assert!(d < TOL, "{case}: unmerged again, logits differ by {d}");
    } else {
        let err = registry.merge().unwrap_err().to_string();
        assert!(err.contains("cannot be merged"), "{case}: {err}");
    }
}

#[test]
fn dora_matches_peft() {
    check(tiny(), "dora_tiny", true);
    check(minilm(), "dora_minilm", true);
}

#[test]
fn lora_on_embeddings_matches_peft() {
    check(tiny(), "lora_embedding_tiny", true);
}

#[test]
fn ia3_matches_peft() {
    check(tiny(), "ia3_tiny", true);
    check(minilm(), "ia3_minilm", true);
}

#[test]
fn prompt_tuning_matches_peft() {
    check(tiny(), "prompt_tiny", false);
    check(tiny(), "prompt_text_tiny", false);
    check(minilm(), "prompt_minilm", false);
}

/// peft cannot run prefix tuning on BERT with transformers 5.24 (it looks for `past_key_values`
/// in the forward signature): these fixtures call the backbone with peft's own prefixes as
/// transformers' cache, as peft would (see the generator).
#[test]
fn prefix_tuning_matches_peft_prefixes() {
    check(tiny(), "prefix_tiny", false);
    check(tiny(), "prefix_proj_tiny", false);
}

#[test]
fn prompt_text_init_gives_peft_initial_tokens() {
    let (files, labels) = tiny().unwrap();
    let dir = fixtures().join("methods").join("prompt_text_tiny");
    let config = AdapterConfig::PromptTuning(peft_core::PromptTuningConfig {
        num_virtual_tokens: 6,
        prompt_tuning_init: peft_core::methods::prompt::PromptInit::Text,
        prompt_tuning_init_text: Some("john lives in paris".into()),
        tokenizer_name_or_path: None,
        // [CLS] john lives in paris [SEP], as peft tokenised the text (recorded by the generator).
        init_token_ids: Some(vec![2, 25, 28, 22, 43, 3]),
    });
    let model = model_with(&files, labels, Some(config));
    let ours = model.parts.params.get("prompt_embeddings").unwrap();
    let st = candle_core::safetensors::load(dir.join("adapter_model.safetensors"), &Device::Cpu)
        .unwrap();
    let d = (ours.as_tensor() - &st["prompt_embeddings"])
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(
        d == 0.0,
        "text-initialised tokens differ from peft's by {d}"
    );
}

#[test]
fn named_adapters_and_weighted_combinations_match_peft() {
    let (files, labels) = tiny().unwrap();
    let model = model_with(&files, labels, None);
    let parts = &model.parts;
    let root = fixtures().join("methods").join("multi_tiny");
    adapter_io::load_adapter(&root.join("a"), parts, "a").unwrap();
    adapter_io::load_adapter(&root.join("b"), parts, "b").unwrap();
    let f = load("multi_tiny.safetensors");
    let i = inputs(&f);
    let registry = &parts.registry;
    assert_eq!(
        registry.active().as_deref(),
        Some("a"),
        "the first adapter is active"
    );
    for (name, key) in [("a", "logits_a"), ("b", "logits_b")] {
        registry.set_active(name).unwrap();
        let d = diff(&logits(&model, &i), &f[key], &i.mask, 0);
        assert!(d < TOL, "adapter {name}: {d}");
    }
    registry.disable().unwrap();
    assert!(diff(&logits(&model, &i), &f["base_logits"], &i.mask, 0) < TOL);
    registry.enable();
    for (name, combination) in [("lin", Combination::Linear), ("cat", Combination::Cat)] {
        add_weighted_adapter(registry, &[("a", 0.7), ("b", 0.3)], name, combination).unwrap();
        for (key, var) in registry.adapter(name).unwrap().params.named_vars() {
            let peft = &f[&format!("{name}.base_model.model.{key}")];
            let d = (var.as_tensor() - peft)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap();
            assert!(d.to_scalar::<f32>().unwrap() < 1e-6, "{name} {key}");
        }
        registry.set_active(name).unwrap();
        let d = diff(
            &logits(&model, &i),
            &f[&format!("logits_{name}")],
            &i.mask,
            0,
        );
        assert!(d < TOL, "combination {name}: {d}");
    }
    // Deleting the active adapter leaves the base model; the others stay usable.
    registry.delete_adapter("cat").unwrap();
    assert_eq!(registry.active(), None);
    assert!(diff(&logits(&model, &i), &f["base_logits"], &i.mask, 0) < TOL);
    registry.set_active("b").unwrap();
    assert!(diff(&logits(&model, &i), &f["logits_b"], &i.mask, 0) < TOL);
}
