//! Image folders, one sub-folder per class (torchvision's `ImageFolder`), optionally under
//! `train/`, `val/` and `test/` split folders.

use std::path::{Path, PathBuf};

use super::dataset::ImageDataset;
use super::subset::ImageSplits;
use crate::error::{DataError, Result};

/// File extensions (compared case-insensitively) taken as images.
pub const IMAGE_EXTENSIONS: [&str; 4] = ["png", "jpg", "jpeg", "bmp"];

/// Names of a validation split folder, in order of preference.
const VALID_NAMES: [&str; 3] = ["val", "valid", "validation"];

/// Sub-folders deeper than this inside a class folder are not searched (symlink loops).
const MAX_DEPTH: usize = 16;

fn layout_err(path: &Path, reason: impl Into<String>) -> DataError {
    DataError::ImageFolder {
        path: path.display().to_string(),
        reason: reason.into(),
    }
}

/// Visible entries of `dir`, sorted by name, split into (folders, files).
fn list(dir: &Path) -> Result<(Vec<PathBuf>, Vec<PathBuf>)> {
    let mut entries = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| DataError::io(dir, e))? {
        let entry = entry.map_err(|e| DataError::io(dir, e))?;
        if !entry.file_name().to_string_lossy().starts_with('.') {
            entries.push(entry.path());
        }
    }
    entries.sort();
    Ok(entries.into_iter().partition(|p| p.is_dir()))
}

fn is_image(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| IMAGE_EXTENSIONS.iter().any(|x| e.eq_ignore_ascii_case(x)))
}

/// Image files under `dir`, recursively, in sorted order.
fn images_under(dir: &Path, depth: usize, out: &mut Vec<PathBuf>) -> Result<()> {
    let (folders, files) = list(dir)?;
    out.extend(files.into_iter().filter(|p| is_image(p)));
    if depth < MAX_DEPTH {
        for folder in folders {
            images_under(&folder, depth + 1, out)?;
        }
    }
    Ok(())
}

fn folder_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Reads `root/<class>/<image>`. With `known` classes (the training split's), every class
/// folder must be one of them and labels index into them; otherwise the classes are the
/// sorted folder names.
fn read_classes(root: &Path, known: Option<&[String]>) -> Result<ImageDataset> {
    let (folders, _) = list(root)?;
    if folders.is_empty() {
        return Err(layout_err(
            root,
            "holds no class folders (expected one sub-folder per class: <root>/<class>/<image>)",
        ));
    }
    let classes: Vec<String> = match known {
        Some(known) => known.to_vec(),
        None => folders.iter().map(|f| folder_name(f)).collect(),
    };
    let mut files = Vec::new();
    for folder in &folders {
        let name = folder_name(folder);
        let Some(label) = classes.iter().position(|c| *c == name) else {
            return Err(layout_err(
                folder,
                format!(
                    "class `{name}` does not occur in the training split; known classes: {}",
                    classes.join(", ")
                ),
            ));
        };
        let mut images = Vec::new();
        images_under(folder, 0, &mut images)?;
        if images.is_empty() {
            return Err(DataError::EmptyClassFolder {
                path: folder.display().to_string(),
            });
        }
        files.extend(images.into_iter().map(|p| (p, label as u32)));
    }
    ImageDataset::from_files(root.display().to_string(), classes, files)
}

/// Reads an image folder `root/<class>/<image>` (classes = sorted folder names, as
/// torchvision's `ImageFolder`; images = `.png`, `.jpg`, `.jpeg`, `.bmp` files, also in
/// nested folders; hidden entries ignored). Images are only listed here and decoded when their
/// batch is built. An empty class folder or a root without class folders is an error naming
/// the folder.
pub fn read_image_folder(root: impl AsRef<Path>) -> Result<ImageDataset> {
    read_classes(root.as_ref(), None)
}

/// Reads an image folder with its splits: `root/train/<class>/…` plus optional `root/val/`
/// (or `valid/`, `validation/`) and `root/test/`, whose classes must occur in `train/`.
/// Without a `train/` folder the whole root is the training split.
pub fn read_image_folder_splits(root: impl AsRef<Path>) -> Result<ImageSplits> {
    let root = root.as_ref();
    let train_dir = root.join("train");
    if !train_dir.is_dir() {
        return Ok(ImageSplits {
            train: read_classes(root, None)?,
            valid: None,
            test: None,
        });
    }
    let (folders, _) = list(root)?;
    if let Some(other) = folders.iter().find(|f| {
        let name = folder_name(f);
        name != "train" && name != "test" && !VALID_NAMES.contains(&name.as_str())
    }) {
        return Err(layout_err(
            root,
            format!(
                "has a train/ folder (split layout) but also `{}/`: expected only train/, \
                 val/ (or valid/, validation/) and test/",
                folder_name(other)
            ),
        ));
    }
    let train = read_classes(&train_dir, None)?;
    let classes = train.classes().to_vec();
    let split = |name: &str| -> Result<Option<ImageDataset>> {
        let dir = root.join(name);
        dir.is_dir()
            .then(|| read_classes(&dir, Some(&classes)))
            .transpose()
    };
    let mut valid = None;
    for name in VALID_NAMES {
        if valid.is_none() {
            valid = split(name)?;
        }
    }
    let test = split("test")?;
    Ok(ImageSplits { train, valid, test })
}
