//! Invariants of every adapter method on the tiny test BERT (tests/fixtures/tiny-bert): the
//! model starts at the base output, gradients reach every adapter tensor and match central
//! finite differences, save/load round-trips exactly, and bad input is refused with the model
//! unchanged.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, Var};
use peft_core::methods::bottleneck::{Activation, BottleneckConfig, Placement};
use peft_core::methods::{add_weighted_adapter, Combination};
use peft_core::test_utils::max_abs_diff as max_diff;
use peft_core::{
    adapter_io, AdapterConfig, Ia3Config, LoraConfig, PrefixTuningConfig, PromptTuningConfig,
    TuningPlan,
};
use peft_models::{bert_token_classifier, resolve_model, BertForTokenClassification};

/// The tiny test BERT with its dropout set to 0, so that a training-mode forward pass (which
/// builds the autograd graph) computes the same function as evaluation.
fn base_dir() -> &'static Path {
    static DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tiny-bert");
        let dir = tempfile::tempdir().unwrap().keep();
        for entry in std::fs::read_dir(&src).unwrap() {
            let path = entry.unwrap().path();
            std::fs::copy(&path, dir.join(path.file_name().unwrap())).unwrap();
        }
        let cfg = std::fs::read_to_string(src.join("config.json")).unwrap();
        let mut cfg: serde_json::Value = serde_json::from_str(&cfg).unwrap();
        cfg["hidden_dropout_prob"] = 0.0.into();
        cfg["attention_probs_dropout_prob"] = 0.0.into();
        std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
        dir
    })
}

fn build(adapter: Option<AdapterConfig>) -> BertForTokenClassification {
    let files = resolve_model(base_dir().to_str().unwrap()).unwrap();
    let plan = TuningPlan {
        adapter,
        unfreeze: vec![],
        seed: 5,
    };
    bert_token_classifier(&files, plan, 7, &Device::Cpu, DType::F32).unwrap()
}

fn inputs() -> (Tensor, Tensor, Tensor) {
    let ids = Tensor::new(
        &[[2u32, 25, 28, 22, 43, 7, 3, 0], [2, 9, 11, 30, 5, 3, 0, 0]],
        &Device::Cpu,
    )
    .unwrap();
    let types = ids.zeros_like().unwrap();
    let mask = Tensor::new(
        &[[1u32, 1, 1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1, 0, 0]],
        &Device::Cpu,
    )
    .unwrap();
    (ids, types, mask)
}

fn logits(m: &BertForTokenClassification) -> Tensor {
    let (ids, types, mask) = inputs();
    m.forward(&ids, &types, &mask, false).unwrap()
}

fn bottleneck(placement: Placement) -> BottleneckConfig {
    BottleneckConfig {
        placement,
        reduction_factor: 4,
        non_linearity: Activation::Gelu,
        residual: true,
        scaling: 2.0,
        layers_to_transform: None,
    }
}

fn prompt() -> PromptTuningConfig {
    PromptTuningConfig {
        num_virtual_tokens: 3,
        prompt_tuning_init: Default::default(),
        prompt_tuning_init_text: None,
        tokenizer_name_or_path: None,
        init_token_ids: None,
    }
}

fn prefix(projection: bool) -> PrefixTuningConfig {
    PrefixTuningConfig {
        num_virtual_tokens: 2,
        prefix_projection: projection,
        encoder_hidden_size: 8,
    }
}

/// Every method, by name.
fn methods() -> Vec<(&'static str, AdapterConfig)> {
    let mut dora = LoraConfig::new(2, 4.0, &["query", "value"]);
    dora.use_dora = true;
    let mut rslora = LoraConfig::new(3, 4.0, &["key", "dense"]);
    rslora.use_rslora = true;
    vec![
        (
            "lora",
            AdapterConfig::Lora(LoraConfig::new(2, 4.0, &["query", "value"])),
        ),
        ("rslora", AdapterConfig::Lora(rslora)),
        ("dora", AdapterConfig::Lora(dora)),
        (
            "lora_embedding",
            AdapterConfig::Lora(LoraConfig::new(2, 4.0, &["word_embeddings"])),
        ),
        ("ia3", AdapterConfig::Ia3(Ia3Config::bert_default())),
        (
            "houlsby",
            AdapterConfig::Bottleneck(bottleneck(Placement::Houlsby)),
        ),
        (
            "pfeiffer",
            AdapterConfig::Bottleneck(bottleneck(Placement::Pfeiffer)),
        ),
        (
            "parallel",
            AdapterConfig::Bottleneck(bottleneck(Placement::Parallel)),
        ),
        ("prompt", AdapterConfig::PromptTuning(prompt())),
        ("prefix", AdapterConfig::PrefixTuning(prefix(false))),
        ("prefix_mlp", AdapterConfig::PrefixTuning(prefix(true))),
    ]
}

/// Deterministic pseudo-random values in [-scale, scale) (a multiplicative hash of the index and
/// `salt`), so that every run of these tests sees the same numbers.
fn noise(dims: &[usize], scale: f32, salt: u64) -> Tensor {
    let n: usize = dims.iter().product();
    let v: Vec<f32> = (0..n as u64)
        .map(|i| {
            let h = (i.wrapping_add(salt.wrapping_mul(0x9e37_79b9)))
                .wrapping_mul(0x2545_f491_4f6c_dd1d)
                >> 40;
            (h as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
        })
        .collect();
    Tensor::from_vec(v, dims, &Device::Cpu).unwrap()
}

fn perturb(m: &BertForTokenClassification) {
    for (i, (_, var)) in m.parts.params.named_vars().into_iter().enumerate() {
        let noise = noise(var.dims(), 0.5, i as u64 + 1);
        var.set(&(var.as_tensor() + noise).unwrap()).unwrap();
    }
}

#[test]
fn identity_methods_start_at_the_base_output() {
    let base = logits(&build(None));
    for (name, config) in methods() {
        let m = build(Some(config));
        // Each model draws its head from the same seed; the adapter must not change the output.
        let d = max_diff(&logits(&m), &base);
        let virtual_tokens = matches!(name, "prompt" | "prefix" | "prefix_mlp");
        if virtual_tokens {
            assert!(
                d > 1e-4,
                "{name}: random virtual tokens should change the output"
            );
        } else {
            assert!(
                d < 1e-6,
                "{name}: {d} away from the base output at initialisation"
            );
        }
    }
}

/// A scalar loss: the logits against fixed random weights, over kept positions.
fn loss(m: &BertForTokenClassification, w: &Tensor) -> Tensor {
    let (ids, types, mask) = inputs();
    let y = m.forward(&ids, &types, &mask, true).unwrap();
    (y * w).unwrap().sum_all().unwrap()
}

/// Central differences (h = 1e-2, f64 accumulation of an f32 model) against autograd on three
/// coordinates of every adapter tensor: |analytic − numeric| ≤ 2e-3 + 2e-2·|numeric|.
#[test]
fn gradients_reach_every_adapter_tensor_and_match_finite_differences() {
    for (name, config) in methods() {
        let m = build(Some(config));
        perturb(&m);
        let w = noise(&[2, 8, 7], 1.0, 1000);
        let grads = loss(&m, &w).backward().unwrap();
        for (param, var) in m.parts.params.named_vars() {
            let g = grads
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("{name}: no gradient for {param}"));
            // DoRA detaches the weight norm (as peft does), so autograd's gradient for its A and B
            // is deliberately not the derivative of the function; its magnitude's is.
            if name == "dora" && !param.ends_with("lora_magnitude_vector") {
                continue;
            }
            let flat_g = g.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let n = flat_g.len();
            for idx in [0, n / 2, n - 1] {
                let numeric = central_difference(&m, &w, &var, idx);
                let analytic = flat_g[idx] as f64;
                assert!(
                    (analytic - numeric).abs() <= 2e-3 + 2e-2 * numeric.abs(),
                    "{name} {param}[{idx}]: autograd {analytic}, finite difference {numeric}"
                );
            }
        }
    }
}

fn central_difference(m: &BertForTokenClassification, w: &Tensor, var: &Var, idx: usize) -> f64 {
    let h = 1e-2f32;
    let original = var.as_tensor().copy().unwrap();
    let shifted = |delta: f32| -> f64 {
        let mut v = original.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        v[idx] += delta;
        var.set(&Tensor::from_vec(v, original.dims(), &Device::Cpu).unwrap())
            .unwrap();
        // Evaluation mode: no dropout (every config here has none anyway).
        let (ids, types, mask) = inputs();
        let y = m.forward(&ids, &types, &mask, false).unwrap();
        let y = y.to_dtype(DType::F64).unwrap();
        (y * w.to_dtype(DType::F64).unwrap())
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    };
    let d = (shifted(h) - shifted(-h)) / (2.0 * h as f64);
    var.set(&original).unwrap();
    d
}

#[test]
fn save_and_load_round_trip_every_method() {
    for (name, config) in methods() {
        let m = build(Some(config));
        perturb(&m);
        let expected = logits(&m);
        let dir = tempfile::tempdir().unwrap();
        adapter_io::save_named(dir.path(), &m.parts, "default", "tiny", "TOKEN_CLS", None).unwrap();
        let (plan, _) = adapter_io::read_plan(dir.path()).unwrap();
        let fresh = build(plan.adapter);
        adapter_io::load_weights(dir.path(), &fresh.parts.params).unwrap();
        let d = max_diff(&logits(&fresh), &expected);
        // PiSSA is saved as a rank-2r LoRA on the original base: equal up to f32 rounding.
        let tol = if name == "pissa" { 1e-5 } else { 1e-6 };
        assert!(d < tol, "{name}: reloaded logits differ by {d}");
    }
}

#[test]
fn all_linear_adapts_every_linear_but_the_head_and_no_embedding() {
    let mut lora = LoraConfig::new(2, 4.0, &[]);
    lora.target_modules = peft_core::TargetModules::Pattern("all-linear".into());
    let m = build(Some(AdapterConfig::Lora(lora)));
    let paths = m.parts.registry.adapted_paths();
    // 2 layers × (query, key, value, attention output, intermediate, output).
    assert_eq!(paths.len(), 12, "{paths:?}");
    assert!(paths
        .iter()
        .all(|p| !p.contains("embeddings") && p != "classifier"));
}

#[test]
fn bottleneck_placements_put_adapters_at_their_hook_points() {
    let count = |placement, layers: Option<Vec<usize>>| {
        let mut c = bottleneck(placement);
        c.layers_to_transform = layers;
        let m = build(Some(AdapterConfig::Bottleneck(c)));
        m.parts.params.named_vars().len() / 4
    };
    // 2 layers: Houlsby after attention and FFN, the others after (or beside) the FFN only.
    assert_eq!(count(Placement::Houlsby, None), 4);
    assert_eq!(count(Placement::Pfeiffer, None), 2);
    assert_eq!(count(Placement::Parallel, None), 2);
    assert_eq!(count(Placement::Houlsby, Some(vec![1])), 2);
}

#[test]
fn bad_input_is_refused_and_leaves_the_model_as_it_was() {
    let m = build(Some(AdapterConfig::Lora(LoraConfig::new(
        2,
        4.0,
        &["query"],
    ))));
    perturb(&m);
    let before = logits(&m);
    let registry = &m.parts.registry;

    // A name clash lists the existing adapters.
    let err = registry
        .add_adapter("default", &AdapterConfig::Ia3(Ia3Config::bert_default()))
        .unwrap_err()
        .to_string();
    assert!(err.contains("`default` already exists"), "{err}");

    // An IA3 folder loaded where the model expects LoRA tensors names the missing tensor.
    let ia3 = build(Some(AdapterConfig::Ia3(Ia3Config::bert_default())));
    let dir = tempfile::tempdir().unwrap();
    adapter_io::save_named(dir.path(), &ia3.parts, "default", "tiny", "TOKEN_CLS", None).unwrap();
    let err = adapter_io::load_weights(dir.path(), &m.parts.params)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("lora_A.weight") && err.contains("missing"),
        "{err}"
    );
    assert!(max_diff(&logits(&m), &before) == 0.0);

    // Loading it as a named adapter works; a truncated file does not and adds nothing.
    adapter_io::load_adapter(dir.path(), &m.parts, "ia3").unwrap();
    let f = dir.path().join("adapter_model.safetensors");
    let bytes = std::fs::read(&f).unwrap();
    std::fs::write(&f, &bytes[..bytes.len() / 2]).unwrap();
    let err = adapter_io::load_adapter(dir.path(), &m.parts, "broken")
        .unwrap_err()
        .to_string();
    assert!(err.contains("truncated"), "{err}");
    assert_eq!(registry.adapter_names(), ["default", "ia3"]);

    // Unknown adapter names list the known ones.
    let err = registry.set_active("nope").unwrap_err().to_string();
    assert!(err.contains("default, ia3"), "{err}");

    // While merged, no switching, disabling, adding or deleting of the merged adapter.
    registry.merge().unwrap();
    for err in [
        registry.set_active("ia3").unwrap_err(),
        registry.disable().unwrap_err(),
        registry.delete_adapter("default").unwrap_err(),
    ] {
        assert!(err.to_string().contains("merged"), "{err}");
    }
    registry.unmerge().unwrap();
    assert!(max_diff(&logits(&m), &before) < 1e-5);

    // Weighted combinations: only LoRA, and `linear` only at one rank.
    let err = add_weighted_adapter(
        registry,
        &[("default", 1.0), ("ia3", 1.0)],
        "x",
        Combination::Cat,
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("IA3") && err.contains("only plain LoRA"),
        "{err}"
    );
    registry
        .add_adapter(
            "r4",
            &AdapterConfig::Lora(LoraConfig::new(4, 4.0, &["query"])),
        )
        .unwrap();
    let err = add_weighted_adapter(
        registry,
        &[("default", 1.0), ("r4", 1.0)],
        "x",
        Combination::Linear,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("ranks [2, 4]"), "{err}");
    add_weighted_adapter(
        registry,
        &[("default", 1.0), ("r4", 1.0)],
        "x",
        Combination::Cat,
    )
    .unwrap();
    // Rank 2 + 4: `A` is 6 × in.
    assert_eq!(
        registry.adapter("x").unwrap().params.named_vars()[0]
            .1
            .dims(),
        [6, 32]
    );
    assert_eq!(registry.active().as_deref(), Some("default"));
    assert!(max_diff(&logits(&m), &before) < 1e-5);

    // Deleting a PiSSA adapter puts the original base weights back.
    let mut pissa = LoraConfig::new(2, 2.0, &["query"]);
    pissa.init = peft_core::LoraInit::Pissa;
    let p = build(Some(AdapterConfig::Lora(pissa.clone())));
    let q = p
        .parts
        .registry
        .linear("bert.encoder.layer.0.attention.self.query")
        .unwrap();
    let original = build(None)
        .parts
        .registry
        .linear(q.path())
        .unwrap()
        .weight();
    assert!(
        max_diff(&q.weight(), &original) > 1e-3,
        "the base holds the residual"
    );
    let err = p
        .parts
        .registry
        .add_adapter("second", &AdapterConfig::Lora(pissa))
        .unwrap_err()
        .to_string();
    assert!(err.contains("before any other adapter"), "{err}");
    p.parts.registry.delete_adapter("default").unwrap();
    assert!(max_diff(&q.weight(), &original) < 1e-6);

    // Virtual tokens that push the input past the position table are a clear error.
    let mut long = prompt();
    long.num_virtual_tokens = 60;
    let v = build(Some(AdapterConfig::PromptTuning(long)));
    let (ids, types, mask) = inputs();
    let err = v
        .forward(&ids, &types, &mask, false)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("max_position_embeddings") && err.contains("68 tokens"),
        "{err}"
    );

    // Methods without a merge refuse it.
    let b = build(Some(AdapterConfig::Bottleneck(bottleneck(
        Placement::Pfeiffer,
    ))));
    let err = b.parts.registry.merge().unwrap_err().to_string();
    assert!(
        err.contains("BOTTLENECK") && err.contains("cannot be merged"),
        "{err}"
    );
}
