//! Atomic file writes: a temporary file in the target's folder, synced, then renamed over the
//! target, so that a crash never leaves a half-written adapter or checkpoint.

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::{PeftError, Result};

fn temp_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.tmp-{}", std::process::id()))
}

/// Writes whatever `write` produces at the temporary path, then renames it to `path`. On error
/// the temporary file is removed and `path` is untouched.
pub fn write_atomic_with(path: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| PeftError::io(dir, e))?;
    }
    let tmp = temp_path(path);
    let result = write(&tmp).and_then(|()| {
        // Readable by all, as files made by `File::create` under the usual umask are (some
        // writers, safetensors' among them, create theirs owner-only).
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::Permissions::from_mode(0o644);
            std::fs::set_permissions(&tmp, mode).map_err(|e| PeftError::io(&tmp, e))?;
        }
        let f = std::fs::File::open(&tmp).map_err(|e| PeftError::io(&tmp, e))?;
        f.sync_all().map_err(|e| PeftError::io(&tmp, e))?;
        std::fs::rename(&tmp, path).map_err(|e| PeftError::io(path, e))
    });
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Writes `bytes` to `path` atomically.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic_with(path, |tmp| {
        let mut f = std::fs::File::create(tmp).map_err(|e| PeftError::io(tmp, e))?;
        f.write_all(bytes).map_err(|e| PeftError::io(tmp, e))
    })
}

/// Total bytes of the files directly in `dir` (an adapter folder's size on disk).
pub fn folder_bytes(dir: &Path) -> Result<u64> {
    let mut total = 0;
    let entries = std::fs::read_dir(dir).map_err(|e| PeftError::io(dir, e))?;
    for entry in entries {
        let meta = entry
            .and_then(|e| e.metadata())
            .map_err(|e| PeftError::io(dir, e))?;
        if meta.is_file() {
            total += meta.len();
        }
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failing_writer_leaves_neither_target_nor_temp_file() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("a.bin");
        write_atomic(&target, b"old").unwrap();
        let err = write_atomic_with(&target, |tmp| {
            std::fs::write(tmp, b"half").unwrap();
            Err(PeftError::io(tmp, "simulated crash"))
        });
        assert!(err.is_err());
        assert_eq!(std::fs::read(&target).unwrap(), b"old");
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 1, "only the target remains: {names:?}");
    }
}
