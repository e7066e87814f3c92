//! Building task models from resolved model files and a tuning plan.

use candle_core::{DType, Device};
use peft_core::{ModelBuilder, PeftError, Result, TuningPlan, WeightSource};

use crate::bert::{BertConfig, BertForTokenClassification};
use crate::resolve::ModelFiles;

/// Reads the model's `config.json` as a BERT config.
pub fn read_bert_config(files: &ModelFiles) -> Result<BertConfig> {
    let text =
        std::fs::read_to_string(&files.config).map_err(|e| PeftError::io(&files.config, e))?;
    BertConfig::from_json(&text, &files.config.display().to_string()).map_err(|message| {
        PeftError::Config {
            key: "config.json".into(),
            message,
        }
    })
}

/// Builds `BertForTokenClassification` with `num_labels` outputs from the model's checkpoint,
/// applying `plan`, on `device`. Frozen weights and activations are in `dtype` (f32, or bf16 for
/// mixed precision); trainable weights, and so the adapter file and optimizer state, stay f32.
pub fn bert_token_classifier(
    files: &ModelFiles,
    plan: TuningPlan,
    num_labels: usize,
    device: &Device,
    dtype: DType,
) -> Result<BertForTokenClassification> {
    let cfg = read_bert_config(files)?;
    let weights = WeightSource::from_safetensors(&files.weights)?;
    let builder = ModelBuilder::new(weights, plan, dtype, device.clone())?;
    BertForTokenClassification::new(&cfg, num_labels, builder)
}
