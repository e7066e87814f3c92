//! Writes a merged ViT and two merged DINOv2 classifiers (one read from a Hugging Face folder, one
//! from an ONNX graph), as `peft-rs merge` does, with the logits
//! peft-rs computes for them before merging: the tiny random models of tests/fixtures/vit with
//! the LoRA configs of peft's fixtures there (DINOv2's also on the patch Conv2d), a new head and a
//! few base tensors trained outright, every trainable tensor moved off its initial value.
//!
//!     cargo run --example export_merged_vision -- OUT_DIR
//!
//! gives `OUT_DIR/merged_{vit,dinov2,dinov2_onnx}/` and the matching
//! `OUT_DIR/<name>_logits.safetensors`
//! (`pixel_values`, `logits`). `scripts/check-peft-interop.sh` loads each folder in plain
//! transformers and compares the logits (tests/fixtures/vit/check_merged_vit.py).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use peft_core::{adapter_io, TunedParts, TuningPlan};
use peft_models::{
    dinov2_image_classifier, dinov2_onnx_image_classifier, resolve_model, vit_image_classifier,
    write_merged_hf_image_classifier, write_merged_onnx_dinov2_classifier,
};

const FIXTURES: &str = "tests/fixtures/vit";

/// The plan of peft's adapter fixture `case`, also training `unfreeze` outright.
fn plan(case: &str, unfreeze: &[&str]) -> Result<TuningPlan> {
    let (adapter, _) = adapter_io::read_config(&Path::new(FIXTURES).join(case))?;
    Ok(TuningPlan {
        adapter: Some(adapter),
        unfreeze: unfreeze.iter().map(|s| s.to_string()).collect(),
        seed: 5,
    })
}

/// Moves every trainable tensor off its value, so that the adapter changes the output.
fn perturb(parts: &TunedParts) -> Result<()> {
    for (_, var) in parts.params.named_vars() {
        let noise = Tensor::randn(0f32, 0.1, var.dims(), &Device::Cpu)?;
        var.set(&(var.as_tensor() + noise)?)?;
    }
    Ok(())
}

/// The pixels `key` of the fixture file `file`.
fn pixels(file: &str, key: &str) -> Result<Tensor> {
    let f = candle_core::safetensors::load(Path::new(FIXTURES).join(file), &Device::Cpu)?;
    f.get(key)
        .cloned()
        .with_context(|| format!("{file}: no {key}"))
}

/// Writes `OUT/<name>_logits.safetensors` and merges the model into `OUT/merged_<name>` (an
/// ONNX graph `base` is read as a DINOv2, any other as a Hugging Face model).
fn export(
    out: &Path,
    name: &str,
    base: &str,
    parts: &TunedParts,
    pixel_values: Tensor,
    logits: Tensor,
) -> Result<()> {
    let classes = logits.dim(1)?;
    let tensors = HashMap::from([("pixel_values", pixel_values), ("logits", logits)]);
    candle_core::safetensors::save(&tensors, out.join(format!("{name}_logits.safetensors")))?;
    let id2label: BTreeMap<String, String> = (0..classes)
        .map(|i| (i.to_string(), format!("class_{i}")))
        .collect();
    let merged = out.join(format!("merged_{name}"));
    if base.ends_with(".onnx") {
        write_merged_onnx_dinov2_classifier(parts, Path::new(base), &id2label, None, &merged)?;
    } else {
        write_merged_hf_image_classifier(parts, &resolve_model(base)?, &id2label, None, &merged)?;
    }
    println!("{}", merged.display());
    Ok(())
}

fn main() -> Result<()> {
    let out = PathBuf::from(
        std::env::args()
            .nth(1)
            .context("usage: export_merged_vision OUT_DIR")?,
    );
    std::fs::create_dir_all(&out)?;

    let base = format!("{FIXTURES}/vit_tiny");
    let unfreeze = [
        r"vit\.layers\.1\.layernorm_after\..*",
        r".*position_embeddings",
    ];
    let vit = vit_image_classifier(
        &resolve_model(&base)?,
        plan("vit_lora", &unfreeze)?,
        3,
        &Device::Cpu,
        DType::F32,
    )?;
    perturb(&vit.parts)?;
    let px = pixels("vit_lora.safetensors", "pixel_values_16x16")?;
    let logits = vit.forward(&px, false)?;
    export(&out, "vit", &base, &vit.parts, px, logits)?;

    let base = format!("{FIXTURES}/dinov2_tiny");
    let unfreeze = [r".*layer_scale2\.lambda1", r"dinov2\.embeddings\.cls_token"];
    let dinov2 = dinov2_image_classifier(
        &resolve_model(&base)?,
        plan("dinov2_lora", &unfreeze)?,
        6,
        &Device::Cpu,
        DType::F32,
    )?;
    perturb(&dinov2.parts)?;
    let px = pixels("dinov2_lora.safetensors", "pixel_values_24x20")?;
    let logits = dinov2.forward(&px, false)?;
    export(&out, "dinov2", &base, &dinov2.parts, px.clone(), logits)?;

    // The same weights read out of an ONNX graph (dinov2_tiny inside a wrapper, exported by
    // torch.onnx): the merged folder's config.json is made from the graph.
    let graph = "tests/fixtures/dinov2_onnx/tiny_eager.onnx";
    let onnx = dinov2_onnx_image_classifier(
        Path::new(graph),
        plan("dinov2_lora", &[r".*layer_scale2\.lambda1"])?,
        5,
        &Device::Cpu,
        DType::F32,
    )?;
    perturb(&onnx.parts)?;
    let logits = onnx.forward(&px, false)?;
    export(&out, "dinov2_onnx", graph, &onnx.parts, px, logits)
}
