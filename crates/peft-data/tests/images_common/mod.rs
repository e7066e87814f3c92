//! Helpers of the image tests: tiny images, IDX files and folders written from code.

#![allow(dead_code)]

use std::io::Write;
use std::path::{Path, PathBuf};

use flate2::write::GzEncoder;
use flate2::Compression;

/// The committed parity fixtures.
pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/images")
}

/// A `w × h` RGB image whose pixels encode their position and `seed`.
pub fn rgb_pixels(w: u32, h: u32, seed: u8) -> Vec<u8> {
    (0..h)
        .flat_map(|y| {
            (0..w).flat_map(move |x| {
                let (x8, y8) = (x as u8, y as u8);
                [
                    x8.wrapping_mul(7),
                    y8.wrapping_mul(11),
                    seed.wrapping_add(x8 ^ y8),
                ]
            })
        })
        .collect()
}

/// Writes an RGB image; the format follows the extension (`.png`, `.jpg`, `.bmp`).
pub fn write_rgb(path: &Path, w: u32, h: u32, seed: u8) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    image::RgbImage::from_raw(w, h, rgb_pixels(w, h, seed))
        .unwrap()
        .save(path)
        .unwrap();
}

/// Writes an 8-bit gray PNG.
pub fn write_gray(path: &Path, w: u32, h: u32, value: u8) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    image::GrayImage::from_pixel(w, h, image::Luma([value]))
        .save(path)
        .unwrap();
}

/// Bytes of an IDX file: magic `0 0 8 ndim`, sizes, data.
pub fn idx_bytes(dims: &[u32], data: &[u8]) -> Vec<u8> {
    let mut out = vec![0, 0, 8, dims.len() as u8];
    for d in dims {
        out.extend_from_slice(&d.to_be_bytes());
    }
    out.extend_from_slice(data);
    out
}

/// Gzip-compresses `bytes`.
pub fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut enc = GzEncoder::new(Vec::new(), Compression::fast());
    enc.write_all(bytes).unwrap();
    enc.finish().unwrap()
}

/// Writes `n` images of `rows × cols` (pixel = item index) and labels `i % classes`, gzipped
/// or raw; returns (images, labels) paths.
pub fn write_idx_pair(
    dir: &Path,
    prefix: &str,
    n: u32,
    rows: u32,
    cols: u32,
    classes: u8,
    gz: bool,
) -> (PathBuf, PathBuf) {
    let pixels: Vec<u8> = (0..n)
        .flat_map(|i| std::iter::repeat_n(i as u8, (rows * cols) as usize))
        .collect();
    let labels: Vec<u8> = (0..n).map(|i| (i % u32::from(classes)) as u8).collect();
    let mut images = idx_bytes(&[n, rows, cols], &pixels);
    let mut label_file = idx_bytes(&[n], &labels);
    images[3] = 3;
    label_file[3] = 1;
    let ext = if gz { ".gz" } else { "" };
    let ip = dir.join(format!("{prefix}-images-idx3-ubyte{ext}"));
    let lp = dir.join(format!("{prefix}-labels-idx1-ubyte{ext}"));
    let enc = |b: Vec<u8>| if gz { gzip(&b) } else { b };
    std::fs::write(&ip, enc(images)).unwrap();
    std::fs::write(&lp, enc(label_file)).unwrap();
    (ip, lp)
}
