//! The TOML recipe: model, task, data, adapter, tuning, training and output, each a table whose
//! keys are checked (a misspelt key is an error that lists the valid ones).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use peft_core::AdapterConfig;
use peft_train::ScheduleConfig;
use serde::Deserialize;

/// A whole recipe.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Recipe {
    /// The base model.
    pub model: ModelSection,
    /// The task.
    pub task: TaskSection,
    /// Text data (token classification).
    #[serde(default)]
    pub data: Option<DataSection>,
    /// Image data (image classification).
    #[serde(default)]
    pub images: Option<peft_train::vision::ImageDataSpec>,
    /// The adapter (absent: only the head and unfrozen parameters train).
    #[serde(default)]
    pub adapter: Option<AdapterConfig>,
    /// Whole parameters trained beside the adapter.
    #[serde(default)]
    pub tuning: TuningSection,
    /// Optimisation.
    pub train: TrainSection,
    /// Where results go.
    pub output: OutputSection,
}

/// `[model]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    /// Hugging Face id or local folder.
    pub name: String,
    /// `cpu` or `cuda:N`.
    #[serde(default = "default_device")]
    pub device: String,
    /// `f32`, or `bf16`: frozen weights and activations in bf16, trainable weights in f32.
    #[serde(default = "default_dtype")]
    pub dtype: String,
    /// `f32`, or `bf16`: products with frozen weights take bf16 operands and sum in f32 on
    /// the CPU's AMX tiles (f32 where the CPU has none); trainable weights stay f32.
    #[serde(default = "default_matmul_precision")]
    pub matmul_precision: String,
    /// The architecture of a checkpoint file (`mobilenet_v2`, `resnet50`, ...).
    #[serde(default)]
    pub architecture: Option<String>,
    /// Dropout before an image classifier's head (default 0.2, torchvision's MobileNetV2).
    #[serde(default)]
    pub dropout: Option<f32>,
}

fn default_dtype() -> String {
    "f32".into()
}

fn default_matmul_precision() -> String {
    "f32".into()
}

fn default_device() -> String {
    "cpu".into()
}

/// `[task]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskSection {
    /// `token_classification`.
    pub kind: TaskKind,
    /// Label every sub-token (else only the first of each word).
    #[serde(default)]
    pub label_all_subtokens: bool,
    /// Maximum sequence length in tokens, special tokens included.
    #[serde(default = "default_max_length")]
    pub max_length: usize,
}

fn default_max_length() -> usize {
    128
}

/// The tasks recipes can name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskKind {
    /// Per-token labels (NER).
    TokenClassification,
    /// One label per image.
    ImageClassification,
}

/// `[data]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataSection {
    /// `conll`.
    #[serde(default = "default_format")]
    pub format: String,
    /// Training split.
    pub train: PathBuf,
    /// Validation split.
    pub valid: PathBuf,
    /// Test split.
    pub test: Option<PathBuf>,
    /// `iob1`, `iob2` or `auto`.
    #[serde(default)]
    pub tag_scheme: peft_data::TagScheme,
    /// Use only the first N training sentences (quick runs).
    #[serde(default)]
    pub limit_train: Option<usize>,
}

fn default_format() -> String {
    "conll".into()
}

/// `[tuning]`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TuningSection {
    /// Full-match regexes over parameter names to train outright.
    #[serde(default)]
    pub unfreeze: Vec<String>,
    /// BatchNorm while training: `update` (batch statistics, running averages saved with the
    /// adapter; PyTorch's train mode) or `frozen` (the checkpoint's statistics).
    #[serde(default)]
    pub batch_norm: peft_core::BatchNormMode,
}

/// `[train]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainSection {
    /// Passes over the training data.
    pub epochs: usize,
    /// Sentences per optimiser micro-batch.
    pub batch_size: usize,
    /// Peak learning rate.
    pub lr: f64,
    /// Decoupled weight decay (not on biases and LayerNorm).
    #[serde(default)]
    pub weight_decay: f64,
    /// Learning-rate schedule.
    #[serde(default)]
    pub schedule: ScheduleConfig,
    /// Clip the global gradient norm to this (none when absent).
    #[serde(default)]
    pub max_grad_norm: Option<f64>,
    /// Micro-batches per optimiser step.
    #[serde(default = "one")]
    pub grad_accumulation: usize,
    /// Seed for initialisation, shuffling and dropout.
    #[serde(default)]
    pub seed: u64,
    /// Stop after this many epochs without a better validation score.
    #[serde(default)]
    pub early_stopping_patience: Option<usize>,
    /// Log the running loss every N optimiser steps.
    #[serde(default = "default_log_every")]
    pub log_every: usize,
}

fn one() -> usize {
    1
}
fn default_log_every() -> usize {
    20
}

/// `[output]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutputSection {
    /// The adapter folder written at the end (the best epoch's weights).
    pub adapter_dir: PathBuf,
    /// Logs, metrics, plots and checkpoints of the run.
    pub run_dir: PathBuf,
}

impl Recipe {
    /// Reads a recipe, applying `key.path=value` overrides before validation.
    pub fn load(path: &Path, overrides: &[String]) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read recipe {}", path.display()))?;
        let mut value: toml::Value =
            toml::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        for o in overrides {
            apply_override(&mut value, o).with_context(|| format!("--set {o}"))?;
        }
        // Deserialising from text (the recipe's own, or the overridden tree written back) gives
        // errors with the line, the key's table and a caret, not just the message.
        let (source, note) = if overrides.is_empty() {
            (text, "")
        } else {
            (toml::to_string(&value)?, " (after the --set overrides)")
        };
        let recipe: Recipe = toml::from_str(&source)
            .map_err(|e: toml::de::Error| anyhow::anyhow!("{}{note}: {e}", path.display()))?;
        recipe
            .validate()
            .with_context(|| format!("recipe {}", path.display()))?;
        Ok(recipe)
    }

    fn validate(&self) -> Result<()> {
        let t = &self.train;
        if t.epochs == 0 || t.batch_size == 0 || t.grad_accumulation == 0 {
            bail!("train.epochs, train.batch_size and train.grad_accumulation must be at least 1");
        }
        if !(t.lr > 0.0 && t.lr.is_finite()) {
            bail!("train.lr must be a positive number, got {}", t.lr);
        }
        match self.task.kind {
            TaskKind::TokenClassification => {
                if self.task.max_length < 3 {
                    bail!("task.max_length must leave room for [CLS], a token and [SEP]");
                }
                let Some(data) = &self.data else {
                    bail!("token classification needs a [data] table (train, valid, test files)");
                };
                if data.format != "conll" {
                    bail!(
                        "data.format `{}` is not supported (expected `conll`)",
                        data.format
                    );
                }
            }
            TaskKind::ImageClassification => {
                let Some(images) = &self.images else {
                    bail!(
                        "image classification needs an [images] table (format, path, preprocess)"
                    );
                };
                if self.data.is_some() {
                    bail!("[data] is for text tasks; image classification reads [images]");
                }
                if !(0.0..1.0).contains(&images.valid_fraction) {
                    bail!(
                        "images.valid_fraction must be in [0, 1), got {}",
                        images.valid_fraction
                    );
                }
                images.preprocess.validate()?;
            }
        }
        Ok(())
    }
}

/// Sets `a.b.c = value` in a TOML tree; the value is parsed as TOML (`3`, `1e-3`, `true`,
/// `["query"]`) or taken as a string.
fn apply_override(root: &mut toml::Value, assignment: &str) -> Result<()> {
    let (key, raw) = assignment
        .split_once('=')
        .context("expected key.path=value")?;
    let value = toml::from_str::<toml::Table>(&format!("v = {raw}"))
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_string()));
    let parts: Vec<&str> = key.trim().split('.').collect();
    let (last, parents) = parts.split_last().context("empty key")?;
    let mut node = root;
    for p in parents {
        let table = node
            .as_table_mut()
            .with_context(|| format!("`{p}` is not a table"))?;
        node = table
            .entry(p.to_string())
            .or_insert_with(|| toml::Value::Table(Default::default()));
    }
    node.as_table_mut()
        .with_context(|| format!("cannot set `{last}` inside a non-table"))?
        .insert(last.to_string(), value);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const RECIPE: &str = r#"
[model]
name = "m"
[task]
kind = "token_classification"
[data]
train = "t.txt"
valid = "v.txt"
[adapter]
method = "lora"
r = 8
lora_alpha = 16
target_modules = ["query", "value"]
[train]
epochs = 3
batch_size = 32
lr = 1e-3
[output]
adapter_dir = "a"
run_dir = "r"
"#;

    fn load(text: &str, sets: &[&str]) -> Result<Recipe> {
        let dir = tempfile::tempdir()?;
        let p = dir.path().join("r.toml");
        std::fs::write(&p, text)?;
        Recipe::load(&p, &sets.iter().map(|s| s.to_string()).collect::<Vec<_>>())
    }

    #[test]
    fn parses_and_applies_overrides() {
        let r = load(
            RECIPE,
            &["train.epochs=1", "model.name=other", "train.lr=5e-4"],
        )
        .unwrap();
        assert_eq!(
            (r.train.epochs, r.model.name.as_str(), r.train.lr),
            (1, "other", 5e-4)
        );
        let Some(AdapterConfig::Lora(l)) = r.adapter else {
            panic!("lora")
        };
        assert_eq!((l.r, l.lora_alpha), (8, 16.0));
    }

    #[test]
    fn misspelt_key_is_named_with_the_valid_ones() {
        let err = load(&RECIPE.replace("epochs = 3", "epoch = 3"), &[]).unwrap_err();
        let msg = format!("{err:#}");
        assert!(
            msg.contains("unknown field `epoch`") && msg.contains("epochs"),
            "{msg}"
        );
        let err = load(RECIPE, &["adapter.rank=4"]).unwrap_err();
        let msg = format!("{err:#}");
        assert!(
            msg.contains("`rank`") && msg.contains("lora_alpha"),
            "{msg}"
        );
    }

    #[test]
    fn unknown_method_lists_the_known_ones() {
        let err = load(&RECIPE.replace("\"lora\"", "\"lorra\""), &[]).unwrap_err();
        assert!(format!("{err:#}").contains("lora"), "{err:#}");
    }

    /// Every recipe the project ships parses, and its adapter and unfreeze patterns compile.
    #[test]
    fn shipped_recipes_parse_and_compile() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../recipes");
        let mut paths = vec![];
        for dir in [root.clone(), root.join("methods")] {
            for entry in std::fs::read_dir(&dir).unwrap() {
                let p = entry.unwrap().path();
                if p.extension().is_some_and(|e| e == "toml") {
                    paths.push(p);
                }
            }
        }
        assert!(paths.len() >= 15, "{paths:?}");
        for p in paths {
            let r = Recipe::load(&p, &[]).unwrap_or_else(|e| panic!("{}: {e:#}", p.display()));
            let plan = peft_core::TuningPlan {
                adapter: r.adapter,
                unfreeze: r.tuning.unfreeze,
                seed: r.train.seed,
            };
            peft_core::CompiledPlan::new(plan).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        }
    }

    #[test]
    fn missing_recipe_file_is_named() {
        let err = Recipe::load(Path::new("/no/such/recipe.toml"), &[]).unwrap_err();
        assert!(format!("{err:#}").contains("/no/such/recipe.toml"));
    }
}
