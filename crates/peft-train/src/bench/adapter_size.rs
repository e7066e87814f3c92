//! The size of the adapter folder a training case would save: the model's adapter (or, for full
//! fine-tuning and other adapter-free plans, its trained base parameters) written by
//! [`adapter_io::save`] exactly as `peft-rs train` writes it, into a scratch folder that is
//! removed afterwards.

use std::path::PathBuf;

use peft_core::adapter_io::{self, AdapterMeta};
use peft_core::fsio::folder_bytes;
use peft_core::TunedParts;

use crate::error::Result;

/// A scratch folder removed when dropped, whatever happened in between.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Bytes of the files `adapter_io::save` writes for `parts` (weights, peft's config and
/// peft-rs's metadata).
pub(super) fn adapter_bytes(parts: &TunedParts) -> Result<u64> {
    let scratch = Scratch(std::env::temp_dir().join(format!(
        "peft-rs-bench-adapter-{}-{}",
        std::process::id(),
        parts.params.num_elements()
    )));
    let meta = AdapterMeta {
        base_model_fingerprint: parts.base_fingerprint.clone(),
        task: "token_classification".into(),
        unfreeze: Vec::new(),
        id2label: Default::default(),
        tokenizer: "bench".into(),
        settings: Default::default(),
    };
    adapter_io::save(&scratch.0, parts, "bench", "TOKEN_CLS", &meta)?;
    Ok(folder_bytes(&scratch.0)?)
}

#[cfg(test)]
mod tests {
    use super::super::{train_case, BenchSettings, Method, ModelShape};
    use candle_core::{DType, Device};

    /// Each training case reports the folder it would save: 4 bytes per trainable parameter
    /// plus the safetensors header and the two JSON files (a few KiB), whatever the method.
    #[test]
    fn training_cases_report_the_saved_folder_size() {
        let s = BenchSettings {
            model: ModelShape::Tiny,
            device: Device::Cpu,
            dtype: DType::F32,
            batch: 2,
            steps: 1,
            warmup: 0,
            phases: false,
        };
        for method in [
            Method::Full,
            Method::LoraQv,
            Method::Ia3,
            Method::Bottleneck,
        ] {
            let c = train_case(&s, method, 8);
            assert_eq!(c.error, None, "{}", c.name);
            let weights = 4 * c.trainable_params.unwrap() as u64;
            let saved = c.adapter_bytes.unwrap();
            assert!(
                saved > weights && saved < weights + 32 * 1024,
                "{}: {saved} bytes saved for {weights} bytes of weights",
                c.name
            );
        }
    }
}
