//! The metrics log: one JSON object per line and event, flushed as it is written.
//!
//! A training run appends `{"event":"train","step":120,"epoch":0.4,"loss":0.71,"lr":2e-4,...}`
//! after optimizer steps and `{"event":"eval","step":300,"epoch":1.0,"f1":0.83,...}` after
//! evaluations. [`crate::plot::svg_plot`] draws the curves from the records.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Result, TrainError};

/// What a record describes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Event {
    /// Training progress after an optimizer step.
    #[default]
    Train,
    /// An evaluation on the validation split.
    Eval,
    /// An evaluation on the test split.
    Test,
}

/// One line of the metrics log. Absent values are omitted; non-finite numbers are written as
/// `null` (and read back as absent).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct LogRecord {
    /// What the record describes.
    pub event: Event,
    /// Optimizer steps taken so far.
    pub step: u64,
    /// Fractional epoch (e.g. 1.5 halfway through the second epoch).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epoch: Option<f64>,
    /// Loss (training loss of the step, or mean evaluation loss).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss: Option<f64>,
    /// Learning rate used for the step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lr: Option<f64>,
    /// Gradient norm before clipping.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grad_norm: Option<f64>,
    /// Entity-level (or other task) F1 of an evaluation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub f1: Option<f64>,
    /// Accuracy of an evaluation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accuracy: Option<f64>,
    /// Throughput in samples per second.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub samples_per_sec: Option<f64>,
    /// Seconds since training started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub elapsed_s: Option<f64>,
    /// Any other numeric metrics (written as top-level keys).
    #[serde(flatten)]
    pub extra: BTreeMap<String, f64>,
}

/// An append-only JSON-lines metrics file.
#[derive(Debug)]
pub struct MetricsLog {
    path: PathBuf,
    file: File,
}

impl MetricsLog {
    /// Creates (or truncates) the log at `path`.
    pub fn create(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let file = File::create(&path).map_err(|e| TrainError::io(&path, e))?;
        Ok(Self { path, file })
    }

    /// Opens the log for a resumed run: drops the records after `step` (they will be produced
    /// again), rewriting the file atomically, and appends from there. A missing file is created.
    pub fn resume(path: impl AsRef<Path>, step: u64) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        if path.exists() {
            let kept: Vec<LogRecord> = read_log(&path)?
                .into_iter()
                .filter(|r| r.step <= step)
                .collect();
            let mut bytes = Vec::new();
            for r in &kept {
                bytes.extend(record_line(r, &path)?);
            }
            peft_core::fsio::write_atomic(&path, &bytes)?;
        }
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| TrainError::io(&path, e))?;
        Ok(Self { path, file })
    }

    /// Appends one record as one line and flushes it to the operating system.
    pub fn log(&mut self, record: &LogRecord) -> Result<()> {
        let line = record_line(record, &self.path)?;
        self.file
            .write_all(&line)
            .and_then(|()| self.file.flush())
            .map_err(|e| TrainError::io(&self.path, e))
    }

    /// The file being written.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// A record as one JSON line; extra metrics that are not finite are left out.
fn record_line(record: &LogRecord, path: &Path) -> Result<Vec<u8>> {
    let to_json = |r: &LogRecord| serde_json::to_vec(r);
    let mut line = if record.extra.values().all(|v| v.is_finite()) {
        to_json(record)
    } else {
        let mut r = record.clone();
        r.extra.retain(|_, v| v.is_finite());
        to_json(&r)
    }
    .map_err(|e| TrainError::Json {
        path: path.to_path_buf(),
        line: 0,
        source: e,
    })?;
    line.push(b'\n');
    Ok(line)
}

/// Reads a metrics log. An unterminated last line (a write cut short by a crash) is ignored;
/// any other invalid line is an error naming its line number.
pub fn read_log(path: impl AsRef<Path>) -> Result<Vec<LogRecord>> {
    let path = path.as_ref();
    let text = std::fs::read_to_string(path).map_err(|e| TrainError::io(path, e))?;
    let complete = text.ends_with('\n');
    let lines: Vec<&str> = text.lines().collect();
    let mut records = Vec::with_capacity(lines.len());
    for (i, line) in lines.iter().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str(line) {
            Ok(r) => records.push(r),
            Err(_) if i + 1 == lines.len() && !complete => break,
            Err(e) => {
                return Err(TrainError::Json {
                    path: path.to_path_buf(),
                    line: i + 1,
                    source: e,
                })
            }
        }
    }
    Ok(records)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn train(step: u64, loss: f64) -> LogRecord {
        LogRecord {
            step,
            loss: Some(loss),
            lr: Some(1e-4),
            ..LogRecord::default()
        }
    }

    #[test]
    fn writes_and_rereads_jsonl() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("metrics.jsonl");
        let mut log = MetricsLog::create(&path).unwrap();
        let mut eval = LogRecord {
            event: Event::Eval,
            step: 2,
            epoch: Some(1.0),
            f1: Some(0.5),
            ..LogRecord::default()
        };
        eval.extra.insert("precision".into(), 0.25);
        eval.extra.insert("bad".into(), f64::NAN);
        log.log(&train(1, 2.5)).unwrap();
        log.log(&train(2, f64::NAN)).unwrap();
        log.log(&eval).unwrap();
        // Each line is on disk as soon as it is logged.
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3);
        assert_eq!(
            lines[0],
            r#"{"event":"train","step":1,"loss":2.5,"lr":0.0001}"#
        );
        assert!(lines[1].contains(r#""loss":null"#), "{}", lines[1]);
        assert!(lines[2].contains(r#""precision":0.25"#), "{}", lines[2]);
        let back = read_log(&path).unwrap();
        assert_eq!(back[0], train(1, 2.5));
        assert_eq!(back[1].loss, None);
        eval.extra.remove("bad");
        assert_eq!(back[2], eval);
    }

    #[test]
    fn resume_drops_later_records_and_appends() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.jsonl");
        let mut log = MetricsLog::create(&path).unwrap();
        for s in 1..=5 {
            log.log(&train(s, 1.0 / s as f64)).unwrap();
        }
        drop(log);
        std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap()
            .write_all(br#"{"event":"tra"#)
            .unwrap();
        let mut log = MetricsLog::resume(&path, 3).unwrap();
        log.log(&train(4, 9.0)).unwrap();
        let steps: Vec<(u64, f64)> = read_log(&path)
            .unwrap()
            .iter()
            .map(|r| (r.step, r.loss.unwrap()))
            .collect();
        assert_eq!(steps, [(1, 1.0), (2, 0.5), (3, 1.0 / 3.0), (4, 9.0)]);
    }

    #[test]
    fn invalid_line_names_its_number() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.jsonl");
        std::fs::write(&path, "{\"event\":\"train\",\"step\":1}\nnot json\n{}\n").unwrap();
        let err = read_log(&path).unwrap_err().to_string();
        assert!(err.contains("m.jsonl:2"), "{err}");
    }
}
