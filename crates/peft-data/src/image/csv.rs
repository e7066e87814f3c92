//! CSV lists of image paths and class labels, with an optional split column.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::dataset::ImageDataset;
use super::subset::ImageSplits;
use crate::error::{DataError, Result};

/// Column names of an image CSV.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CsvColumns {
    /// Column of image paths (relative to the CSV's folder, or absolute).
    pub path: String,
    /// Column of class names.
    pub label: String,
    /// Column of split names (`train`, `val`/`valid`/`validation`, `test`), used when the
    /// header has it.
    pub split: String,
}

impl Default for CsvColumns {
    /// `path`, `label`, `split`.
    fn default() -> Self {
        Self {
            path: "path".into(),
            label: "label".into(),
            split: "split".into(),
        }
    }
}

/// Splits one CSV line into fields (RFC 4180 quoting, `""` for a quote; no line breaks inside
/// fields). `None` when a quote is left open.
fn fields(line: &str) -> Option<Vec<String>> {
    let mut out = Vec::new();
    let mut field = String::new();
    let mut chars = line.chars().peekable();
    let mut quoted = false;
    while let Some(c) = chars.next() {
        match (quoted, c) {
            (true, '"') if chars.peek() == Some(&'"') => {
                chars.next();
                field.push('"');
            }
            (true, '"') => quoted = false,
            (false, '"') if field.is_empty() => quoted = true,
            (false, ',') => out.push(std::mem::take(&mut field)),
            (_, c) => field.push(c),
        }
    }
    if quoted {
        return None;
    }
    out.push(field);
    Some(out)
}

/// Which split a row belongs to: 0 train, 1 valid, 2 test.
fn split_index(name: &str) -> Option<usize> {
    match name {
        "train" => Some(0),
        "val" | "valid" | "validation" => Some(1),
        "test" => Some(2),
        _ => None,
    }
}

/// Reads a CSV of image paths and class labels: a header naming the columns (see
/// [`CsvColumns`]; other columns are ignored), then one image per line. Paths are relative to
/// the CSV's folder and must exist. Classes are the sorted distinct labels of the training
/// rows; rows of other splits must use those. Without a split column every row is training.
/// Errors name the file and the line.
pub fn read_image_csv(csv: impl AsRef<Path>, columns: &CsvColumns) -> Result<ImageSplits> {
    let csv = csv.as_ref();
    let file = csv.display().to_string();
    let err = |line: usize, reason: String| DataError::Csv {
        path: file.clone(),
        line,
        reason,
    };
    let bytes = std::fs::read(csv).map_err(|e| DataError::io(csv, e))?;
    let text = String::from_utf8(bytes).map_err(|e| {
        let line = 1 + e.as_bytes()[..e.utf8_error().valid_up_to()]
            .iter()
            .filter(|&&b| b == b'\n')
            .count();
        DataError::Utf8 {
            path: file.clone(),
            line,
        }
    })?;
    let text = text.strip_prefix('\u{feff}').unwrap_or(&text);
    let mut lines = text.lines().enumerate().map(|(i, l)| (i + 1, l));
    let header = loop {
        match lines.next() {
            Some((_, l)) if l.trim().is_empty() => continue,
            Some((n, l)) => {
                break (
                    n,
                    fields(l).ok_or_else(|| err(n, "unterminated quote".into()))?,
                )
            }
            None => {
                return Err(err(
                    1,
                    format!(
                        "no header row (expected at least the columns `{}` and `{}`)",
                        columns.path, columns.label
                    ),
                ))
            }
        }
    };
    let (header_line, names) = header;
    let column = |name: &str| names.iter().position(|h| h.trim() == name);
    let find = |name: &str| {
        column(name).ok_or_else(|| {
            err(
                header_line,
                format!(
                    "no `{name}` column in the header (columns: {})",
                    names.join(", ")
                ),
            )
        })
    };
    let (path_col, label_col) = (find(&columns.path)?, find(&columns.label)?);
    let split_col = column(&columns.split);
    let base = csv.parent().unwrap_or(Path::new(""));
    // Per split: (line, path, label name).
    let mut rows: [Vec<(usize, PathBuf, String)>; 3] = Default::default();
    for (n, line) in lines {
        if line.trim().is_empty() {
            continue;
        }
        let f = fields(line).ok_or_else(|| err(n, "unterminated quote".into()))?;
        if f.len() != names.len() {
            return Err(err(
                n,
                format!("{} fields, the header has {}", f.len(), names.len()),
            ));
        }
        let (path, label) = (f[path_col].trim(), f[label_col].trim());
        if path.is_empty() || label.is_empty() {
            let empty = if path.is_empty() {
                &columns.path
            } else {
                &columns.label
            };
            return Err(err(n, format!("empty `{empty}` field")));
        }
        let split = match split_col {
            None => 0,
            Some(c) => split_index(f[c].trim()).ok_or_else(|| {
                err(
                    n,
                    format!(
                        "unknown split `{}` (expected train, val, valid, validation or test)",
                        f[c].trim()
                    ),
                )
            })?,
        };
        let full = base.join(path);
        if !full.is_file() {
            return Err(err(n, format!("image file {} not found", full.display())));
        }
        rows[split].push((n, full, label.to_string()));
    }
    let [train_rows, valid_rows, test_rows] = rows;
    if train_rows.is_empty() {
        return Err(err(
            header_line,
            match split_col {
                Some(_) => format!("no training rows (`{}` = train)", columns.split),
                None => "no rows after the header".into(),
            },
        ));
    }
    let classes: Vec<String> = train_rows
        .iter()
        .map(|(_, _, l)| l.clone())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let build = |split: &str, rows: Vec<(usize, PathBuf, String)>| -> Result<ImageDataset> {
        let mut files = Vec::with_capacity(rows.len());
        for (line, path, label) in rows {
            let Ok(id) = classes.binary_search(&label) else {
                return Err(DataError::LabelAbsentFromTrain {
                    split: format!("{file} ({split} rows)"),
                    label,
                    line,
                    known: classes.join(", "),
                });
            };
            files.push((path, id as u32));
        }
        ImageDataset::from_files(format!("{file} ({split})"), classes.clone(), files)
    };
    let nonempty =
        |split: &str, rows: Vec<_>| (!rows.is_empty()).then(|| build(split, rows)).transpose();
    Ok(ImageSplits {
        train: build("train", train_rows)?,
        valid: nonempty("valid", valid_rows)?,
        test: nonempty("test", test_rows)?,
    })
}
