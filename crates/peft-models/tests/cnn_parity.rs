//! MobileNetV2 and ResNet against torchvision on the same weights (fixtures and the script that
//! made them: tests/fixtures/vision/gen_cnn_fixtures.py, torch 2.15 / torchvision 0.29.2):
//! - MobileNetV2 with torchvision's real ImageNet checkpoint (read from its legacy .pth by our
//!   pickle reader): logits at 64×64 and 224×224 and the feature map in eval mode, logits in train
//!   mode (batch statistics) and the running statistics after that step;
//! - peft's LoRA adapter on every 1×1 convolution + a new 10-class head, unmerged and merged;
//! - ResNet-18/50 whose every tensor is given by a formula both sides compute (no weights in
//!   the fixture), logits and `layer1`.
//!
//! Tolerances: 1e-4 max abs on logits and features (f32), 1e-6 on running statistics. The real
//! checkpoint comes from scripts/setup-assets.sh; without it the MobileNetV2 tests pass with a
//! note, unless PEFT_RS_REQUIRE_ASSETS=1 (CI), where they fail.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Shape, Tensor};
use peft_core::test_utils::max_abs_diff as max_diff;
use peft_core::{adapter_io, BatchNormMode, ModelBuilder, TuningPlan, WeightSource};
use peft_models::{read_pth, ImageModelOptions, MobileNetV2, ResNet, ResNetDepth};

const TOL: f32 = 1e-4;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/vision")
}

fn load(name: &str) -> HashMap<String, Tensor> {
    let f = candle_core::safetensors::load(fixtures().join(name), &Device::Cpu).expect("fixture");
    f.into_iter()
        .map(|(k, v)| (k, v.to_dtype(DType::F32).expect("f32")))
        .collect()
}

fn mobilenet_checkpoint() -> Option<WeightSource> {
    let path = peft_models::torch_hub_checkpoints().join("mobilenet_v2-b0353104.pth");
    if !path.is_file() {
        if std::env::var("PEFT_RS_REQUIRE_ASSETS").is_ok_and(|v| v == "1") {
            panic!("{} is missing: run scripts/setup-assets.sh", path.display());
        }
        eprintln!(
            "skipping: {} is missing (scripts/setup-assets.sh)",
            path.display()
        );
        return None;
    }
    let tensors = read_pth(&path).expect("checkpoint");
    Some(WeightSource::Map(tensors.into_iter().collect()))
}

fn options(num_labels: usize, pretrained_head: bool) -> ImageModelOptions {
    ImageModelOptions {
        num_labels,
        pretrained_head,
        batch_norm: BatchNormMode::Update,
        dropout: 0.0,
    }
}

fn builder(weights: WeightSource, plan: TuningPlan) -> ModelBuilder {
    ModelBuilder::new(weights, plan, DType::F32, Device::Cpu).unwrap()
}

#[test]
fn mobilenet_v2_imagenet_matches_torchvision() {
    let Some(weights) = mobilenet_checkpoint() else {
        return;
    };
    let m = MobileNetV2::new(builder(weights, TuningPlan::default()), options(1000, true)).unwrap();
    let f = load("mobilenet_v2_imagenet.safetensors");
    let d = max_diff(&m.forward(&f["x64"], false).unwrap(), &f["logits64"]);
    assert!(d < TOL, "64×64 logits differ by {d}");
    let d = max_diff(&m.forward(&f["x224"], false).unwrap(), &f["logits224"]);
    assert!(d < TOL, "224×224 logits differ by {d}");
    // Before pooling (NCHW in the fixture); pooled features are its spatial mean.
    let pooled = f["features_out64"].mean((2, 3)).unwrap();
    let d = max_diff(&m.features(&f["x64"], false).unwrap(), &pooled);
    assert!(d < TOL, "pooled features differ by {d}");

    // Train mode: batch statistics, and the running averages move as PyTorch's.
    let bn = m
        .parts
        .registry
        .batch_norms()
        .into_iter()
        .find(|b| b.path() == "features.1.conv.0.1")
        .expect("bn");
    let (mean0, var0) = bn.running_stats();
    assert!(max_diff(&mean0, &f["running_mean_before"]) < 1e-7);
    assert!(max_diff(&var0, &f["running_var_before"]) < 1e-7);
    let d = max_diff(
        &m.forward(&f["x64_b4"], true).unwrap(),
        &f["logits64_train"],
    );
    assert!(d < TOL, "train-mode logits differ by {d}");
    let (mean, var) = bn.running_stats();
    assert!(max_diff(&mean, &f["running_mean_after"]) < 1e-6);
    assert!(max_diff(&var, &f["running_var_after"]) < 1e-6);
}

#[test]
fn peft_conv_lora_on_mobilenet_v2_gives_peft_logits_unmerged_and_merged() {
    let Some(weights) = mobilenet_checkpoint() else {
        return;
    };
    let dir = fixtures().join("mobilenet_v2_lora");
    let (adapter, _) = adapter_io::read_config(&dir).unwrap();
    let plan = TuningPlan {
        adapter: Some(adapter),
        ..Default::default()
    };
    let m = MobileNetV2::new(builder(weights, plan), options(10, false)).unwrap();
    adapter_io::load_weights(&dir, &m.parts.params).unwrap();
    assert_eq!(
        m.parts.registry.adapted_paths().len(),
        34,
        "every 1×1 convolution"
    );
    assert_eq!(
        m.parts.params.num_elements(),
        161_034,
        "peft's trainable count"
    );
    let f = load("mobilenet_v2_lora.safetensors");
    let d = max_diff(&m.forward(&f["x64"], false).unwrap(), &f["logits64_lora"]);
    assert!(d < TOL, "LoRA logits differ from peft's by {d}");
    m.parts.registry.merge().unwrap();
    let d = max_diff(&m.forward(&f["x64"], false).unwrap(), &f["logits64_merged"]);
    assert!(d < TOL, "merged logits differ from peft's by {d}");
    m.parts.registry.unmerge().unwrap();
    m.parts.registry.disable().unwrap();
    let d = max_diff(&m.forward(&f["x64"], false).unwrap(), &f["logits64_base"]);
    assert!(d < TOL, "disabled logits differ from peft's base by {d}");
}

/// The fixture script's formula: splitmix64 over (FNV-1a(name) + i), mapped per tensor kind.
fn formula(name: &str, shape: &Shape) -> peft_core::Result<Tensor> {
    let seed = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    });
    let dims = shape.dims();
    let fan_in: usize = dims.iter().skip(1).product();
    let values: Vec<f32> = (0..shape.elem_count() as u64)
        .map(|i| {
            let mut z = seed.wrapping_add(i).wrapping_add(0x9E37_79B9_7F4A_7C15);
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            let u = (z >> 11) as f64 * 2f64.powi(-53);
            let v = if name.ends_with("running_var") {
                0.5 + u
            } else if name.ends_with("running_mean") || (dims.len() == 1 && name.ends_with(".bias"))
            {
                0.2 * u - 0.1
            } else if dims.len() == 1 {
                0.8 + 0.4 * u
            } else {
                (2.0 * u - 1.0) * (3.0 / fan_in as f64).sqrt()
            };
            v as f32
        })
        .collect();
    Ok(Tensor::from_vec(values, shape.clone(), &Device::Cpu)?)
}

#[test]
fn formula_gives_the_fixture_scripts_values() {
    let text = std::fs::read_to_string(fixtures().join("formula_check.json")).unwrap();
    let doc: serde_json::Value = serde_json::from_str(&text).unwrap();
    for case in doc["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let shape: Vec<usize> = serde_json::from_value(case["shape"].clone()).unwrap();
        let ours = formula(name, &Shape::from(shape))
            .unwrap()
            .flatten_all()
            .unwrap();
        let ours = ours.to_vec1::<f32>().unwrap();
        let want: Vec<f32> = case["values"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap() as f32)
            .collect();
        assert_eq!(ours, want, "{name}");
    }
}

fn check_resnet(depth: &str) {
    let weights = WeightSource::Generated(Arc::new(formula));
    let m = ResNet::new(
        builder(weights, TuningPlan::default()),
        ResNetDepth::from_name(depth).unwrap(),
        options(1000, true),
    )
    .unwrap();
    let f = load(&format!("{depth}_formula.safetensors"));
    let d = max_diff(&m.forward(&f["x"], false).unwrap(), &f["logits"]);
    assert!(d < TOL, "{depth} logits differ by {d}");
    let l1 = m.layer1(&f["x"], false).unwrap(); // (b, h, w, c)
    let d = max_diff(&l1.mean((1, 2)).unwrap(), &f["layer1_mean"]);
    assert!(d < TOL, "{depth} layer1 mean differs by {d}");
    let tl8 = l1.narrow(1, 0, 8).unwrap().narrow(2, 0, 8).unwrap();
    let d = max_diff(&tl8.permute((0, 3, 1, 2)).unwrap(), &f["layer1_tl8"]);
    assert!(d < TOL, "{depth} layer1 differs by {d}");
}

#[test]
fn resnet18_matches_torchvision() {
    check_resnet("resnet18");
}

#[test]
fn resnet50_matches_torchvision() {
    check_resnet("resnet50");
}
