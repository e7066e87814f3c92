//! Config reading (every refusal naming its key) and checkpoint loading with transformers
//! 5.24's key conversion (the renaming itself is in `keys`), for ViT and DINOv2.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{Device, Tensor};
use peft_core::{PeftError, Result, TunedParts, WeightSource};
use serde_json::{Map, Value};

/// A configuration error about `key`.
pub(crate) fn config_error(key: &str, message: impl Into<String>) -> PeftError {
    PeftError::Config {
        key: key.into(),
        message: message.into(),
    }
}

/// Reads a `config.json` object field by field, so that every refusal names its key.
pub(crate) struct ConfigReader {
    map: Map<String, Value>,
    path: String,
}

impl ConfigReader {
    /// Parses `text` (the file at `path`) as a JSON object.
    pub(crate) fn new(text: &str, path: &str) -> Result<Self> {
        match serde_json::from_str(text) {
            Ok(Value::Object(map)) => Ok(Self {
                map,
                path: path.into(),
            }),
            Ok(_) => Err(config_error(
                "config.json",
                format!("{path}: not a JSON object"),
            )),
            Err(e) => Err(config_error("config.json", format!("{path}: {e}"))),
        }
    }

    fn present(&self, key: &str) -> Option<&Value> {
        self.map.get(key).filter(|v| !v.is_null())
    }

    /// The value of `key` as `T`, `default` when absent or null (a missing key without default
    /// is an error).
    pub(crate) fn get<T: serde::de::DeserializeOwned>(
        &self,
        key: &str,
        default: Option<T>,
    ) -> Result<T> {
        match self.present(key) {
            Some(v) => serde_json::from_value(v.clone())
                .map_err(|e| config_error(key, format!("{}: {e} (found {v})", self.path))),
            None => default.ok_or_else(|| config_error(key, format!("{}: missing", self.path))),
        }
    }

    /// An image or patch side: an integer, or a pair of equal integers.
    pub(crate) fn side(&self, key: &str, default: usize) -> Result<usize> {
        let v: Value = self.get(key, Some(Value::from(default)))?;
        let side = match &v {
            Value::Array(a) if a.len() == 2 && a[0] == a[1] => a[0].as_u64(),
            other => other.as_u64(),
        };
        match side {
            Some(s) if s > 0 => Ok(s as usize),
            _ => Err(config_error(
                key,
                format!(
                    "{}: only a positive integer (square) is supported, found {v}",
                    self.path
                ),
            )),
        }
    }

    /// Refuses a `model_type` other than `expected` (an absent one is accepted).
    pub(crate) fn expect_model_type(&self, expected: &str) -> Result<()> {
        let found: String = self.get("model_type", Some(expected.to_string()))?;
        if found != expected {
            return Err(config_error(
                "model_type",
                format!("{}: `{found}` is not `{expected}`", self.path),
            ));
        }
        Ok(())
    }

    /// The path of the file, for messages.
    pub(crate) fn path(&self) -> &str {
        &self.path
    }
}

/// The checks shared by both configs: exact GELU, heads dividing the width, the image a whole
/// number of patches, dropout probabilities in `[0, 1)`.
pub(crate) fn check_common(
    r: &ConfigReader,
    act: &str,
    hidden: usize,
    heads: usize,
    image: usize,
    patch: usize,
    dropouts: &[(&str, f32)],
) -> Result<()> {
    if !matches!(act, "gelu" | "gelu_python") {
        return Err(config_error(
            "hidden_act",
            format!("{}: `{act}` is not supported (only gelu)", r.path()),
        ));
    }
    if heads == 0 || !hidden.is_multiple_of(heads) {
        return Err(config_error(
            "num_attention_heads",
            format!(
                "{}: hidden_size {hidden} is not a multiple of {heads}",
                r.path()
            ),
        ));
    }
    if !image.is_multiple_of(patch) {
        return Err(config_error(
            "image_size",
            format!(
                "{}: {image} is not a multiple of patch_size {patch}",
                r.path()
            ),
        ));
    }
    for (key, p) in dropouts {
        if !(0.0..1.0).contains(p) {
            return Err(config_error(
                key,
                format!("{}: {p} is not in [0, 1)", r.path()),
            ));
        }
    }
    Ok(())
}

/// The base weights in `files`, with keys passed through `convert` (transformers 5.24's
/// checkpoint conversion: Hub checkpoints keep the names of transformers 4): memory-mapped when
/// no key changes, otherwise read into memory under the converted names.
pub(crate) fn load_checkpoint(
    files: &[PathBuf],
    convert: fn(&str) -> String,
) -> Result<WeightSource> {
    let st = mmap(files)?;
    let keys: Vec<String> = st.tensors().into_iter().map(|(k, _)| k).collect();
    if keys.iter().all(|k| convert(k) == *k) {
        return WeightSource::from_safetensors(files);
    }
    let mut map = HashMap::with_capacity(keys.len());
    for k in keys {
        let t = st
            .load(&k, &Device::Cpu)
            .map_err(|e| PeftError::candle(format!("loading `{k}`"), e))?;
        map.insert(convert(&k), t);
    }
    Ok(WeightSource::Map(map))
}

fn mmap(files: &[PathBuf]) -> Result<MmapedSafetensors> {
    for f in files {
        if !f.is_file() {
            return Err(PeftError::io(f, "weights file not found"));
        }
    }
    // SAFETY: read-only mapping of checkpoint files we do not modify while mapped.
    unsafe { MmapedSafetensors::multi(files) }.map_err(|e| {
        PeftError::io(
            files.first().cloned().unwrap_or_default(),
            format!("not a valid safetensors file: {e}"),
        )
    })
}

/// The checkpoint's `classifier.weight` and `classifier.bias` when they have the head's shape
/// (`num_labels × in_dim`), else `None`.
pub(crate) fn checkpoint_head(
    files: &[PathBuf],
    num_labels: usize,
    in_dim: usize,
) -> Result<Option<(Tensor, Tensor)>> {
    let st = mmap(files)?;
    let (Ok(w), Ok(b)) = (
        st.load("classifier.weight", &Device::Cpu),
        st.load("classifier.bias", &Device::Cpu),
    ) else {
        return Ok(None);
    };
    Ok((w.dims() == [num_labels, in_dim] && b.dims() == [num_labels]).then_some((w, b)))
}

/// Sets the trainable head `name` (`name.weight`, `name.bias`) to these values.
pub(crate) fn set_head(
    parts: &TunedParts,
    name: &str,
    weight: &Tensor,
    bias: &Tensor,
) -> Result<()> {
    for (suffix, t) in [("weight", weight), ("bias", bias)] {
        let key = format!("{name}.{suffix}");
        let var = parts
            .params
            .get(&key)
            .ok_or_else(|| config_error(&key, "the model has no such trainable head parameter"))?;
        if var.dims() != t.dims() {
            return Err(config_error(
                &key,
                format!("the head is {:?}, the values {:?}", var.dims(), t.dims()),
            ));
        }
        var.set(&t.to_dtype(var.dtype())?.to_device(var.device())?)?;
    }
    Ok(())
}

/// Reads a model's `config.json`.
pub(crate) fn read_text(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|e| PeftError::io(path, e))
}
