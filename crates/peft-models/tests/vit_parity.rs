//! ViT and DINOv2 against Hugging Face transformers 5.24 and peft 0.21.2 on tiny random models
//! (fixtures made by tests/fixtures/vit/gen_vit_fixtures.py, f32): checkpoints in the
//! transformers 4 key layout load, logits and hidden states match at the config size and at
//! interpolated sizes, peft's LoRA adapters (with the classifier in `modules_to_save`, and LoRA
//! on the patch Conv2d for DINOv2) give peft's logits unmerged, disabled and merged.
//! Tolerance: 1e-4 max abs. Run with `--nocapture` to see the measured differences.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use peft_core::test_utils::max_abs_diff as max_diff;
use peft_core::{adapter_io, ModelBuilder, PeftError, TuningPlan};
use peft_models::dinov2::{dinov2_weights, Dinov2Config};
use peft_models::vit::ViTConfig;
use peft_models::{
    dinov2_image_classifier, interpolate_bicubic, resolve_model, vit_image_classifier, Dinov2Model,
    ModelFiles, Resize,
};

const TOL: f32 = 1e-4;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/vit")
}

fn files(name: &str) -> ModelFiles {
    resolve_model(fixtures().join(name).to_str().expect("utf-8 path")).expect("fixture model")
}

fn load(name: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixtures().join(name), &Device::Cpu).expect("fixture")
}

fn check(what: &str, ours: &Tensor, theirs: &Tensor) {
    let d = max_diff(ours, theirs);
    eprintln!("{what}: max abs diff {d:.3e}");
    assert!(d < TOL, "{what}: max abs diff {d}");
}

fn plan(adapter: Option<peft_core::AdapterConfig>) -> TuningPlan {
    TuningPlan {
        adapter,
        unfreeze: vec![],
        seed: 0,
    }
}

#[test]
fn bicubic_matches_torch_interpolate() {
    let f = load("bicubic.safetensors");
    let x = &f["x"];
    let cases = [
        ("size_7x3", Resize::Size(7, 3)),
        ("size_2x6", Resize::Size(2, 6)),
        ("size_5x4", Resize::Size(5, 4)),
        ("size_9x11", Resize::Size(9, 11)),
        ("scale_1.7x0.6", Resize::Scale(1.7, 0.6)),
        ("scale_2.0x2.0", Resize::Scale(2.0, 2.0)),
        ("scale_0.5x1.25", Resize::Scale(0.5, 1.25)),
    ];
    for (key, resize) in cases {
        let ours = interpolate_bicubic(x, resize).unwrap();
        let d = max_diff(&ours, &f[key]);
        eprintln!("bicubic {key}: max abs diff {d:.3e}");
        assert!(d < 1e-5, "bicubic {key}: {d}");
    }
}

#[test]
fn vit_classifier_matches_transformers() {
    let f = load("vit.safetensors");
    let model =
        vit_image_classifier(&files("vit_tiny"), plan(None), 5, &Device::Cpu, DType::F32).unwrap();
    let px = &f["pixel_values_16x16"];
    check(
        "vit logits 16x16",
        &model.forward(px, false).unwrap(),
        &f["logits_16x16"],
    );
    let h = model.vit.forward(px, false, false).unwrap();
    check(
        "vit last_hidden_state 16x16",
        &h,
        &f["last_hidden_state_16x16"],
    );
    for size in ["24x20", "8x12"] {
        let px = &f[&format!("pixel_values_{size}")];
        let logits = model.forward_with(px, true, false).unwrap();
        check(
            &format!("vit logits {size} (interpolate_pos_encoding)"),
            &logits,
            &f[&format!("logits_{size}")],
        );
        let err = model.forward(px, false).unwrap_err();
        assert!(
            matches!(&err, PeftError::Config { key, .. } if key == "pixel_values"),
            "{err}"
        );
    }
}

#[test]
fn vit_new_head_when_sizes_differ() {
    // 3 classes: the checkpoint's 5-class classifier is not used, a new one is.
    let model =
        vit_image_classifier(&files("vit_tiny"), plan(None), 3, &Device::Cpu, DType::F32).unwrap();
    let mut names: Vec<String> = model
        .parts
        .params
        .named_vars()
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    names.sort();
    assert_eq!(names, ["classifier.bias", "classifier.weight"]);
    let f = load("vit.safetensors");
    let logits = model.forward(&f["pixel_values_16x16"], false).unwrap();
    assert_eq!(logits.dims(), [2, 3]);
}

#[test]
fn dinov2_model_matches_transformers() {
    let f = load("dinov2.safetensors");
    let files = files("dinov2_tiny");
    let text = std::fs::read_to_string(&files.config).unwrap();
    let cfg = Dinov2Config::from_json(&text, "config.json").unwrap();
    let weights = dinov2_weights(&files.weights).unwrap();
    let b = ModelBuilder::new(weights, TuningPlan::default(), DType::F32, Device::Cpu).unwrap();
    let model = Dinov2Model::new(&cfg, &b).unwrap();
    for size in ["16x16", "24x20", "8x12", "32x8"] {
        let px = &f[&format!("pixel_values_{size}")];
        let (h, pooled) = model.forward_pooled(px, false).unwrap();
        check(
            &format!("dinov2 last_hidden_state {size}"),
            &h,
            &f[&format!("last_hidden_state_{size}")],
        );
        check(
            &format!("dinov2 pooler_output {size}"),
            &pooled,
            &f[&format!("pooler_output_{size}")],
        );
    }
}

#[test]
fn dinov2_classifier_matches_transformers() {
    let f = load("dinov2.safetensors");
    let model = dinov2_image_classifier(
        &files("dinov2_tiny"),
        plan(None),
        4,
        &Device::Cpu,
        DType::F32,
    )
    .unwrap();
    model
        .set_classifier(&f["classifier.weight"], &f["classifier.bias"])
        .unwrap();
    for size in ["16x16", "24x20", "8x12", "32x8"] {
        let logits = model
            .forward(&f[&format!("pixel_values_{size}")], false)
            .unwrap();
        check(
            &format!("dinov2 logits {size}"),
            &logits,
            &f[&format!("logits_{size}")],
        );
    }
}

/// Loads peft's adapter `case` and checks the logits unmerged, merged, unmerged again, then
/// disabled: peft's `disable_adapter()` runs the base model with the ORIGINAL classifier, so the
/// base head `(weight, bias)` is put in for that (the adapter's head is lost afterwards).
fn check_lora(
    case: &str,
    parts: &peft_core::TunedParts,
    forward: impl Fn(&str) -> Tensor,
    set_head: impl Fn(&Tensor, &Tensor),
    base_head: (&Tensor, &Tensor),
) {
    adapter_io::load_weights(&fixtures().join(case), &parts.params).unwrap();
    let f = load(&format!("{case}.safetensors"));
    let sizes = ["16x16", "24x20"];
    let registry = &parts.registry;
    let expect = |what: &str, key: &str| {
        for size in sizes {
            check(
                &format!("{case} {what} {size}"),
                &forward(size),
                &f[&format!("{key}_{size}")],
            );
        }
    };
    expect("logits", "logits");
    registry.merge().unwrap();
    expect("merged logits", "merged_logits");
    registry.unmerge().unwrap();
    expect("logits unmerged again", "logits");
    registry.disable().unwrap();
    set_head(base_head.0, base_head.1);
    expect("disabled (base) logits", "base_logits");
    registry.enable();
}

#[test]
fn peft_lora_on_vit_gives_peft_logits() {
    let dir = fixtures().join("vit_lora");
    let (adapter, _) = adapter_io::read_config(&dir).unwrap();
    let base_files = files("vit_tiny");
    let model = vit_image_classifier(
        &base_files,
        plan(Some(adapter)),
        5,
        &Device::Cpu,
        DType::F32,
    )
    .unwrap();
    let f = load("vit_lora.safetensors");
    let checkpoint = candle_core::safetensors::load(&base_files.weights[0], &Device::Cpu).unwrap();
    check_lora(
        "vit_lora",
        &model.parts,
        |size| {
            let px = &f[&format!("pixel_values_{size}")];
            model.forward_with(px, size != "16x16", false).unwrap()
        },
        |w, b| model.set_classifier(w, b).unwrap(),
        (
            &checkpoint["classifier.weight"],
            &checkpoint["classifier.bias"],
        ),
    );
}

#[test]
fn peft_lora_on_dinov2_with_conv_gives_peft_logits() {
    let dir = fixtures().join("dinov2_lora");
    let (adapter, _) = adapter_io::read_config(&dir).unwrap();
    let model = dinov2_image_classifier(
        &files("dinov2_tiny"),
        plan(Some(adapter)),
        4,
        &Device::Cpu,
        DType::F32,
    )
    .unwrap();
    let conv = "dinov2.embeddings.patch_embeddings.projection.lora_A.weight";
    assert!(
        model.parts.params.get(conv).is_some(),
        "LoRA on the patch Conv2d"
    );
    let f = load("dinov2_lora.safetensors");
    let head = load("dinov2.safetensors");
    check_lora(
        "dinov2_lora",
        &model.parts,
        |size| {
            model
                .forward(&f[&format!("pixel_values_{size}")], false)
                .unwrap()
        },
        |w, b| model.set_classifier(w, b).unwrap(),
        (&head["classifier.weight"], &head["classifier.bias"]),
    );
}

#[test]
fn lora_plan_trains_only_the_adapter_and_the_head() {
    let dir = fixtures().join("dinov2_lora");
    let (adapter, _) = adapter_io::read_config(&dir).unwrap();
    let model = dinov2_image_classifier(
        &files("dinov2_tiny"),
        plan(Some(adapter)),
        4,
        &Device::Cpu,
        DType::F32,
    )
    .unwrap();
    let vars = model.parts.params.named_vars();
    let mut names: Vec<String> = vars.iter().map(|(n, _)| n.clone()).collect();
    names.sort();
    let mut expected = vec![
        "classifier.bias".to_string(),
        "classifier.weight".to_string(),
    ];
    let mut modules = vec!["dinov2.embeddings.patch_embeddings.projection".to_string()];
    for i in 0..2 {
        for p in ["q_proj", "v_proj"] {
            modules.push(format!("dinov2.encoder.layer.{i}.attention.{p}"));
        }
    }
    for m in modules {
        expected.push(format!("{m}.lora_A.weight"));
        expected.push(format!("{m}.lora_B.weight"));
    }
    expected.sort();
    assert_eq!(names, expected);
    // A training step reaches every trainable tensor (the conv LoRA and the head included).
    adapter_io::load_weights(&dir, &model.parts.params).unwrap();
    let f = load("dinov2_lora.safetensors");
    let loss = model
        .forward(&f["pixel_values_24x20"], true)
        .unwrap()
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap();
    let grads = loss.backward().unwrap();
    for (name, var) in vars {
        let g = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("{name}: no gradient"));
        let norm = g
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(
            norm > 0.0 && norm.is_finite(),
            "{name}: gradient norm {norm}"
        );
    }
}

#[test]
fn bad_inputs_and_configs_are_named_errors() {
    let model = dinov2_image_classifier(
        &files("dinov2_tiny"),
        plan(None),
        4,
        &Device::Cpu,
        DType::F32,
    )
    .unwrap();
    let config_key = |e: PeftError| match e {
        PeftError::Config { key, message } => (key, message),
        other => panic!("not a config error: {other}"),
    };
    let px = |dims: &[usize]| Tensor::zeros(dims, DType::F32, &Device::Cpu).unwrap();
    let (key, message) = config_key(model.forward(&px(&[1, 4, 16, 16]), false).unwrap_err());
    assert_eq!(key, "pixel_values");
    assert!(message.contains("expected 3 channels"), "{message}");
    let (key, message) = config_key(model.forward(&px(&[1, 3, 16, 18]), false).unwrap_err());
    assert_eq!(key, "pixel_values");
    assert!(message.contains("patch size 4"), "{message}");
    let (key, _) = config_key(model.forward(&px(&[3, 16, 16]), false).unwrap_err());
    assert_eq!(key, "pixel_values");

    let vit = std::fs::read_to_string(files("vit_tiny").config).unwrap();
    let dino = std::fs::read_to_string(files("dinov2_tiny").config).unwrap();
    let edit = |text: &str, key: &str, value: serde_json::Value| {
        let mut v: serde_json::Value = serde_json::from_str(text).unwrap();
        v[key] = value;
        v.to_string()
    };
    let refused = [
        (
            ViTConfig::from_json(&edit(&vit, "hidden_act", "relu".into()), "c").err(),
            "hidden_act",
        ),
        (
            ViTConfig::from_json(&edit(&vit, "patch_size", 5.into()), "c").err(),
            "image_size",
        ),
        (
            ViTConfig::from_json(&edit(&vit, "image_size", serde_json::json!([16, 8])), "c").err(),
            "image_size",
        ),
        (
            ViTConfig::from_json(&edit(&vit, "num_attention_heads", 5.into()), "c").err(),
            "num_attention_heads",
        ),
        (
            ViTConfig::from_json(&edit(&vit, "model_type", "deit".into()), "c").err(),
            "model_type",
        ),
        (
            ViTConfig::from_json(&edit(&vit, "qkv_bias", "yes".into()), "c").err(),
            "qkv_bias",
        ),
        (
            Dinov2Config::from_json(&edit(&dino, "use_swiglu_ffn", true.into()), "c").err(),
            "use_swiglu_ffn",
        ),
        (
            Dinov2Config::from_json(&edit(&dino, "drop_path_rate", 1.5.into()), "c").err(),
            "drop_path_rate",
        ),
    ];
    for (err, want) in refused {
        let (key, message) = config_key(err.expect("refused"));
        assert_eq!(key, want, "{message}");
    }
    assert!(
        ViTConfig::from_json(&edit(&vit, "image_size", serde_json::json!([16, 16])), "c").is_ok()
    );
}
