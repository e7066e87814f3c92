//! Model resolution: a local folder, or a Hugging Face id found in the hub cache (offline once
//! cached) or, with network access, downloaded into it.

use std::path::{Path, PathBuf};

/// The files of a model.
#[derive(Clone, Debug)]
pub struct ModelFiles {
    /// What the user named (id or folder).
    pub name: String,
    /// `config.json`.
    pub config: PathBuf,
    /// The safetensors weight files.
    pub weights: Vec<PathBuf>,
    /// `tokenizer.json`, if the model has one.
    pub tokenizer: Option<PathBuf>,
}

/// Why a model could not be found.
#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    /// A folder lacks a required file.
    #[error("model folder {dir}: no {what} (expected {expected})")]
    FolderIncomplete {
        /// The folder.
        dir: PathBuf,
        /// What is missing.
        what: &'static str,
        /// The file names looked for.
        expected: &'static str,
    },
    /// The id is neither a folder nor cached, and could not be downloaded.
    #[error(
        "model `{id}` is not a local folder and not in the Hugging Face cache at {cache} ({reason}); \
         run scripts/setup-assets.sh to fill the cache offline, or allow network access"
    )]
    NotFound {
        /// The id.
        id: String,
        /// The cache folder searched.
        cache: PathBuf,
        /// Why the download did not happen.
        reason: String,
    },
}

const WEIGHTS: &str = "model.safetensors";

/// Resolves `name`: an existing folder is used as is; otherwise `name` is a hub id.
pub fn resolve_model(name: &str) -> Result<ModelFiles, ResolveError> {
    let dir = Path::new(name);
    if dir.is_dir() {
        return from_folder(name, dir);
    }
    let cache = hf_hub::Cache::from_env();
    let repo = cache.model(name.to_string());
    if let (Some(config), Some(weights)) = (repo.get("config.json"), repo.get(WEIGHTS)) {
        return Ok(ModelFiles {
            name: name.into(),
            config,
            weights: vec![weights],
            tokenizer: repo.get("tokenizer.json"),
        });
    }
    let not_found = |reason: String| ResolveError::NotFound {
        id: name.into(),
        cache: cache.path().clone(),
        reason,
    };
    if std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| v == "1") {
        return Err(not_found("HF_HUB_OFFLINE=1".into()));
    }
    let api = hf_hub::api::sync::ApiBuilder::from_cache(cache.clone())
        .with_progress(true)
        .build()
        .map_err(|e| not_found(e.to_string()))?;
    let repo = api.model(name.to_string());
    let get = |f: &str| {
        repo.get(f)
            .map_err(|e| not_found(format!("download of {f} failed: {e}")))
    };
    Ok(ModelFiles {
        name: name.into(),
        config: get("config.json")?,
        weights: vec![get(WEIGHTS)?],
        tokenizer: repo.get("tokenizer.json").ok(),
    })
}

fn from_folder(name: &str, dir: &Path) -> Result<ModelFiles, ResolveError> {
    let config = dir.join("config.json");
    if !config.is_file() {
        return Err(ResolveError::FolderIncomplete {
            dir: dir.into(),
            what: "config",
            expected: "config.json",
        });
    }
    let single = dir.join(WEIGHTS);
    let weights = if single.is_file() {
        vec![single]
    } else {
        let mut shards: Vec<PathBuf> = std::fs::read_dir(dir)
            .map(|rd| rd.filter_map(|e| e.ok().map(|e| e.path())).collect())
            .unwrap_or_default();
        shards.retain(|p| p.extension().is_some_and(|e| e == "safetensors"));
        shards.sort();
        shards
    };
    if weights.is_empty() {
        return Err(ResolveError::FolderIncomplete {
            dir: dir.into(),
            what: "weights",
            expected: "model.safetensors or *.safetensors shards",
        });
    }
    let tokenizer = Some(dir.join("tokenizer.json")).filter(|p| p.is_file());
    Ok(ModelFiles {
        name: name.into(),
        config,
        weights,
        tokenizer,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folder_without_config_or_weights_is_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().to_str().unwrap();
        let err = resolve_model(p).unwrap_err().to_string();
        assert!(
            err.contains("no config") && err.contains("config.json"),
            "{err}"
        );
        std::fs::write(dir.path().join("config.json"), "{}").unwrap();
        let err = resolve_model(p).unwrap_err().to_string();
        assert!(err.contains("no weights"), "{err}");
    }

    #[test]
    fn unknown_id_offline_names_the_cache_and_the_fix() {
        let dir = tempfile::tempdir().unwrap();
        std::env::set_var("HF_HOME", dir.path());
        std::env::set_var("HF_HUB_OFFLINE", "1");
        let err = resolve_model("nobody/no-such-model")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("nobody/no-such-model") && err.contains("setup-assets.sh"),
            "{err}"
        );
    }
}
