//! Merging ViT and DINOv2 adapters into plain Hugging Face checkpoints: models with the LoRA
//! configs of peft's fixtures (tests/fixtures/vit; DINOv2's with LoRA on the patch Conv2d), a new
//! head and some base tensors trained outright, every trainable tensor moved off its value, are merged with `write_merged_hf_image_classifier`; the
//! folder has transformers 4's key names and the classifier's config, and the model the crate's
//! own loader builds from it (no adapter) gives the adapted model's logits (1e-4 max abs). The
//! Python side (transformers loading the same kind of folder) is scripts/check-peft-interop.sh.
//! Run with `--nocapture` to see the measured differences.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use peft_core::test_utils::max_abs_diff as max_diff;
use peft_core::{adapter_io, AdapterConfig, PeftError, PromptTuningConfig, TunedParts, TuningPlan};
use peft_models::{
    dinov2_image_classifier, dinov2_onnx_image_classifier, resolve_model, vit_image_classifier,
    write_merged_hf_image_classifier, write_merged_onnx_dinov2_classifier, ModelFiles,
};
use tempfile::TempDir;

const TOL: f32 = 1e-4;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/vit")
}

fn files(dir: &Path) -> ModelFiles {
    resolve_model(dir.to_str().expect("utf-8 path")).expect("model folder")
}

fn pixels(fixture: &str, key: &str) -> Tensor {
    let f = candle_core::safetensors::load(fixtures().join(fixture), &Device::Cpu).unwrap();
    f[key].clone()
}

/// The plan of peft's adapter fixture `case`, also training `unfreeze` outright.
fn adapter_plan(case: &str, unfreeze: &[&str]) -> TuningPlan {
    let (adapter, _) = adapter_io::read_config(&fixtures().join(case)).unwrap();
    TuningPlan {
        adapter: Some(adapter),
        unfreeze: unfreeze.iter().map(|s| s.to_string()).collect(),
        seed: 3,
    }
}

/// Moves every trainable tensor off its value (LoRA's B off zero), so that the merge has LoRA,
/// the head and the unfrozen tensors to carry.
fn train_somewhat(parts: &TunedParts) {
    for (_, var) in parts.params.named_vars() {
        let noise = Tensor::randn(0f32, 0.1, var.dims(), &Device::Cpu).unwrap();
        var.set(&(var.as_tensor() + noise).unwrap()).unwrap();
    }
}

fn labels(n: usize) -> BTreeMap<String, String> {
    (0..n)
        .map(|i| (i.to_string(), format!("class_{i}")))
        .collect()
}

/// The merged folder's tensors, with the checks every merge must pass: no adapter keys, no key
/// in transformers 5.24's layout (`q_proj`, `layers.<i>`), the head and `expected` present.
fn merged_keys(out: &Path, expected: &[&str]) -> Vec<String> {
    let st = candle_core::safetensors::load(out.join("model.safetensors"), &Device::Cpu).unwrap();
    let keys: Vec<String> = st.keys().cloned().collect();
    for k in &keys {
        assert!(!k.contains("lora_"), "adapter key {k}");
        assert!(
            !k.contains("_proj.") && !k.contains(".layers."),
            "transformers 5 name {k}"
        );
        assert_eq!(st[k].dtype(), DType::F32, "{k}");
    }
    for e in ["classifier.weight", "classifier.bias"]
        .iter()
        .chain(expected)
    {
        assert!(keys.iter().any(|k| k == e), "no {e} in {keys:?}");
    }
    keys
}

fn merged_config(out: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap()
}

/// A copy of the fixture model `name` with a `preprocessor_config.json` beside it.
fn base_with_preprocessor(tmp: &Path, name: &str) -> PathBuf {
    let dir = tmp.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(fixtures().join(name).join(f), dir.join(f)).unwrap();
    }
    std::fs::write(
        dir.join("preprocessor_config.json"),
        r#"{"image_processor_type": "ViTImageProcessor", "size": {"height": 16, "width": 16}}"#,
    )
    .unwrap();
    dir
}

/// The DINOv2 classifier the crate's loader builds from the merged folder `out` (no adapter,
/// 4 classes) gives `adapted` for `px` within [`TOL`].
fn assert_dinov2_folder_rebuilds(out: &Path, px: &Tensor, adapted: &Tensor, what: &str) {
    let plain = dinov2_image_classifier(
        &files(out),
        TuningPlan::default(),
        4,
        &Device::Cpu,
        DType::F32,
    )
    .unwrap();
    let d = max_diff(&plain.forward(px, false).unwrap(), adapted);
    eprintln!("{what} merged folder vs adapted model: max abs logits diff {d:.3e}");
    assert!(d < TOL, "merged {what} logits differ by {d}");
}

#[test]
fn merged_vit_folder_rebuilds_the_adapted_model() {
    let tmp = TempDir::new().unwrap();
    let base = files(&base_with_preprocessor(tmp.path(), "vit_tiny"));
    let plan = adapter_plan(
        "vit_lora",
        &[
            r"vit\.layers\.1\.layernorm_after\..*",
            r".*position_embeddings",
        ],
    );
    let model = vit_image_classifier(&base, plan, 5, &Device::Cpu, DType::F32).unwrap();
    train_somewhat(&model.parts);
    let px = pixels("vit_lora.safetensors", "pixel_values_16x16");
    let adapted = model.forward(&px, false).unwrap();

    let out = tmp.path().join("merged");
    let n = write_merged_hf_image_classifier(&model.parts, &base, &labels(5), None, &out).unwrap();
    let keys = merged_keys(
        &out,
        &[
            "vit.embeddings.cls_token",
            "vit.embeddings.position_embeddings",
            "vit.embeddings.patch_embeddings.projection.weight",
            "vit.encoder.layer.1.attention.attention.query.weight",
            "vit.encoder.layer.1.attention.attention.value.bias",
            "vit.encoder.layer.1.attention.output.dense.weight",
            "vit.encoder.layer.1.intermediate.dense.weight",
            "vit.encoder.layer.1.output.dense.bias",
            "vit.encoder.layer.1.layernorm_after.weight",
            "vit.layernorm.bias",
        ],
    );
    assert_eq!(keys.len(), n);
    // Every tensor of the base checkpoint, under the same names (no pooler in the fixture).
    let base_keys = candle_core::safetensors::load(&base.weights[0], &Device::Cpu).unwrap();
    let mut expected: Vec<&String> = base_keys.keys().collect();
    expected.sort();
    let mut keys: Vec<&String> = keys.iter().collect();
    keys.sort();
    assert_eq!(keys, expected);
    let config = merged_config(&out);
    assert_eq!(
        config["architectures"],
        serde_json::json!(["ViTForImageClassification"])
    );
    assert_eq!(config["num_labels"], 5);
    assert_eq!(config["id2label"]["4"], "class_4");
    assert_eq!(config["label2id"]["class_2"], 2);
    assert_eq!(config["hidden_size"], 32, "the base config is kept");
    assert!(out.join("preprocessor_config.json").is_file());

    let plain = vit_image_classifier(
        &files(&out),
        TuningPlan::default(),
        5,
        &Device::Cpu,
        DType::F32,
    )
    .unwrap();
    let d = max_diff(&plain.forward(&px, false).unwrap(), &adapted);
    eprintln!("vit merged folder vs adapted model: max abs logits diff {d:.3e}");
    assert!(d < TOL, "merged ViT logits differ by {d}");
}

#[test]
fn merged_dinov2_folder_rebuilds_the_adapted_model() {
    let tmp = TempDir::new().unwrap();
    let base = files(&fixtures().join("dinov2_tiny"));
    let plan = adapter_plan(
        "dinov2_lora",
        &[r".*layer_scale2\.lambda1", r"dinov2\.embeddings\.cls_token"],
    );
    let model = dinov2_image_classifier(&base, plan, 4, &Device::Cpu, DType::F32).unwrap();
    train_somewhat(&model.parts);
    let px = pixels("dinov2_lora.safetensors", "pixel_values_24x20");
    let adapted = model.forward(&px, false).unwrap();

    let out = tmp.path().join("merged");
    write_merged_hf_image_classifier(&model.parts, &base, &labels(4), None, &out).unwrap();
    merged_keys(
        &out,
        &[
            "dinov2.embeddings.mask_token",
            "dinov2.embeddings.patch_embeddings.projection.weight",
            "dinov2.encoder.layer.0.attention.attention.key.weight",
            "dinov2.encoder.layer.0.attention.output.dense.bias",
            "dinov2.encoder.layer.0.mlp.fc1.weight",
            "dinov2.encoder.layer.0.layer_scale2.lambda1",
            "dinov2.layernorm.weight",
        ],
    );
    let config = merged_config(&out);
    assert_eq!(
        config["architectures"],
        serde_json::json!(["Dinov2ForImageClassification"])
    );
    assert_eq!(config["num_labels"], 4);
    assert!(!out.join("preprocessor_config.json").exists());

    assert_dinov2_folder_rebuilds(&out, &px, &adapted, "dinov2");
}

/// A DINOv2 read out of an ONNX graph (tests/fixtures/dinov2_onnx: the dinov2_tiny weights
/// inside a wrapper with a decoder) merges into the same Hugging Face folder, with a config.json
/// made from the graph that the crate's own DINOv2 loader reads back.
#[test]
fn merged_onnx_dinov2_folder_rebuilds_the_adapted_model() {
    let tmp = TempDir::new().unwrap();
    let graph = fixtures().join("../dinov2_onnx/tiny_eager.onnx");
    let plan = adapter_plan("dinov2_lora", &[r".*layer_scale2\.lambda1"]);
    let model = dinov2_onnx_image_classifier(&graph, plan, 4, &Device::Cpu, DType::F32).unwrap();
    train_somewhat(&model.parts);
    let px = pixels("dinov2_lora.safetensors", "pixel_values_24x20");
    let adapted = model.forward(&px, false).unwrap();

    let out = tmp.path().join("merged");
    let preprocessor = serde_json::json!({"image_processor_type": "BitImageProcessor"});
    write_merged_onnx_dinov2_classifier(
        &model.parts,
        &graph,
        &labels(4),
        Some(&preprocessor),
        &out,
    )
    .unwrap();
    let written: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out.join("preprocessor_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(written, preprocessor);
    merged_keys(
        &out,
        &[
            "dinov2.embeddings.position_embeddings",
            "dinov2.encoder.layer.1.attention.attention.query.weight",
            "dinov2.encoder.layer.0.layer_scale2.lambda1",
            "dinov2.layernorm.weight",
        ],
    );
    let config = merged_config(&out);
    assert_eq!(config["model_type"], "dinov2");
    assert_eq!(
        config["architectures"],
        serde_json::json!(["Dinov2ForImageClassification"])
    );
    assert_eq!(
        (&config["hidden_size"], &config["num_attention_heads"]),
        (&serde_json::json!(32), &serde_json::json!(4))
    );
    assert_eq!(config["use_mask_token"], false);
    assert!(
        config["mlp_ratio"].is_u64(),
        "transformers 5.24 wants an int"
    );

    assert_dinov2_folder_rebuilds(&out, &px, &adapted, "onnx dinov2");
}

/// ViT and DINOv2 offer no virtual tokens or hook points, so the methods without a merge are
/// refused when the model is built and never reach a merge; a base that is not a ViT/DINOv2 is
/// refused by its `model_type` before anything is written.
#[test]
fn refusals_name_the_cause_and_write_nothing() {
    let tmp = TempDir::new().unwrap();
    let base = files(&fixtures().join("vit_tiny"));
    let prompt = PromptTuningConfig {
        num_virtual_tokens: 2,
        prompt_tuning_init: Default::default(),
        prompt_tuning_init_text: None,
        tokenizer_name_or_path: None,
        init_token_ids: None,
    };
    let plan = TuningPlan {
        adapter: Some(AdapterConfig::PromptTuning(prompt)),
        ..Default::default()
    };
    let err = vit_image_classifier(&base, plan, 3, &Device::Cpu, DType::F32)
        .err()
        .expect("prompt tuning on a ViT is refused");
    assert!(err.to_string().contains("PROMPT_TUNING"), "{err}");

    let model = vit_image_classifier(
        &base,
        adapter_plan("vit_lora", &[]),
        5,
        &Device::Cpu,
        DType::F32,
    )
    .unwrap();
    let bert = files(&fixtures().join("../tiny-bert"));
    let out = tmp.path().join("merged");
    let err =
        write_merged_hf_image_classifier(&model.parts, &bert, &labels(5), None, &out).unwrap_err();
    assert!(
        matches!(&err, PeftError::Config { key, message } if key == "model_type"
            && message.contains("tiny-bert")),
        "{err}"
    );
    assert!(!out.exists(), "nothing is written on refusal");
}
