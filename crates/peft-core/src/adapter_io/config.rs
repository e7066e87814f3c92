//! `adapter_config.json` both ways: the fields every peft config has (here), and each method's
//! own fields (in its module, through [`PeftJson`]).

use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::{Map, Value};

use super::CONFIG_FILE;
use crate::error::{PeftError, Result};
use crate::methods::{
    AdapterConfig, BottleneckConfig, Ia3Config, LoraConfig, PrefixTuningConfig, PromptTuningConfig,
    SUPPORTED_PEFT_TYPES,
};
use crate::target::TargetModules;

/// The fields every peft `adapter_config.json` has that peft-rs reads.
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
    /// Modules trained and saved in full (task heads).
    #[serde(default)]
    pub modules_to_save: Option<Vec<String>>,
}

/// A parsed `adapter_config.json` with its path, for method modules to read their fields from;
/// every error names the file and the key.
pub struct PeftJson {
    path: PathBuf,
    map: Map<String, Value>,
}

impl PeftJson {
    /// Wraps the parsed object of the file at `path`.
    pub fn new(path: &Path, map: Map<String, Value>) -> Self {
        Self {
            path: path.to_path_buf(),
            map,
        }
    }

    /// An error about this file.
    pub fn error(&self, message: String) -> PeftError {
        PeftError::AdapterMismatch {
            path: self.path.clone(),
            message,
        }
    }

    fn present(&self, key: &str) -> Option<&Value> {
        self.map.get(key).filter(|v| !v.is_null())
    }

    /// The value of `key` as `T`; `None` when absent or null.
    pub fn get<T: serde::de::DeserializeOwned>(&self, key: &str) -> Result<Option<T>> {
        self.present(key)
            .map(|v| {
                serde_json::from_value(v.clone())
                    .map_err(|e| self.error(format!("key `{key}`: {e} (found {v})")))
            })
            .transpose()
    }

    /// The value of `key`, which must be there.
    pub fn need<T: serde::de::DeserializeOwned>(&self, key: &str) -> Result<T> {
        self.get(key)?
            .ok_or_else(|| self.error(format!("missing key `{key}`")))
    }

    /// A list that peft also accepts as a single item (`layers_to_transform`, `layers_pattern`).
    pub fn one_or_many<T: serde::de::DeserializeOwned>(&self, key: &str) -> Result<Option<Vec<T>>> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum OneOrMany<T> {
            One(T),
            Many(Vec<T>),
        }
        Ok(self.get::<OneOrMany<T>>(key)?.map(|v| match v {
            OneOrMany::One(t) => vec![t],
            OneOrMany::Many(v) => v,
        }))
    }

    /// Refuses a key whose value is set to something other than `allowed` (null, `false`, `{}`
    /// and absent count as unset), saying what is not supported.
    pub fn refuse_unless(&self, key: &str, allowed: &[Value], what: &str) -> Result<()> {
        let Some(v) = self.present(key) else {
            return Ok(());
        };
        let unset = matches!(v, Value::Bool(false))
            || v.as_object().is_some_and(|o| o.is_empty())
            || v.as_array().is_some_and(|a| a.is_empty());
        if unset || allowed.contains(v) {
            return Ok(());
        }
        Err(self.error(format!("`{key}` = {v}: {what} is not supported")))
    }

    /// `target_modules` (peft writes a set as a list; a string is a regex).
    pub fn targets(&self, key: &str) -> Result<TargetModules> {
        self.need(key)
    }
}

fn read_json(dir: &Path) -> Result<(PathBuf, Map<String, Value>, PeftConfigFile)> {
    let path = dir.join(CONFIG_FILE);
    let text = std::fs::read_to_string(&path).map_err(|e| PeftError::io(&path, e))?;
    let invalid =
        |e: serde_json::Error| PeftError::io(&path, format!("invalid adapter config: {e}"));
    let map: Map<String, Value> = serde_json::from_str(&text).map_err(invalid)?;
    let file: PeftConfigFile =
        serde_json::from_value(Value::Object(map.clone())).map_err(invalid)?;
    Ok((path, map, file))
}

/// The fields every `adapter_config.json` has, for any `peft_type`.
pub fn read_config_file(dir: &Path) -> Result<PeftConfigFile> {
    Ok(read_json(dir)?.2)
}

/// Reads `adapter_config.json` in `dir` and turns it into an adapter config, refusing what this
/// version cannot reproduce exactly.
pub fn read_config(dir: &Path) -> Result<(AdapterConfig, PeftConfigFile)> {
    let (path, map, file) = read_json(dir)?;
    let json = PeftJson::new(&path, map);
    let adapter = match file.peft_type.as_str() {
        "LORA" => AdapterConfig::Lora(LoraConfig::from_peft(&json)?),
        "IA3" => AdapterConfig::Ia3(Ia3Config::from_peft(&json)?),
        "BOTTLENECK" => AdapterConfig::Bottleneck(BottleneckConfig::from_peft(&json)?),
        "PREFIX_TUNING" => AdapterConfig::PrefixTuning(PrefixTuningConfig::from_peft(&json)?),
        "PROMPT_TUNING" => AdapterConfig::PromptTuning(PromptTuningConfig::from_peft(&json)?),
        other => {
            return Err(json.error(format!(
                "peft_type `{other}` is not supported; supported: {}",
                SUPPORTED_PEFT_TYPES.join(", ")
            )))
        }
    };
    adapter.validate().map_err(|e| json.error(format!("{e}")))?;
    Ok((adapter, file))
}

/// The `adapter_config.json` peft writes for `adapter`.
pub fn peft_config_json(
    adapter: &AdapterConfig,
    base_model: &str,
    task_type: &str,
    modules_to_save: &[String],
) -> Value {
    let mut m = match adapter {
        AdapterConfig::Lora(c) => c.to_peft(),
        AdapterConfig::Ia3(c) => c.to_peft(),
        AdapterConfig::Bottleneck(c) => c.to_peft(),
        AdapterConfig::PrefixTuning(c) => c.to_peft(),
        AdapterConfig::PromptTuning(c) => c.to_peft(),
    };
    let common = serde_json::json!({
        "auto_mapping": null,
        "base_model_name_or_path": base_model,
        "inference_mode": true,
        "modules_to_save": if modules_to_save.is_empty() { Value::Null } else { serde_json::json!(modules_to_save) },
        "peft_type": adapter.peft_type(),
        "revision": null,
        // peft accepts only its own task types; models it has none for (torchvision CNNs) save null.
        "task_type": (!task_type.is_empty()).then_some(task_type),
    });
    if let Value::Object(c) = common {
        m.extend(c);
    }
    // serde_json's map is sorted: the file is byte-stable.
    Value::Object(m)
}
