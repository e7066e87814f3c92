//! LoRA on Conv2d against Hugging Face peft 0.21.2 on a tiny CNN (3×3, 1×1 and strided 3×3
//! convolutions and a linear head; fixtures by tests/fixtures/methods/gen_conv_fixtures.py): peft's
//! adapter gives peft's logits unmerged, disabled and merged (max abs ≤ 1e-4), gradients match
//! central finite differences, and save/load round-trips.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor, D};
use peft_core::test_utils::max_abs_diff as max_diff;
use peft_core::{
    adapter_io, AdapterConfig, ConvGeometry, LoraConfig, ModelBuilder, TunableConv2d,
    TunableLinear, TunedParts, TuningPlan, WeightSource,
};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/methods")
}

struct TinyCnn {
    convs: [Arc<TunableConv2d>; 3],
    fc: Arc<TunableLinear>,
    parts: TunedParts,
}

impl TinyCnn {
    fn new(adapter: Option<AdapterConfig>) -> Self {
        let weights =
            WeightSource::from_safetensors(&[fixtures().join("tiny_cnn.safetensors")]).unwrap();
        let plan = TuningPlan {
            adapter,
            unfreeze: vec![],
            seed: 1,
        };
        let b = ModelBuilder::new(weights, plan, DType::F32, Device::Cpu).unwrap();
        let same = ConvGeometry {
            groups: 1,
            padding: 1,
            stride: 1,
        };
        let one = ConvGeometry {
            groups: 1,
            padding: 0,
            stride: 1,
        };
        let down = ConvGeometry {
            groups: 1,
            padding: 1,
            stride: 2,
        };
        let convs = [
            b.conv2d(3, 8, 3, same, true, "conv1").unwrap(),
            b.conv2d(8, 16, 1, one, false, "conv2").unwrap(),
            b.conv2d(16, 16, 3, down, true, "conv3").unwrap(),
        ];
        let fc = b.linear(16, 4, true, "fc").unwrap();
        Self {
            convs,
            fc,
            parts: b.parts().unwrap(),
        }
    }

    fn forward(&self, x: &Tensor, train: bool) -> Tensor {
        self.forward_with(x, train, |t| t.relu())
    }

    /// The network with another activation (the gradient check uses a smooth one: ReLU's kinks
    /// break finite differences).
    fn forward_with(
        &self,
        x: &Tensor,
        train: bool,
        act: impl Fn(&Tensor) -> candle_core::Result<Tensor>,
    ) -> Tensor {
        let mut h = x.clone();
        for c in &self.convs {
            h = act(&c.forward(&h, train).unwrap()).unwrap();
        }
        let pooled = h.mean(D::Minus1).unwrap().mean(D::Minus1).unwrap();
        self.fc.forward(&pooled, train).unwrap()
    }
}

fn lora() -> AdapterConfig {
    AdapterConfig::Lora(LoraConfig::new(2, 4.0, &["conv1", "conv2", "conv3", "fc"]))
}

fn load(name: &str) -> std::collections::HashMap<String, Tensor> {
    candle_core::safetensors::load(fixtures().join(name), &Device::Cpu).unwrap()
}

#[test]
fn base_model_matches_torch() {
    let f = load("tiny_cnn.safetensors");
    let m = TinyCnn::new(None);
    let d = max_diff(&m.forward(&f["x"], false), &f["base_logits"]);
    assert!(d < 1e-5, "base logits differ from torch by {d}");
}

#[test]
fn peft_conv_lora_gives_peft_logits_unmerged_disabled_and_merged() {
    let f = load("lora_conv.safetensors");
    let dir = fixtures().join("lora_conv");
    let (config, _) = adapter_io::read_config(&dir).unwrap();
    let m = TinyCnn::new(Some(config));
    adapter_io::load_weights(&dir, &m.parts.params).unwrap();
    let x = &f["x"];
    let d = max_diff(&m.forward(x, false), &f["logits"]);
    assert!(d < 1e-4, "logits differ from peft's by {d}");
    m.parts.registry.disable().unwrap();
    let d = max_diff(&m.forward(x, false), &f["base_logits"]);
    assert!(d < 1e-4, "disabled logits differ from the base by {d}");
    m.parts.registry.enable();
    m.parts.registry.merge().unwrap();
    let d = max_diff(&m.forward(x, false), &f["merged_logits"]);
    assert!(d < 1e-4, "merged logits differ from peft's by {d}");
    m.parts.registry.unmerge().unwrap();
    let d = max_diff(&m.forward(x, false), &f["logits"]);
    assert!(d < 1e-4, "unmerged again: {d}");
}

/// Central differences (h = 1e-2, f64 sums, the network with tanh for ReLU) on three
/// coordinates of every conv adapter tensor:
/// |autograd − numeric| ≤ 1e-3 + 1e-2·|numeric|.
#[test]
fn conv_lora_gradients_match_finite_differences() {
    let f = load("lora_conv.safetensors");
    let m = TinyCnn::new(Some(lora()));
    for (i, (_, v)) in m.parts.params.named_vars().into_iter().enumerate() {
        let n = v.elem_count();
        let vals: Vec<f32> = (0..n)
            .map(|j| (((j * 31 + i * 17) % 23) as f32 / 23.0 - 0.5) * 0.6)
            .collect();
        v.set(&Tensor::from_vec(vals, v.dims(), &Device::Cpu).unwrap())
            .unwrap();
    }
    let x = &f["x"];
    let w = Tensor::new(
        &[[1f32, -0.5, 0.25, 2.0], [-1.0, 0.75, 0.5, -0.25]],
        &Device::Cpu,
    )
    .unwrap();
    let loss = |train: bool| -> Tensor {
        (m.forward_with(x, train, |t| t.tanh()) * &w)
            .unwrap()
            .sum_all()
            .unwrap()
    };
    let grads = loss(true).backward().unwrap();
    for (name, var) in m.parts.params.named_vars() {
        if !name.starts_with("conv") {
            continue;
        }
        let g = grads.get(var.as_tensor()).unwrap().flatten_all().unwrap();
        let g = g.to_vec1::<f32>().unwrap();
        let original = var.as_tensor().copy().unwrap();
        for idx in [0, g.len() / 2, g.len() - 1] {
            let at = |delta: f32| -> f64 {
                let mut v = original.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                v[idx] += delta;
                var.set(&Tensor::from_vec(v, original.dims(), &Device::Cpu).unwrap())
                    .unwrap();
                loss(false)
                    .to_dtype(DType::F64)
                    .unwrap()
                    .to_scalar::<f64>()
                    .unwrap()
            };
            let numeric = (at(1e-2) - at(-1e-2)) / 2e-2;
            var.set(&original).unwrap();
            let analytic = g[idx] as f64;
            assert!(
                (analytic - numeric).abs() <= 1e-3 + 1e-2 * numeric.abs(),
                "{name}[{idx}]: autograd {analytic}, finite difference {numeric}"
            );
        }
    }
}

#[test]
fn conv_lora_saves_and_loads_and_refuses_what_it_cannot_do() {
    let f = load("lora_conv.safetensors");
    let m = TinyCnn::new(Some(lora()));
    for (i, (_, v)) in m.parts.params.named_vars().into_iter().enumerate() {
        let t = (v.as_tensor() + (i as f64 + 1.0) * 0.01).unwrap();
        v.set(&t).unwrap();
    }
    let expected = m.forward(&f["x"], false);
    let dir = tempfile::tempdir().unwrap();
    adapter_io::save_named(dir.path(), &m.parts, "default", "tiny_cnn", "", None).unwrap();
    let (config, _) = adapter_io::read_config(dir.path()).unwrap();
    let fresh = TinyCnn::new(Some(config));
    adapter_io::load_weights(dir.path(), &fresh.parts.params).unwrap();
    assert!(max_diff(&fresh.forward(&f["x"], false), &expected) < 1e-6);

    let mut dora = LoraConfig::new(2, 4.0, &["conv1"]);
    dora.use_dora = true;
    let weights =
        WeightSource::from_safetensors(&[fixtures().join("tiny_cnn.safetensors")]).unwrap();
    let plan = TuningPlan {
        adapter: Some(AdapterConfig::Lora(dora)),
        unfreeze: vec![],
        seed: 1,
    };
    let b = ModelBuilder::new(weights, plan, DType::F32, Device::Cpu).unwrap();
    let geometry = ConvGeometry {
        groups: 1,
        padding: 1,
        stride: 1,
    };
    b.conv2d(3, 8, 3, geometry, true, "conv1").unwrap();
    let err = b.parts().unwrap_err().to_string();
    assert!(err.contains("conv1") && err.contains("DoRA"), "{err}");
}
