//! `peft-rs inspect`: what an adapter folder holds, without loading the base model.

use std::path::Path;

use anyhow::{Context, Result};
use peft_core::adapter_io::{read_meta, read_plan, WEIGHTS_FILE};
use peft_core::fsio::folder_bytes;
use peft_core::AdapterConfig;

pub fn run(dir: &Path, json: bool) -> Result<()> {
    let (plan, file) = read_plan(dir)?;
    let meta = read_meta(dir)?;
    let weights = dir.join(WEIGHTS_FILE);
    let tensors = candle_core::safetensors::load(&weights, &candle_core::Device::Cpu)
        .with_context(|| format!("{}: not a valid safetensors file", weights.display()))?;
    let params: usize = tensors.values().map(|t| t.elem_count()).sum();
    let heads: Vec<String> = file
        .modules_to_save
        .iter()
        .flatten()
        .map(|m| format!("{}{m}.", peft_core::adapter_io::KEY_PREFIX))
        .collect();
    let is_head = |k: &str| heads.iter().any(|h| k.starts_with(h.as_str()));
    let adapter_params: usize = tensors
        .iter()
        .filter(|(k, _)| !is_head(k))
        .map(|(_, t)| t.elem_count())
        .sum();
    let mut settings = serde_json::to_value(&plan.adapter)?;
    if let (serde_json::Value::Object(m), Some(AdapterConfig::Lora(cfg))) =
        (&mut settings, &plan.adapter)
    {
        m.insert("scaling".into(), serde_json::json!(cfg.scaling()));
    }
    let report = serde_json::json!({
        "folder": dir.display().to_string(),
        "peft_type": file.peft_type,
        "unfreeze": plan.unfreeze,
        "settings": settings,
        "base_model": file.base_model_name_or_path,
        "task_type": file.task_type,
        "modules_to_save": file.modules_to_save,
        "adapter_tensors": tensors.keys().filter(|k| !is_head(k)).count(),
        "trainable_parameters": params,
        "adapter_parameters": adapter_params,
        "head_parameters": params - adapter_params,
        "bytes": folder_bytes(dir)?,
        "labels": meta.as_ref().map(|m| m.id2label.values().cloned().collect::<Vec<_>>()),
        "base_model_fingerprint": meta.as_ref().map(|m| m.base_model_fingerprint.clone()),
    });
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    if let serde_json::Value::Object(m) = report {
        for (k, v) in m {
            let v = match v {
                serde_json::Value::String(s) => s,
                other => other.to_string(),
            };
            println!("{k:<24} {v}");
        }
    }
    Ok(())
}
