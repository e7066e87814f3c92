//! Adapter folders in Hugging Face peft's format: `adapter_config.json` plus
//! `adapter_model.safetensors` with peft's key names, and `peft_rs.json` for what inference needs
//! and peft does not store (labels, tokenizer, the base model's fingerprint).

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::error::{PeftError, Result};
use crate::fsio::{write_atomic, write_atomic_with};
use crate::params::ParamStore;
use crate::plan::{AdapterConfig, LoraConfig, LoraInit};
use crate::target::TargetModules;
use crate::TunedParts;

/// peft's prefix of every key in `adapter_model.safetensors`.
pub const KEY_PREFIX: &str = "base_model.model.";
/// The config file name peft uses.
pub const CONFIG_FILE: &str = "adapter_config.json";
/// The weights file name peft uses.
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";
/// Our side file.
pub const META_FILE: &str = "peft_rs.json";
/// The `peft_type`s this version reads.
pub const SUPPORTED_PEFT_TYPES: [&str; 1] = ["LORA"];

/// What peft-rs stores beside peft's files.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AdapterMeta {
    /// Digest of the frozen base weights the adapter was trained on.
    pub base_model_fingerprint: String,
    /// The task (`token_classification`, ...).
    pub task: String,
    /// Label names by id, as transformers writes `id2label` in config.json.
    #[serde(default)]
    pub id2label: BTreeMap<String, String>,
    /// Where the tokenizer comes from (a Hugging Face id or a folder).
    pub tokenizer: String,
    /// Task-specific settings inference needs (max length, label alignment, ...).
    #[serde(default)]
    pub settings: serde_json::Map<String, serde_json::Value>,
}

/// The fields of peft's `adapter_config.json` peft-rs reads; every other key is ignored.
#[derive(Clone, Debug, Deserialize)]
pub struct PeftConfigFile {
    /// `LORA`, `IA3`, ...
    pub peft_type: String,
    /// `TOKEN_CLS`, `SEQ_CLS`, ...
    #[serde(default)]
    pub task_type: Option<String>,
    /// The base model id or path.
    #[serde(default)]
    pub base_model_name_or_path: Option<String>,
    /// LoRA rank.
    #[serde(default)]
    pub r: Option<usize>,
    /// LoRA alpha.
    #[serde(default)]
    pub lora_alpha: Option<f64>,
    /// LoRA dropout.
    #[serde(default)]
    pub lora_dropout: Option<f32>,
    /// Target modules.
    #[serde(default)]
    pub target_modules: Option<TargetModules>,
    /// Layer indices (peft accepts an int or a list).
    #[serde(default)]
    pub layers_to_transform: Option<OneOrMany<usize>>,
    /// Layer list names (peft accepts a string or a list).
    #[serde(default)]
    pub layers_pattern: Option<OneOrMany<String>>,
    /// rsLoRA scaling.
    #[serde(default)]
    pub use_rslora: bool,
    /// DoRA (not yet supported).
    #[serde(default)]
    pub use_dora: bool,
    /// Transposed weights (GPT-2 Conv1D); not supported.
    #[serde(default)]
    pub fan_in_fan_out: bool,
    /// Which biases train (`none` only).
    #[serde(default)]
    pub bias: Option<String>,
    /// Modules trained and saved in full (task heads).
    #[serde(default)]
    pub modules_to_save: Option<Vec<String>>,
}

/// A value peft allows as one item or a list.
#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany<T> {
    /// One item.
    One(T),
    /// A list.
    Many(Vec<T>),
}

impl<T: Clone> OneOrMany<T> {
    fn into_vec(self) -> Vec<T> {
        match self {
            Self::One(t) => vec![t],
            Self::Many(v) => v,
        }
    }
}

/// Reads `adapter_config.json` and turns it into an adapter config, refusing what this version
/// cannot reproduce exactly.
pub fn read_config(dir: &Path) -> Result<(AdapterConfig, PeftConfigFile)> {
    let path = dir.join(CONFIG_FILE);
    let text = std::fs::read_to_string(&path).map_err(|e| PeftError::io(&path, e))?;
    let file: PeftConfigFile = serde_json::from_str(&text)
        .map_err(|e| PeftError::io(&path, format!("invalid adapter config: {e}")))?;
    let mismatch = |message: String| PeftError::AdapterMismatch {
        path: path.clone(),
        message,
    };
    if file.peft_type != "LORA" {
        return Err(mismatch(format!(
            "peft_type `{}` is not supported; supported: {}",
            file.peft_type,
            SUPPORTED_PEFT_TYPES.join(", ")
        )));
    }
    if file.use_dora {
        return Err(mismatch(
            "use_dora = true (DoRA) is not supported yet".into(),
        ));
    }
    if file.fan_in_fan_out {
        return Err(mismatch("fan_in_fan_out = true is not supported".into()));
    }
    if let Some(bias) = file.bias.as_deref().filter(|b| *b != "none") {
        return Err(mismatch(format!(
            "bias = `{bias}` is not supported (only `none`)"
        )));
    }
    let need = |key: &str| mismatch(format!("missing key `{key}`"));
    let cfg = LoraConfig {
        r: file.r.ok_or_else(|| need("r"))?,
        lora_alpha: file.lora_alpha.ok_or_else(|| need("lora_alpha"))?,
        lora_dropout: file.lora_dropout.unwrap_or(0.0),
        target_modules: file
            .target_modules
            .clone()
            .ok_or_else(|| need("target_modules"))?,
        layers_to_transform: file.layers_to_transform.clone().map(OneOrMany::into_vec),
        layers_pattern: file
            .layers_pattern
            .clone()
            .map(OneOrMany::into_vec)
            .unwrap_or_default(),
        use_rslora: file.use_rslora,
        init: LoraInit::Kaiming,
    };
    cfg.validate()?;
    Ok((AdapterConfig::Lora(cfg), file))
}

/// Reads `peft_rs.json`; `None` for adapters made by Python peft, which have none.
pub fn read_meta(dir: &Path) -> Result<Option<AdapterMeta>> {
    let path = dir.join(META_FILE);
    if !path.exists() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&path).map_err(|e| PeftError::io(&path, e))?;
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| PeftError::io(&path, format!("invalid peft-rs metadata: {e}")))
}

/// Refuses an adapter trained on other base weights than the model's.
pub fn check_fingerprint(dir: &Path, meta: &AdapterMeta, parts: &TunedParts) -> Result<()> {
    if meta.base_model_fingerprint != parts.base_fingerprint {
        return Err(PeftError::AdapterMismatch {
            path: dir.to_path_buf(),
            message: format!(
                "it was trained on a different base model (fingerprint {} in {META_FILE}, but the \
                 loaded base weights give {})",
                meta.base_model_fingerprint, parts.base_fingerprint
            ),
        });
    }
    Ok(())
}

fn peft_config_json(
    adapter: &AdapterConfig,
    base_model: &str,
    task_type: &str,
    modules_to_save: &[String],
) -> serde_json::Value {
    let AdapterConfig::Lora(cfg) = adapter;
    serde_json::json!({
        "alpha_pattern": {},
        "auto_mapping": null,
        "base_model_name_or_path": base_model,
        "bias": "none",
        "fan_in_fan_out": false,
        "inference_mode": true,
        "init_lora_weights": match cfg.init { LoraInit::Kaiming => serde_json::json!(true), LoraInit::Gaussian => serde_json::json!("gaussian") },
        "layer_replication": null,
        "layers_pattern": if cfg.layers_pattern.is_empty() { serde_json::Value::Null } else { serde_json::json!(cfg.layers_pattern) },
        "layers_to_transform": cfg.layers_to_transform,
        "lora_alpha": cfg.lora_alpha,
        "lora_dropout": cfg.lora_dropout,
        "megatron_config": null,
        "megatron_core": "megatron.core",
        "modules_to_save": if modules_to_save.is_empty() { serde_json::Value::Null } else { serde_json::json!(modules_to_save) },
        "peft_type": adapter.peft_type(),
        "r": cfg.r,
        "rank_pattern": {},
        "revision": null,
        "target_modules": cfg.target_modules,
        "task_type": task_type,
        "use_dora": false,
        "use_rslora": cfg.use_rslora,
    })
}

/// Modules whose parameters all train outright (peft's `modules_to_save`): every module with a
/// trainable `weight` or `bias` that is not an adapter matrix.
pub fn modules_to_save(params: &ParamStore) -> Vec<String> {
    let mut mods: Vec<String> = params
        .named_vars()
        .into_iter()
        .filter(|(n, _)| !n.contains(".lora_"))
        .filter_map(|(n, _)| n.rsplit_once('.').map(|(m, _)| m.to_string()))
        .collect();
    mods.dedup();
    mods
}

/// Writes the adapter folder: peft's two files and `peft_rs.json`, each atomically.
pub fn save(
    dir: &Path,
    parts: &TunedParts,
    base_model: &str,
    task_type: &str,
    meta: &AdapterMeta,
) -> Result<()> {
    let adapter = parts
        .plan
        .adapter
        .as_ref()
        .ok_or_else(|| PeftError::Config {
            key: "adapter".into(),
            message: "the model has no adapter to save".into(),
        })?;
    std::fs::create_dir_all(dir).map_err(|e| PeftError::io(dir, e))?;
    let tensors: Vec<(String, Tensor)> = parts
        .params
        .named_vars()
        .into_iter()
        .map(|(n, v)| (format!("{KEY_PREFIX}{n}"), v.as_tensor().clone()))
        .collect();
    let weights = dir.join(WEIGHTS_FILE);
    write_atomic_with(&weights, |tmp| {
        let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
        safetensors::serialize_to_file(
            tensors.iter().map(|(n, t)| (n.as_str(), t)),
            Some(metadata),
            tmp,
        )
        .map_err(|e| PeftError::io(tmp, e))
    })?;
    let config = peft_config_json(
        adapter,
        base_model,
        task_type,
        &modules_to_save(&parts.params),
    );
    write_atomic(
        &dir.join(CONFIG_FILE),
        serde_json::to_string_pretty(&config)
            .unwrap_or_default()
            .as_bytes(),
    )?;
    let meta_text =
        serde_json::to_string_pretty(meta).map_err(|e| PeftError::io(dir.join(META_FILE), e))?;
    write_atomic(&dir.join(META_FILE), meta_text.as_bytes())
}

/// Loads `adapter_model.safetensors` into the model's parameters. Every tensor is checked
/// (presence, shape, no extras) before any parameter changes, so a bad file leaves the model as it
/// was.
pub fn load_weights(dir: &Path, params: &ParamStore) -> Result<()> {
    let path = dir.join(WEIGHTS_FILE);
    if !path.is_file() {
        return Err(PeftError::io(&path, "adapter weights file not found"));
    }
    // SAFETY: read-only mapping of a file we do not modify while it is mapped.
    let st = unsafe { MmapedSafetensors::new(&path) }.map_err(|e| {
        PeftError::io(
            &path,
            format!("not a valid safetensors file (truncated or corrupt?): {e}"),
        )
    })?;
    let mismatch = |message: String| PeftError::AdapterMismatch {
        path: path.clone(),
        message,
    };
    let mut updates = Vec::new();
    let vars = params.named_vars();
    for (name, var) in &vars {
        let key = format!("{KEY_PREFIX}{name}");
        let t = st.load(&key, &Device::Cpu).map_err(|_| {
            mismatch(format!(
                "tensor `{key}` is missing (the model has a trainable `{name}`)"
            ))
        })?;
        if t.dims() != var.dims() {
            return Err(mismatch(format!(
                "tensor `{key}` has shape {:?}, but the model expects {:?}",
                t.dims(),
                var.dims()
            )));
        }
        updates.push((
            var.clone(),
            t.to_dtype(DType::F32)?.to_device(var.device())?,
        ));
    }
    let known: std::collections::HashSet<String> = vars
        .iter()
        .map(|(n, _)| format!("{KEY_PREFIX}{n}"))
        .collect();
    if let Some((extra, _)) = st.tensors().into_iter().find(|(k, _)| !known.contains(k)) {
        return Err(mismatch(format!(
            "tensor `{extra}` has no counterpart in the model (targets or head differ)"
        )));
    }
    for (var, t) in updates {
        var.set(&t.to_dtype(var.dtype())?)?;
    }
    Ok(())
}
