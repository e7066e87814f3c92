//! `peft-rs merge`: fold the adapter into the base weights and write a plain checkpoint that
//! loads without peft: a Hugging Face `BertForTokenClassification`; for an image adapter on a
//! ViT or DINOv2, a Hugging Face `ViTForImageClassification` / `Dinov2ForImageClassification`
//! folder in the Hub's (transformers 4) key layout with the new head, the classes and an image
//! processor config for the adapter's preprocessing; for one on a
//! CNN, a torchvision state dict with the new head and the trained BatchNorm statistics.

use std::path::Path;

use anyhow::{bail, Context, Result};
use candle_core::Device;
use peft_train::ner::load_ner_adapter;
use peft_train::vision::load_image_adapter;

pub fn run(adapter: &Path, out: &Path, base: Option<&str>) -> Result<()> {
    if super::is_image_adapter(adapter)? {
        return run_image(adapter, out, base);
    }
    let ner = load_ner_adapter(adapter, base, &Device::Cpu)?;
    let n = peft_models::write_merged_token_classifier(
        &ner.model.parts,
        &ner.files,
        &ner.labels.to_id2label(),
        out,
    )
    .with_context(|| format!("merging {} into {}", adapter.display(), out.display()))?;
    println!(
        "merged {} adapted layers into {} ({n} tensors)",
        ner.model.parts.registry.adapted_paths().len(),
        out.display(),
    );
    Ok(())
}

fn run_image(adapter: &Path, out: &Path, base: Option<&str>) -> Result<()> {
    if base.is_some() {
        bail!("--base: an image adapter's base is the model its recipe named; leave it out");
    }
    let a = load_image_adapter(adapter, &Device::Cpu)?;
    let spec = &a.spec;
    let arch = spec.architecture.as_deref();
    // transformers' image processor for the preprocessing the adapter was trained with.
    let preprocessor = a.data.preprocess.hf_image_processor();
    let (n, layout) = if let Some(graph) = peft_models::onnx_graph(&spec.name, arch)? {
        let n = peft_models::write_merged_onnx_dinov2_classifier(
            a.model.parts(),
            graph,
            &a.meta.id2label,
            Some(&preprocessor),
            out,
        );
        let layout = format!("Hugging Face layout, DINOv2 read from {}", graph.display());
        (n, layout)
    } else if let Some((arch, weights)) = peft_models::cnn_checkpoint(&spec.name, arch)? {
        let stored = |key: &str| weights.load_stored(key);
        let n = peft_models::write_merged_image_classifier(
            a.model.parts(),
            &stored,
            arch,
            &a.meta.id2label,
            out,
        );
        (n, format!("torchvision {arch} layout"))
    } else {
        let files = peft_models::resolve_model(&spec.name)
            .with_context(|| format!("the base model of {}", adapter.display()))?;
        let n = peft_models::write_merged_hf_image_classifier(
            a.model.parts(),
            &files,
            &a.meta.id2label,
            Some(&preprocessor),
            out,
        );
        (n, "Hugging Face layout".to_string())
    };
    let n = n.with_context(|| format!("merging {} into {}", adapter.display(), out.display()))?;
    println!(
        "merged {} adapted layers into {} ({n} tensors, {layout})",
        a.model.parts().registry.adapted_paths().len(),
        out.display(),
    );
    Ok(())
}
