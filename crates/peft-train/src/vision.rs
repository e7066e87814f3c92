//! Image classification glue shared by the CLI and library users: where the images come from
//! (serialisable, stored with the adapter), building the model, and reloading a trained adapter.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use peft_core::adapter_io::{self, AdapterMeta};
use peft_core::BatchNormMode;
use peft_data::image::{
    read_idx_dir, read_image_csv, read_image_folder_splits, CsvColumns, ImageConfig, ImageSplits,
    FASHION_MNIST_CLASSES,
};
use peft_models::{image_classifier, ImageClassifier, ImageModelOptions};
use serde::{Deserialize, Serialize};

use crate::error::{Result, TrainError};

/// The task name stored in `peft_rs.json`.
pub const TASK: &str = "image_classification";

/// How a dataset is laid out on disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ImageFormat {
    /// MNIST-style IDX files (`train-*` and `t10k-*`, gzipped or raw) in a folder.
    Idx,
    /// One sub-folder per class, optionally under `train/`, `val/`, `test/`.
    Folder,
    /// A CSV of `path,label` (and optionally `split`) rows.
    Csv,
}

/// Where the images come from and how they are prepared (the recipe's `[images]` table).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageDataSpec {
    /// Layout on disk.
    pub format: ImageFormat,
    /// The IDX folder, the image folder root, or the CSV file.
    pub path: PathBuf,
    /// Class names for IDX data: a list, or `"fashion-mnist"` (default `"0"`..`"9"`).
    #[serde(default)]
    pub class_names: Option<ClassNames>,
    /// Fraction of the training split held out for validation when the data has no validation
    /// split (stratified, seeded).
    #[serde(default = "valid_fraction")]
    pub valid_fraction: f64,
    /// Use a stratified subset of this many training images (after the validation split).
    #[serde(default)]
    pub limit_train: Option<usize>,
    /// Use a stratified subset of this many validation images.
    #[serde(default)]
    pub limit_valid: Option<usize>,
    /// Use a stratified subset of this many test images (quick runs; the reported test accuracy
    /// is then on the subset).
    #[serde(default)]
    pub limit_test: Option<usize>,
    /// Decode/resize/crop/normalise/augment settings.
    #[serde(default)]
    pub preprocess: ImageConfig,
    /// Threads decoding and augmenting batches while the model trains.
    #[serde(default = "workers")]
    pub workers: usize,
}

fn valid_fraction() -> f64 {
    0.1
}
fn workers() -> usize {
    2
}

/// Class names given by name or as a list.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ClassNames {
    /// `"fashion-mnist"`.
    Preset(String),
    /// Explicit names in label order.
    List(Vec<String>),
}

impl ImageDataSpec {
    /// Reads the train/valid/test splits (validation held out from training when absent),
    /// applying the limits; `seed` draws the held-out and limited subsets.
    pub fn splits(&self, seed: u64) -> Result<ImageSplits> {
        let names: Option<Vec<String>> = match &self.class_names {
            None => None,
            Some(ClassNames::List(v)) => Some(v.clone()),
            Some(ClassNames::Preset(p)) if p == "fashion-mnist" => Some(
                FASHION_MNIST_CLASSES
                    .iter()
                    .map(|s| s.to_string())
                    .collect(),
            ),
            Some(ClassNames::Preset(p)) => {
                return Err(TrainError::config(
                    "images.class_names",
                    format!("unknown preset `{p}` (expected \"fashion-mnist\" or a list)"),
                ))
            }
        };
        let splits = match self.format {
            ImageFormat::Idx => {
                let refs: Option<Vec<&str>> = names
                    .as_ref()
                    .map(|v| v.iter().map(String::as_str).collect());
                read_idx_dir(&self.path, refs.as_deref())?
            }
            ImageFormat::Folder => read_image_folder_splits(&self.path)?,
            ImageFormat::Csv => read_image_csv(&self.path, &CsvColumns::default())?,
        };
        let mut splits = if splits.valid.is_none() {
            splits.with_valid_fraction(self.valid_fraction, seed)?
        } else {
            splits
        };
        if let Some(n) = self.limit_train {
            splits.train = splits.train.limit(n, seed)?;
        }
        if let (Some(n), Some(v)) = (self.limit_valid, &splits.valid) {
            splits.valid = Some(v.limit(n, seed)?);
        }
        if let (Some(n), Some(t)) = (self.limit_test, &splits.test) {
            splits.test = Some(t.limit(n, seed)?);
        }
        Ok(splits)
    }
}

/// The model side of an image recipe (stored with the adapter).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ImageModelSpec {
    /// `torchvision/mobilenet_v2`, a checkpoint file, or a Hugging Face ViT/DINOv2.
    pub name: String,
    /// The architecture of a checkpoint file.
    #[serde(default)]
    pub architecture: Option<String>,
    /// Dropout before the classifier.
    pub dropout: f32,
    /// What BatchNorm layers do while training.
    pub batch_norm: BatchNormMode,
}

/// Builds the classifier of `spec` for `classes` with `plan`.
pub fn build_image_model(
    spec: &ImageModelSpec,
    plan: peft_core::TuningPlan,
    classes: usize,
    device: &Device,
) -> Result<Box<dyn ImageClassifier>> {
    let options = ImageModelOptions {
        num_labels: classes,
        pretrained_head: false,
        batch_norm: spec.batch_norm,
        dropout: spec.dropout,
    };
    Ok(image_classifier(
        &spec.name,
        spec.architecture.as_deref(),
        plan,
        options,
        device,
        DType::F32,
    )?)
}

/// A trained image adapter loaded onto its base model.
pub struct ImageAdapter {
    /// The model with the adapter (and its BatchNorm statistics) loaded.
    pub model: Box<dyn ImageClassifier>,
    /// The base model it was built on.
    pub spec: ImageModelSpec,
    /// Class names in label order.
    pub classes: Vec<String>,
    /// The data it was trained on (paths and preprocessing).
    pub data: ImageDataSpec,
    /// What `peft_rs.json` holds.
    pub meta: AdapterMeta,
}

fn setting<T: serde::de::DeserializeOwned>(meta: &AdapterMeta, key: &str, dir: &Path) -> Result<T> {
    let v = meta.settings.get(key).cloned().ok_or_else(|| {
        TrainError::config(
            "adapter",
            format!("{}: peft_rs.json has no `{key}`", dir.display()),
        )
    })?;
    serde_json::from_value(v).map_err(|e| {
        TrainError::config(
            "adapter",
            format!("{}: peft_rs.json `{key}`: {e}", dir.display()),
        )
    })
}

/// Loads the adapter in `dir` onto the base model it names, checking the base fingerprint.
pub fn load_image_adapter(dir: &Path, device: &Device) -> Result<ImageAdapter> {
    let (plan, _) = adapter_io::read_plan(dir)?;
    let meta = adapter_io::read_meta(dir)?.ok_or_else(|| {
        TrainError::config(
            "adapter",
            format!(
                "{}: no {} (classes unknown); was it made by peft-rs?",
                dir.display(),
                adapter_io::META_FILE
            ),
        )
    })?;
    if meta.task != TASK {
        return Err(TrainError::config(
            "adapter",
            format!("{}: task `{}` is not {TASK}", dir.display(), meta.task),
        ));
    }
    let spec: ImageModelSpec = setting(&meta, "model", dir)?;
    let data: ImageDataSpec = setting(&meta, "images", dir)?;
    let classes: Vec<String> = (0..meta.id2label.len())
        .map(|i| meta.id2label.get(&i.to_string()).cloned())
        .collect::<Option<_>>()
        .ok_or_else(|| {
            TrainError::config(
                "adapter",
                format!("{}: id2label is not 0..n", dir.display()),
            )
        })?;
    let model = build_image_model(&spec, plan, classes.len(), device)?;
    adapter_io::check_fingerprint(dir, &meta, model.parts())?;
    adapter_io::load_trained(dir, model.parts())?;
    Ok(ImageAdapter {
        model,
        spec,
        classes,
        data,
        meta,
    })
}
