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
use crate::{TunedParts, TuningPlan};

mod config;

pub use crate::methods::SUPPORTED_PEFT_TYPES;
pub use config::{peft_config_json, read_config, read_config_file, PeftConfigFile, PeftJson};

/// peft-rs's own `peft_type` for a folder without adapter: trained base parameters and heads.
pub const UNFROZEN_TYPE: &str = "UNFROZEN";

/// peft's prefix of every key in `adapter_model.safetensors`.
pub const KEY_PREFIX: &str = "base_model.model.";
/// The config file name peft uses.
pub const CONFIG_FILE: &str = "adapter_config.json";
/// The weights file name peft uses.
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";
/// Our side file.
pub const META_FILE: &str = "peft_rs.json";

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
    /// The tuning plan's unfreeze patterns: which base parameters the file holds.
    #[serde(default)]
    pub unfreeze: Vec<String>,
    /// Where the tokenizer comes from (a Hugging Face id or a folder).
    pub tokenizer: String,
    /// Task-specific settings inference needs (max length, label alignment, ...).
    #[serde(default)]
    pub settings: serde_json::Map<String, serde_json::Value>,
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

/// peft's prefix of the model's tensors in a file of `config`'s method: prompt learning wraps
/// no tuner around the model, so its task heads are saved under `base_model.` alone.
pub fn key_prefix(peft_type: &str) -> &'static str {
    match peft_type {
        "PROMPT_TUNING" | "PREFIX_TUNING" => "base_model.",
        _ => KEY_PREFIX,
    }
}

/// The key of the model's tensor `name` in `adapter_model.safetensors`: `prefix` (see
/// [`key_prefix`]) before the name, except for prompt learning's `prompt_embeddings`, which peft
/// stores without one.
pub fn file_key(name: &str, prefix: &str) -> String {
    if name == crate::methods::prompt::PROMPT_KEY {
        name.to_string()
    } else {
        format!("{prefix}{name}")
    }
}

/// Modules whose parameters all train outright (peft's `modules_to_save`): every module with a
/// trainable `weight` or `bias` among `base_trainables`.
pub fn modules_to_save(base_trainables: &ParamStore) -> Vec<String> {
    let mut mods: Vec<String> = base_trainables
        .named_vars()
        .into_iter()
        .filter_map(|(n, _)| n.rsplit_once('.').map(|(m, _)| m.to_string()))
        .collect();
    mods.dedup();
    mods
}

/// The state of every BatchNorm that updates its statistics while training
/// ([`crate::BatchNormMode::Update`]): trained state the adapter file must carry. Saved as peft
/// saves a BatchNorm in `modules_to_save`, its whole state dict under the module's path
/// (`weight`, `bias` unless they are trainable parameters saved anyway, `running_mean`,
/// `running_var`, `num_batches_tracked`), so that Python peft loads it too.
pub fn batch_norm_state(parts: &TunedParts) -> Result<Vec<(String, Tensor)>> {
    // The selected adapter's statistics, as [`save`] writes it even while adapters are disabled.
    let selected = parts.registry.switch().selected();
    let mut out = Vec::new();
    for bn in parts.registry.batch_norms() {
        if bn.mode() != crate::BatchNormMode::Update {
            continue;
        }
        let p = bn.path();
        for (name, t) in [("weight", bn.weight()), ("bias", bn.bias())] {
            if !t.is_variable() {
                out.push((format!("{p}.{name}"), t.to_dtype(DType::F32)?));
            }
        }
        let state = bn.state_of(&selected);
        let (mean, var) = state.stats();
        out.push((format!("{p}.running_mean"), mean.clone()));
        out.push((format!("{p}.running_var"), var.clone()));
        let count = Tensor::new(state.tracked_batches() as i64, &Device::Cpu)?;
        out.push((format!("{p}.num_batches_tracked"), count));
    }
    Ok(out)
}

/// The BatchNorm modules whose statistics [`batch_norm_state`] saves.
fn batch_norm_modules(parts: &TunedParts) -> Vec<String> {
    parts
        .registry
        .batch_norms()
        .iter()
        .filter(|bn| bn.mode() == crate::BatchNormMode::Update)
        .map(|bn| bn.path().to_string())
        .collect()
}

/// The model's trainable parameters that belong to no adapter (task heads, unfrozen base
/// parameters), with the selected adapter's values.
pub fn base_trainables(parts: &TunedParts) -> Result<ParamStore> {
    let out = ParamStore::default();
    for (n, v) in parts.registry.base_trainables() {
        out.insert(&n, v)?;
    }
    Ok(out)
}

/// Writes the model's selected adapter (even while adapters are disabled) with its task head(s)
/// as an adapter folder: peft's two files and `peft_rs.json`, each atomically. A model without
/// adapters saves its trained base parameters and heads (`UNFROZEN`).
pub fn save(
    dir: &Path,
    parts: &TunedParts,
    base_model: &str,
    task_type: &str,
    meta: &AdapterMeta,
) -> Result<()> {
    match parts.registry.selected() {
        Some(name) => save_named(dir, parts, &name, base_model, task_type, Some(meta)),
        None => save_unfrozen(dir, parts, base_model, task_type, meta),
    }
}

/// Writes a model trained without an adapter (head only, BitFit, LayerNorm tuning): its trained
/// base parameters and heads under peft-rs's own `peft_type = "UNFROZEN"`.
fn save_unfrozen(
    dir: &Path,
    parts: &TunedParts,
    base_model: &str,
    task_type: &str,
    meta: &AdapterMeta,
) -> Result<()> {
    let trained = base_trainables(parts)?;
    if trained.is_empty() {
        return Err(PeftError::Config {
            key: "adapter".into(),
            message: "the model has no adapter and no trainable parameter to save".into(),
        });
    }
    let tensors: Vec<(String, Tensor)> = trained
        .named_vars()
        .into_iter()
        .map(|(n, v)| (n, v.as_tensor().clone()))
        .chain(batch_norm_state(parts)?)
        .map(|(n, t)| (format!("{KEY_PREFIX}{n}"), t))
        .collect();
    let mut modules = modules_to_save(&trained);
    modules.extend(batch_norm_modules(parts));
    modules.sort();
    modules.dedup();
    let config = serde_json::json!({
        "base_model_name_or_path": base_model,
        "modules_to_save": modules,
        "peft_type": UNFROZEN_TYPE,
        "task_type": (!task_type.is_empty()).then_some(task_type),
        "unfreeze": parts.plan.unfreeze,
    });
    write_folder(dir, &tensors, &config, Some(meta))
}

fn write_folder(
    dir: &Path,
    tensors: &[(String, Tensor)],
    config: &serde_json::Value,
    meta: Option<&AdapterMeta>,
) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| PeftError::io(dir, e))?;
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
    write_atomic(
        &dir.join(CONFIG_FILE),
        serde_json::to_string_pretty(config)
            .unwrap_or_default()
            .as_bytes(),
    )?;
    if let Some(meta) = meta {
        let meta_text = serde_json::to_string_pretty(meta)
            .map_err(|e| PeftError::io(dir.join(META_FILE), e))?;
        write_atomic(&dir.join(META_FILE), meta_text.as_bytes())?;
    }
    Ok(())
}

/// The tuning plan that rebuilds the model an adapter folder was saved from: its adapter (none
/// for `UNFROZEN`), and the unfreeze patterns of `peft_rs.json`, or for folders made by Python
/// peft, whole `modules_to_save`.
pub fn read_plan(dir: &Path) -> Result<(TuningPlan, PeftConfigFile)> {
    let file = read_config_file(dir)?;
    let adapter = if file.peft_type == UNFROZEN_TYPE {
        None
    } else {
        Some(read_config(dir)?.0)
    };
    // peft-rs records its patterns (a bias-only adapter holds no whole module); folders from
    // Python peft, and from peft-rs before the patterns were recorded, name whole modules.
    let meta = read_meta(dir)?;
    let made_here = meta.is_some();
    let recorded = meta.map(|m| m.unfreeze).unwrap_or_default();
    let unfreeze = if recorded.is_empty() {
        // peft-rs lists a BatchNorm in modules_to_save for its statistics (with the base's gain
        // and shift, as peft needs them): that trains no parameter. In folders from Python peft a
        // listed BatchNorm was trained whole.
        let saved = saved_keys(dir)?;
        let prefix = key_prefix(&file.peft_type);
        file.modules_to_save
            .iter()
            .flatten()
            .filter(|m| {
                let has = |p: &str| saved.contains(&format!("{prefix}{m}.{p}"));
                (has("weight") || has("bias")) && !(made_here && has("running_mean"))
            })
            .map(|m| format!("{}\\..*", regex::escape(m)))
            .collect()
    } else {
        recorded
    };
    Ok((
        TuningPlan {
            adapter,
            unfreeze,
            seed: 0,
        },
        file,
    ))
}

/// The tensor names in `dir`'s weights file (none when it is absent: the load reports that).
fn saved_keys(dir: &Path) -> Result<std::collections::HashSet<String>> {
    let path = dir.join(WEIGHTS_FILE);
    if !path.is_file() {
        return Ok(Default::default());
    }
    // SAFETY: read-only mapping of a file we do not modify while it is mapped.
    let st = unsafe { MmapedSafetensors::new(&path) }.map_err(|e| {
        PeftError::io(
            &path,
            format!("not a valid safetensors file (truncated or corrupt?): {e}"),
        )
    })?;
    Ok(st.tensors().into_iter().map(|(k, _)| k).collect())
}

/// Writes adapter `name` of the model with its task head(s): peft's two files, and
/// `peft_rs.json` when `meta` is given, each atomically.
pub fn save_named(
    dir: &Path,
    parts: &TunedParts,
    name: &str,
    base_model: &str,
    task_type: &str,
    meta: Option<&AdapterMeta>,
) -> Result<()> {
    let entry = parts
        .registry
        .adapter(name)
        .ok_or_else(|| PeftError::Config {
            key: "adapter".into(),
            message: format!("the model has no adapter `{name}` to save"),
        })?;
    let heads = ParamStore::default();
    for (n, v) in parts.registry.heads_of(name)?.vars {
        heads.insert(&n, v)?;
    }
    let tensors: Vec<(String, Tensor)> = parts
        .registry
        .tensors_to_save(name)?
        .into_iter()
        .chain(
            heads
                .named_vars()
                .into_iter()
                .map(|(n, v)| (n, v.as_tensor().clone())),
        )
        .chain(batch_norm_state(parts)?)
        .map(|(n, t)| (file_key(&n, key_prefix(entry.config.peft_type())), t))
        .collect();
    let mut modules = modules_to_save(&heads);
    modules.extend(batch_norm_modules(parts));
    modules.sort();
    modules.dedup();
    let config = peft_config_json(
        &entry.config.saved_config(),
        base_model,
        task_type,
        &modules,
    );
    write_folder(dir, &tensors, &config, meta)
}

/// Adds the adapter saved in `dir` (by peft-rs or Python peft) to the model as `name`, with its
/// weights and, when the file holds them, the task head's. A refused file leaves the model as it
/// was (no adapter added, no parameter changed).
pub fn load_adapter(dir: &Path, parts: &TunedParts, name: &str) -> Result<()> {
    let (config, _) = read_config(dir)?;
    let adapter = parts.registry.add_adapter(name, &config)?;
    let loaded = (|| {
        let heads = parts.registry.heads_of(name)?;
        let targets = ParamStore::default();
        for (n, v) in adapter
            .named_vars()
            .into_iter()
            .chain(heads.vars.iter().cloned())
        {
            targets.insert(&n, v)?;
        }
        // BatchNorm statistics in the file become this adapter's own.
        let batch_norms = parts.registry.batch_norms();
        load_checked(dir, &targets, &batch_norms, Some(name))?;
        parts.registry.finish_heads(heads)
    })();
    if let Err(e) = loaded {
        parts.registry.delete_adapter(name)?;
        return Err(e);
    }
    Ok(())
}

/// Loads `adapter_model.safetensors` into the model's parameters. Every tensor is checked
/// (presence, shape, no extras) before any parameter changes, so a bad file leaves the model as it
/// was.
pub fn load_weights(dir: &Path, params: &ParamStore) -> Result<()> {
    load_checked(dir, params, &[], None)
}

/// [`load_weights`] for a model with BatchNorms: the file's running statistics (saved by
/// [`save`] for layers that update them, or by peft for BatchNorms in `modules_to_save`) are
/// loaded too, checked with everything else before anything changes.
pub fn load_trained(dir: &Path, parts: &TunedParts) -> Result<()> {
    load_checked(dir, &parts.params, &parts.registry.batch_norms(), None)
}

/// Loads the file into `params` and the BatchNorms' running statistics: those of adapter
/// `stats_of`, or of the active one when `None`.
fn load_checked(
    dir: &Path,
    params: &ParamStore,
    batch_norms: &[std::sync::Arc<crate::BatchNorm2d>],
    stats_of: Option<&str>,
) -> Result<()> {
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
    let prefix = key_prefix(&read_config_file(dir)?.peft_type);
    let mut updates = Vec::new();
    let vars = params.named_vars();
    for (name, var) in &vars {
        let key = file_key(name, prefix);
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
    let mut known: std::collections::HashSet<String> =
        vars.iter().map(|(n, _)| file_key(n, prefix)).collect();
    let mut stats = Vec::new();
    for bn in batch_norms {
        let key = |stat: &str| file_key(&format!("{}.{stat}", bn.path()), prefix);
        let (mean_key, var_key) = (key("running_mean"), key("running_var"));
        // The counter is not needed (momentum is set); a frozen gain and shift are saved for
        // peft's sake and equal the base's (trainable ones are parameters, loaded above).
        known.insert(key("num_batches_tracked"));
        for (name, t) in [("weight", bn.weight()), ("bias", bn.bias())] {
            if !t.is_variable() {
                known.insert(key(name));
            }
        }
        match (
            st.load(&mean_key, &Device::Cpu),
            st.load(&var_key, &Device::Cpu),
        ) {
            (Ok(mean), Ok(var)) => {
                let want = bn.running_stats().0.dims().to_vec();
                if mean.dims() != want || var.dims() != want {
                    return Err(mismatch(format!(
                        "tensors `{mean_key}`/`{var_key}` have shapes {:?}/{:?}, but the model's \
                         BatchNorm has {want:?}",
                        mean.dims(),
                        var.dims()
                    )));
                }
                known.insert(mean_key);
                known.insert(var_key);
                stats.push((bn.clone(), mean, var));
            }
            (Ok(_), Err(_)) | (Err(_), Ok(_)) => {
                return Err(mismatch(format!(
                    "the file has only one of `{mean_key}` and `{var_key}`"
                )))
            }
            (Err(_), Err(_)) => {}
        }
    }
    if let Some((extra, _)) = st.tensors().into_iter().find(|(k, _)| !known.contains(k)) {
        return Err(mismatch(format!(
            "tensor `{extra}` has no counterpart in the model (targets or head differ)"
        )));
    }
    for (var, t) in updates {
        var.set(&t.to_dtype(var.dtype())?)?;
    }
    for (bn, mean, var) in stats {
        match stats_of {
            Some(name) => bn.set_running_stats_of(Some(name.to_string()), mean, var)?,
            None => bn.set_running_stats(mean, var)?,
        }
    }
    Ok(())
}
