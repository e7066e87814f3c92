//! Atomic file writes: a crash or a failing writer never leaves a half-written file.
//!
//! The data goes to a temporary file in the destination's directory, which is flushed, fsynced
//! and then renamed over the destination (rename is atomic within one file system). On Unix the
//! directory is fsynced too, so the rename itself survives a power loss.

use std::fs::{File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::{Result, TrainError};

/// Writes `bytes` to `path` atomically, replacing any existing file.
///
/// The parent directory must exist.
///
/// ```
/// # let dir = tempfile::tempdir().unwrap();
/// let path = dir.path().join("state.json");
/// peft_train::atomic::write_atomic(&path, b"{}").unwrap();
/// assert_eq!(std::fs::read(&path).unwrap(), b"{}");
/// ```
pub fn write_atomic(path: impl AsRef<Path>, bytes: &[u8]) -> Result<()> {
    write_atomic_with(path, |w| w.write_all(bytes))
}

/// Writes `path` atomically with a writer callback, replacing any existing file.
///
/// `write` receives a buffered writer on a temporary file in the same directory. If it returns
/// an error (or any later step fails), the temporary file is removed and `path` is left as it
/// was; otherwise the temporary file is flushed, fsynced and renamed to `path`.
pub fn write_atomic_with<F>(path: impl AsRef<Path>, write: F) -> Result<()>
where
    F: FnOnce(&mut BufWriter<File>) -> io::Result<()>,
{
    let path = path.as_ref();
    let tmp = temp_path(path)?;
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&tmp)
        .map_err(|e| TrainError::io(&tmp, e))?;
    let written = write_and_sync(file, write);
    let renamed = written.and_then(|()| std::fs::rename(&tmp, path));
    if let Err(e) = renamed {
        // Best effort: the original error is the one worth reporting.
        let _ = std::fs::remove_file(&tmp);
        return Err(TrainError::io(path, e));
    }
    sync_dir(path);
    Ok(())
}

/// Runs the writer, then flushes and fsyncs the file.
fn write_and_sync<F>(file: File, write: F) -> io::Result<()>
where
    F: FnOnce(&mut BufWriter<File>) -> io::Result<()>,
{
    let mut w = BufWriter::new(file);
    write(&mut w)?;
    let file = w.into_inner().map_err(|e| e.into_error())?;
    file.sync_all()
}

/// A fresh temporary name beside `path`: `.<name>.tmp-<pid>-<n>`.
fn temp_path(path: &Path) -> Result<PathBuf> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let name = path.file_name().ok_or_else(|| {
        let e = io::Error::new(io::ErrorKind::InvalidInput, "not a file path");
        TrainError::io(path, e)
    })?;
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(".tmp-{}-{n}", std::process::id()));
    Ok(path.with_file_name(tmp_name))
}

/// Fsyncs the directory holding `path` so that the rename is durable (Unix only; best effort).
fn sync_dir(path: &Path) {
    #[cfg(unix)]
    {
        let dir = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
    }
    #[cfg(not(unix))]
    let _ = path;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn writes_and_replaces() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.bin");
        write_atomic(&path, b"first").unwrap();
        write_atomic_with(&path, |w| {
            w.write_all(b"sec")?;
            w.write_all(b"ond")
        })
        .unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"second");
        assert_eq!(entries(dir.path()), vec!["a.bin".to_string()]);
    }

    #[test]
    fn failing_writer_leaves_no_file_and_no_temp() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ckpt.safetensors");
        let err = write_atomic_with(&path, |w| {
            w.write_all(&[7u8; 100_000])?;
            Err(io::Error::other("serializer failed"))
        })
        .unwrap_err();
        assert!(err.to_string().contains("serializer failed"), "{err}");
        assert!(err.to_string().contains("ckpt.safetensors"), "{err}");
        assert!(entries(dir.path()).is_empty());
    }

    #[test]
    fn failing_writer_keeps_previous_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keep.txt");
        write_atomic(&path, b"old").unwrap();
        let res = write_atomic_with(&path, |w| {
            w.write_all(b"partial new content")?;
            Err(io::Error::other("boom"))
        });
        assert!(res.is_err());
        assert_eq!(std::fs::read(&path).unwrap(), b"old");
        assert_eq!(entries(dir.path()), vec!["keep.txt".to_string()]);
    }

    #[test]
    fn missing_directory_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("no/such/dir/file.txt");
        let err = write_atomic(&path, b"x").unwrap_err();
        assert!(matches!(err, TrainError::Io { .. }));
    }
}
