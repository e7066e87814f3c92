//! IDX files, the format of MNIST and Fashion-MNIST, raw or gzip-compressed.
//!
//! An IDX file is a big-endian header `0 0 type ndim`, `ndim` u32 sizes, then the data. Images
//! are `0x00000803` (u8, N × rows × cols), labels `0x00000801` (u8, N).

use std::io::Read;
use std::path::Path;

use flate2::read::GzDecoder;

use super::dataset::{ImageDataset, RawImages};
use super::subset::ImageSplits;
use crate::error::{DataError, Result};

/// Fashion-MNIST's class names, in label order.
pub const FASHION_MNIST_CLASSES: [&str; 10] = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
];

/// Magic number of u8 image files (3 dimensions).
const IMAGES_MAGIC: u32 = 0x0000_0803;
/// Magic number of u8 label files (1 dimension).
const LABELS_MAGIC: u32 = 0x0000_0801;

fn idx_err(path: &Path, reason: impl Into<String>) -> DataError {
    DataError::Idx {
        path: path.display().to_string(),
        reason: reason.into(),
    }
}

/// The file's bytes, gunzipped when they start with the gzip magic `1f 8b`.
fn read_maybe_gz(path: &Path) -> Result<Vec<u8>> {
    let bytes = std::fs::read(path).map_err(|e| DataError::io(path, e))?;
    if !bytes.starts_with(&[0x1f, 0x8b]) {
        return Ok(bytes);
    }
    let mut out = Vec::with_capacity(bytes.len() * 4);
    GzDecoder::new(&bytes[..])
        .read_to_end(&mut out)
        .map_err(|e| idx_err(path, format!("corrupt or truncated gzip data: {e}")))?;
    Ok(out)
}

/// Checks the header of an IDX file against `magic` and returns its sizes and data.
fn parse<'a>(
    path: &Path,
    bytes: &'a [u8],
    magic: u32,
    what: &str,
) -> Result<(Vec<usize>, &'a [u8])> {
    let Some(head) = bytes.get(..4) else {
        return Err(idx_err(
            path,
            format!("{} bytes is too short for an IDX header", bytes.len()),
        ));
    };
    let found = u32::from_be_bytes([head[0], head[1], head[2], head[3]]);
    if found != magic {
        return Err(idx_err(
            path,
            format!("magic number 0x{found:08x}, expected 0x{magic:08x} ({what})"),
        ));
    }
    let ndim = head[3] as usize;
    let header_len = 4 + 4 * ndim;
    let Some(dims) = bytes.get(4..header_len) else {
        return Err(idx_err(
            path,
            format!("truncated header: {ndim} sizes need {header_len} bytes"),
        ));
    };
    let dims: Vec<usize> = dims
        .chunks_exact(4)
        .map(|d| u32::from_be_bytes([d[0], d[1], d[2], d[3]]) as usize)
        .collect();
    let shape = dims
        .iter()
        .map(usize::to_string)
        .collect::<Vec<_>>()
        .join("×");
    let len = dims.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d));
    let data = &bytes[header_len..];
    match len {
        Some(len) if len == data.len() => Ok((dims, data)),
        Some(len) if len > data.len() => Err(idx_err(
            path,
            format!(
                "truncated: the header declares {shape} = {len} bytes of data, the file holds {}",
                data.len()
            ),
        )),
        Some(len) => Err(idx_err(
            path,
            format!("{} bytes after the declared {shape} data", data.len() - len),
        )),
        None => Err(idx_err(path, format!("declared shape {shape} overflows"))),
    }
}

/// Reads an IDX image file and its label file (each raw or `.gz`) into a dataset of gray
/// images held in memory.
///
/// Class names are `class_names` when given (e.g. [`FASHION_MNIST_CLASSES`]), else `"0"` to
/// `"9"`; every label must index into them. Errors name the file: wrong magic number,
/// truncated data, trailing bytes, count mismatch, label out of range.
pub fn read_idx(
    images: impl AsRef<Path>,
    labels: impl AsRef<Path>,
    class_names: Option<&[&str]>,
) -> Result<ImageDataset> {
    let (images, labels) = (images.as_ref(), labels.as_ref());
    let classes: Vec<String> = match class_names {
        Some([]) => return Err(DataError::arg("class_names", "expected at least one name")),
        Some(names) => names.iter().map(|s| s.to_string()).collect(),
        None => (0..10).map(|d| d.to_string()).collect(),
    };
    let image_bytes = read_maybe_gz(images)?;
    let (dims, _) = parse(
        images,
        &image_bytes,
        IMAGES_MAGIC,
        "u8 images, 3 dimensions",
    )?;
    let (n, rows, cols) = (dims[0], dims[1], dims[2]);
    if rows == 0 || cols == 0 {
        return Err(idx_err(images, format!("images of {rows}×{cols} pixels")));
    }
    let label_bytes = read_maybe_gz(labels)?;
    let (ldims, label_data) = parse(labels, &label_bytes, LABELS_MAGIC, "u8 labels, 1 dimension")?;
    if ldims[0] != n {
        return Err(idx_err(
            labels,
            format!(
                "{} labels but {} holds {n} images",
                ldims[0],
                images.display()
            ),
        ));
    }
    if let Some((i, &l)) = label_data
        .iter()
        .enumerate()
        .find(|(_, &l)| l as usize >= classes.len())
    {
        return Err(idx_err(
            labels,
            format!(
                "label {l} of item {i} is out of range for {} classes",
                classes.len()
            ),
        ));
    }
    let labels: Vec<u32> = label_data.iter().map(|&l| u32::from(l)).collect();
    drop(label_bytes);
    // Drop the header in place instead of copying 47 MB.
    let mut pixels = image_bytes;
    pixels.drain(..16);
    let raw = RawImages::new(images.display().to_string(), cols, rows, 1, pixels)?;
    ImageDataset::from_raw(raw, labels, classes)
}

/// Reads the MNIST file layout of a folder: `train-images-idx3-ubyte` with
/// `train-labels-idx1-ubyte` and, when present, `t10k-images-idx3-ubyte` with
/// `t10k-labels-idx1-ubyte` as the test split (each with or without `.gz`).
pub fn read_idx_dir(dir: impl AsRef<Path>, class_names: Option<&[&str]>) -> Result<ImageSplits> {
    let dir = dir.as_ref();
    let find = |stem: &str| {
        [format!("{stem}.gz"), stem.to_string()]
            .into_iter()
            .map(|name| dir.join(name))
            .find(|p| p.is_file())
    };
    let pair = |prefix: &str| {
        (
            find(&format!("{prefix}-images-idx3-ubyte")),
            find(&format!("{prefix}-labels-idx1-ubyte")),
        )
    };
    let train = match pair("train") {
        (Some(images), Some(labels)) => read_idx(images, labels, class_names)?,
        _ => {
            return Err(DataError::Io {
                path: dir
                    .join("train-{images-idx3,labels-idx1}-ubyte[.gz]")
                    .display()
                    .to_string(),
                source: std::io::ErrorKind::NotFound.into(),
            })
        }
    };
    let test = match pair("t10k") {
        (Some(images), Some(labels)) => Some(read_idx(images, labels, class_names)?),
        _ => None,
    };
    Ok(ImageSplits {
        train,
        valid: None,
        test,
    })
}
