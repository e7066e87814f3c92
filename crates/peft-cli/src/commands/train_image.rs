//! `peft-rs train` for image classification: the recipe's `[images]` become loaders, its
//! `[model]` a CNN or ViT with the tuning plan, and the trained adapter a folder with its
//! BatchNorm statistics, classes and preprocessing.

use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result};
use peft_core::adapter_io::{self, AdapterMeta};
use peft_core::device::parse_device;
use peft_core::TuningPlan;
use peft_data::image::{ImageLoader, LoaderOptions, Mode};
use peft_train::tasks::image_classification::{evaluate_images, ImageClassification, ImageScores};
use peft_train::vision::{build_image_model, ImageModelSpec, TASK};
use peft_train::{TrainSummary, Trainer};

use crate::recipe::Recipe;

/// Images per evaluation batch.
const EVAL_BATCH: usize = 128;

fn loader(
    data: peft_data::image::ImageDataset,
    recipe: &Recipe,
    mode: Mode,
    batch_size: usize,
) -> Result<ImageLoader> {
    let images = recipe.images.as_ref().context("[images]")?;
    let options = LoaderOptions {
        batch_size,
        workers: images.workers.max(1),
        ..Default::default()
    };
    Ok(ImageLoader::new(
        data,
        images.preprocess.clone(),
        mode,
        recipe.train.seed,
        options,
    )?)
}

/// Trains an image-classification recipe; `started` is when the command began.
pub fn run(
    recipe_path: &Path,
    recipe: &Recipe,
    overrides: &[String],
    progress: bool,
    started: Instant,
) -> Result<()> {
    let device = parse_device(&recipe.model.device)?;
    let precision =
        super::apply_matmul_precision(&recipe.model.matmul_precision, "model.matmul_precision")?;
    tracing::info!(
        "products with frozen weights: {precision}; f32 GEMM: {}",
        peft_core::ops::f32_gemm_backend()
    );
    let images = recipe.images.as_ref().context("[images]")?;
    let seed = recipe.train.seed;
    let splits = images.splits(seed)?;
    let classes: Vec<String> = splits.classes().to_vec();
    let valid = splits.valid.clone().context("no validation split")?;
    tracing::info!(
        "data: {} train, {} valid, {} test images; {} classes",
        splits.train.len(),
        valid.len(),
        splits.test.as_ref().map_or(0, |t| t.len()),
        classes.len()
    );
    let spec = ImageModelSpec {
        name: recipe.model.name.clone(),
        architecture: recipe.model.architecture.clone(),
        dropout: recipe.model.dropout.unwrap_or(0.2),
        batch_norm: recipe.tuning.batch_norm,
    };
    let plan = TuningPlan {
        adapter: recipe.adapter.clone(),
        unfreeze: recipe.tuning.unfreeze.clone(),
        seed,
    };
    let model = build_image_model(&spec, plan, classes.len(), &device)?;
    let parts = model.parts();
    let trainable = parts.params.num_elements();
    tracing::info!(
        "model {}: {} adapted layers, {trainable} trainable parameters",
        spec.name,
        parts.registry.adapted_paths().len()
    );
    let train_loader = loader(
        splits.train.clone(),
        recipe,
        Mode::Train,
        recipe.train.batch_size,
    )?;
    let valid_loader = loader(valid, recipe, Mode::Eval, EVAL_BATCH)?;
    let task = ImageClassification::new(
        model.as_ref(),
        train_loader,
        valid_loader,
        classes.clone(),
        device.clone(),
    )
    .with_batch_norms(parts.registry.batch_norms());
    let trainer = Trainer::new(
        super::train::trainer_config(recipe, progress),
        parts.params.named_vars(),
    )?;
    let summary = trainer.fit(&task)?;
    // The best epoch's weights and BatchNorm statistics are back in the model: what the test
    // pass scores and the saved adapter carries.
    let test_scores = match &splits.test {
        Some(test) => {
            let l = loader(test.clone(), recipe, Mode::Eval, EVAL_BATCH)?;
            Some(evaluate_images(model.as_ref(), &l, &classes, &device)?)
        }
        None => None,
    };

    let mut settings = serde_json::Map::new();
    settings.insert("model".into(), serde_json::to_value(&spec)?);
    settings.insert("images".into(), serde_json::to_value(images)?);
    settings.insert("seed".into(), seed.into());
    let meta = AdapterMeta {
        base_model_fingerprint: parts.base_fingerprint.clone(),
        task: TASK.into(),
        unfreeze: recipe.tuning.unfreeze.clone(),
        id2label: classes
            .iter()
            .enumerate()
            .map(|(i, c)| (i.to_string(), c.clone()))
            .collect(),
        tokenizer: String::new(),
        settings,
    };
    let out = &recipe.output.adapter_dir;
    // peft has no task type for image classifiers: `task_type` is null, as peft writes for them.
    adapter_io::save(out, parts, &spec.name, "", &meta)?;
    let adapter_bytes = peft_core::fsio::folder_bytes(out)?;
    let has_batch_norms = !parts.registry.batch_norms().is_empty();
    write_card(
        out,
        recipe_path,
        overrides,
        &spec,
        has_batch_norms,
        trainable,
        adapter_bytes,
        &summary,
        test_scores.as_ref(),
        &classes,
    )?;
    let report = serde_json::json!({
        "recipe": recipe_path.display().to_string(),
        "overrides": overrides,
        "model": spec.name,
        "trainable_parameters": trainable,
        "adapter_dir": out.display().to_string(),
        "adapter_bytes": adapter_bytes,
        "train": summary,
        "test": test_scores,
        "wall_seconds": started.elapsed().as_secs_f64(),
        "peak_rss_bytes": peak_rss_bytes(),
    });
    let report_path = recipe.output.run_dir.join("summary.json");
    peft_core::fsio::write_atomic(
        &report_path,
        serde_json::to_string_pretty(&report)?.as_bytes(),
    )
    .with_context(|| format!("writing {}", report_path.display()))?;
    println!("adapter       {}", out.display());
    println!("trainable     {trainable} parameters");
    println!("adapter size  {adapter_bytes} bytes");
    if let Some(best) = &summary.best {
        println!(
            "valid acc     {:.4} (epoch {})",
            best.score, summary.best_epoch
        );
    }
    if let Some(s) = &test_scores {
        println!("test acc      {:.4} ({} images)", s.accuracy, s.images);
    }
    println!(
        "train time    {:.0} s ({:.0} images/s in training steps)",
        summary.train_seconds, summary.tokens_per_second
    );
    println!("run log       {}", recipe.output.run_dir.display());
    Ok(())
}

/// The process's peak resident memory (Linux `VmHWM`), if known.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

#[allow(clippy::too_many_arguments)]
fn write_card(
    dir: &Path,
    recipe: &Path,
    overrides: &[String],
    spec: &ImageModelSpec,
    has_batch_norms: bool,
    trainable: usize,
    adapter_bytes: u64,
    summary: &TrainSummary,
    test: Option<&ImageScores>,
    classes: &[String],
) -> Result<()> {
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    let mut s = format!(
        "# {name}\n\nAn image classifier on `{}`, trained by peft-rs from `{}`{}.\n\nClasses: {}\n\n",
        spec.name,
        recipe.display(),
        if overrides.is_empty() { String::new() } else { format!(" with `{}`", overrides.join(" ")) },
        classes.join(", ")
    );
    s.push_str("| | |\n| --- | --- |\n");
    s.push_str(&format!("| trainable parameters | {trainable} |\n"));
    s.push_str(&format!("| adapter size | {adapter_bytes} bytes |\n"));
    if has_batch_norms {
        s.push_str(&format!(
            "| BatchNorm while training | {:?} |\n",
            spec.batch_norm
        ));
    }
    if let Some(best) = &summary.best {
        s.push_str(&format!(
            "| validation accuracy (best epoch {}) | {:.4} |\n",
            summary.best_epoch, best.score
        ));
    }
    if let Some(t) = test {
        s.push_str(&format!(
            "| test accuracy ({} images) | {:.4} |\n",
            t.images, t.accuracy
        ));
    }
    s.push_str(&format!(
        "| training time | {:.0} s |\n\n",
        summary.train_seconds
    ));
    s.push_str("Use: `peft-rs eval --adapter <this folder>`, `peft-rs predict --adapter <this folder> image.png`.\n");
    peft_core::fsio::write_atomic(&dir.join("README.md"), s.as_bytes())?;
    Ok(())
}
