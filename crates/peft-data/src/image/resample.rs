//! Bilinear resizing with the exact arithmetic of Pillow's `Image.resize(size, BILINEAR)`.
//!
//! Pillow resizes with a separable triangle filter whose support grows with the downscale
//! factor (so shrinking is antialiased; enlarging is plain bilinear with half-pixel centres).
//! Weights are computed in `f64`, normalised per output sample, converted to 22-bit fixed
//! point, and each pass (horizontal first, then vertical) rounds to `u8`. This module repeats
//! those steps exactly, so its output equals Pillow's byte for byte.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use super::bitmap::{Bitmap, CropBox};
use crate::error::{DataError, Result};

/// Fixed-point fraction bits of Pillow's 8-bit resampling (`32 - 8 - 2`).
const PRECISION_BITS: u32 = 22;

/// Weight caches larger than this are cleared (random crops of huge images only).
const MAX_CACHED: usize = 4096;

/// Integer filter weights for resampling one axis from `in_size` to `out_size` samples.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct AxisWeights {
    /// Weights per output sample (only the first `bounds[i].1` of each row are used).
    ksize: usize,
    /// Per output sample: first input sample and number of taps.
    bounds: Vec<(usize, usize)>,
    /// `out_size × ksize` fixed-point weights.
    weights: Vec<i32>,
}

/// Pillow's `bilinear_filter`: the triangle `max(0, 1 - |x|)`.
fn triangle(x: f64) -> f64 {
    let x = x.abs();
    if x < 1.0 {
        1.0 - x
    } else {
        0.0
    }
}

impl AxisWeights {
    /// Pillow's `precompute_coeffs` + `normalize_coeffs_8bpc` for the box `[0, in_size)`.
    pub(crate) fn bilinear(in_size: usize, out_size: usize) -> Self {
        let scale = in_size as f64 / out_size as f64;
        let filterscale = scale.max(1.0);
        let support = filterscale; // the triangle's support is 1
        let ksize = support.ceil() as usize * 2 + 1;
        let ss = 1.0 / filterscale;
        let mut bounds = Vec::with_capacity(out_size);
        let mut weights = vec![0i32; out_size * ksize];
        let mut k = vec![0f64; ksize];
        for xx in 0..out_size {
            let center = (xx as f64 + 0.5) * scale;
            // C's `(int)` truncates toward zero, as `as i64` does.
            let xmin = ((center - support + 0.5) as i64).max(0);
            let xmax = ((center + support + 0.5) as i64).min(in_size as i64);
            let taps = (xmax - xmin).clamp(0, ksize as i64) as usize;
            let mut total = 0.0;
            for (x, w) in k.iter_mut().enumerate().take(taps) {
                *w = triangle(((x as i64 + xmin) as f64 - center + 0.5) * ss);
                total += *w;
            }
            let row = &mut weights[xx * ksize..xx * ksize + taps];
            for (dst, &w) in row.iter_mut().zip(&k) {
                let w = if total != 0.0 { w / total } else { w };
                let fixed = w * f64::from(1u32 << PRECISION_BITS);
                *dst = if w < 0.0 {
                    (-0.5 + fixed) as i32
                } else {
                    (0.5 + fixed) as i32
                };
            }
            bounds.push((xmin as usize, taps));
        }
        Self {
            ksize,
            bounds,
            weights,
        }
    }

    fn taps(&self, i: usize) -> (usize, &[i32]) {
        let (start, n) = self.bounds[i];
        (start, &self.weights[i * self.ksize..i * self.ksize + n])
    }
}

/// Pillow's `clip8`: fixed point to `u8`, saturating.
#[inline]
fn clip8(v: i32) -> u8 {
    if v >= (1 << PRECISION_BITS << 8) {
        255
    } else if v <= 0 {
        0
    } else {
        (v >> PRECISION_BITS) as u8
    }
}

/// Horizontal pass over `rows` rows of `src` (row stride `stride` bytes, starting at byte
/// `offset`), `C` channels, into `out` (`rows × out_w × C`).
fn horizontal<const C: usize>(
    src: &[u8],
    stride: usize,
    offset: usize,
    rows: usize,
    w: &AxisWeights,
    out: &mut [u8],
) {
    let out_w = w.bounds.len();
    for r in 0..rows {
        let line = &src[offset + r * stride..];
        let dst = &mut out[r * out_w * C..(r + 1) * out_w * C];
        for (xx, px) in dst.chunks_exact_mut(C).enumerate() {
            let (start, k) = w.taps(xx);
            let mut ss = [1i32 << (PRECISION_BITS - 1); C];
            for (i, &wk) in k.iter().enumerate() {
                let p = &line[(start + i) * C..(start + i) * C + C];
                for c in 0..C {
                    ss[c] += i32::from(p[c]) * wk;
                }
            }
            for c in 0..C {
                px[c] = clip8(ss[c]);
            }
        }
    }
}

/// Vertical pass: output row `yy` mixes rows `bounds[yy] - skip` of `src` (row stride
/// `stride`, each row's `len` bytes starting at byte `offset`).
fn vertical(
    src: &[u8],
    (stride, offset, len): (usize, usize, usize),
    skip: usize,
    w: &AxisWeights,
    out: &mut [u8],
) {
    let mut acc = vec![0i32; len];
    for (yy, dst) in out.chunks_exact_mut(len).enumerate() {
        let (start, k) = w.taps(yy);
        acc.fill(1 << (PRECISION_BITS - 1));
        for (i, &wk) in k.iter().enumerate() {
            let row = offset + (start + i - skip) * stride;
            for (a, &p) in acc.iter_mut().zip(&src[row..row + len]) {
                *a += i32::from(p) * wk;
            }
        }
        for (d, &a) in dst.iter_mut().zip(&acc) {
            *d = clip8(a);
        }
    }
}

/// Resizes images with Pillow's bilinear filter, caching the weights of each
/// (input size, output size) pair. Shareable between threads.
#[derive(Debug, Default)]
pub struct Resizer {
    cache: Mutex<HashMap<(usize, usize), Arc<AxisWeights>>>,
}

impl Resizer {
    /// An empty resizer.
    pub fn new() -> Self {
        Self::default()
    }

    fn weights(&self, in_size: usize, out_size: usize) -> Arc<AxisWeights> {
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if cache.len() >= MAX_CACHED {
            cache.clear();
        }
        cache
            .entry((in_size, out_size))
            .or_insert_with(|| Arc::new(AxisWeights::bilinear(in_size, out_size)))
            .clone()
    }

    /// `img.resize((width, height), Image.BILINEAR)`.
    pub fn resize(&self, src: &Bitmap, width: usize, height: usize) -> Result<Bitmap> {
        let all = CropBox::full(src.width(), src.height());
        self.resize_area(src, all, width, height)
    }

    /// `img.crop(area).resize((width, height), Image.BILINEAR)`, without copying the crop:
    /// what torchvision's `resized_crop` does on PIL images.
    pub fn resize_area(
        &self,
        src: &Bitmap,
        area: CropBox,
        width: usize,
        height: usize,
    ) -> Result<Bitmap> {
        if width == 0 || height == 0 {
            return Err(DataError::arg(
                "resize",
                format!("expected a positive output size, found {width}×{height}"),
            ));
        }
        if !area.fits(src.width(), src.height()) {
            return src.crop(area); // reports the bad box
        }
        let need_h = width != area.width;
        let need_v = height != area.height;
        if !need_h && !need_v {
            return src.crop(area);
        }
        let ch = src.channels();
        let stride = src.width() * ch;
        let base = area.top * stride + area.left * ch;
        let vw = need_v.then(|| self.weights(area.height, height));
        // Rows of the area the vertical pass reads (all of them without a vertical pass).
        let (first, last) = match &vw {
            Some(vw) => {
                let (s, _) = vw.bounds[0];
                let (e, n) = vw.bounds[height - 1];
                (s, e + n)
            }
            None => (0, area.height),
        };
        let mut out = vec![0u8; width * height * ch];
        if need_h {
            let hw = self.weights(area.width, width);
            let rows = last - first;
            let mut tmp = if need_v {
                vec![0u8; rows * width * ch]
            } else {
                Vec::new()
            };
            let dst = if need_v { &mut tmp[..] } else { &mut out[..] };
            let offset = base + first * stride;
            match ch {
                1 => horizontal::<1>(src.data(), stride, offset, rows, &hw, dst),
                _ => horizontal::<3>(src.data(), stride, offset, rows, &hw, dst),
            }
            if let Some(vw) = &vw {
                // `tmp` holds rows first..last of the area (Pillow's "shift bounds").
                let len = width * ch;
                vertical(&tmp, (len, 0, len), first, vw, &mut out);
            }
        } else if let Some(vw) = &vw {
            vertical(src.data(), (stride, base, width * ch), 0, vw, &mut out);
        }
        Bitmap::new(width, height, ch, out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_weights_copy() {
        let w = AxisWeights::bilinear(5, 5);
        for i in 0..5 {
            let (start, k) = w.taps(i);
            assert_eq!(start, i);
            assert_eq!(k[0], 1 << PRECISION_BITS);
            assert!(k[1..].iter().all(|&x| x == 0));
        }
    }

    #[test]
    fn downscale_weights_follow_pillow() {
        // 4 -> 2: scale 2, support 2. Output 0 is centred on 1.0 and reads inputs 0..3 with
        // triangle weights 0.75, 0.75, 0.25, normalised to 3/7, 3/7, 1/7 in 22-bit fixed point.
        let w = AxisWeights::bilinear(4, 2);
        let (start, k) = w.taps(0);
        assert_eq!((start, k), (0, &[1_797_559, 1_797_559, 599_186][..]));
        let (start, k) = w.taps(1);
        assert_eq!((start, k), (1, &[599_186, 1_797_559, 1_797_559][..]));
    }

    #[test]
    fn upscale_is_plain_bilinear() {
        // 2 -> 4: output 1 (centre 0.75) mixes inputs 0 and 1 as 0.75 / 0.25.
        let w = AxisWeights::bilinear(2, 4);
        let (start, k) = w.taps(1);
        assert_eq!((start, k), (0, &[3 << 20, 1 << 20][..]));
        let (start, k) = w.taps(0);
        assert_eq!((start, k), (0, &[1 << 22][..]));
    }
}
