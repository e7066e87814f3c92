//! torchvision's transforms on [`Bitmap`]s: `Resize` + `CenterCrop` (evaluation),
//! `RandomResizedCrop` + `RandomHorizontalFlip` (training), then `ToTensor` + `Normalize`.

use super::bitmap::{Bitmap, CropBox};
use super::config::{AugmentConfig, ImageConfig};
use super::resample::Resizer;
use super::rng::ItemRng;
use crate::error::{DataError, Result};

/// Python's `round` (half to even) of a non-negative float, as torchvision rounds sizes.
fn py_round(x: f64) -> usize {
    x.round_ties_even().max(0.0) as usize
}

/// Size `(width, height)` after torchvision's `Resize(size)`: the shorter side becomes `size`,
/// the longer `int(size * long / short)`.
pub fn resize_shorter_size(width: usize, height: usize, size: usize) -> (usize, usize) {
    let (short, long) = if width <= height {
        (width, height)
    } else {
        (height, width)
    };
    let new_long = (size as f64 * long as f64 / short as f64) as usize;
    if width <= height {
        (size, new_long)
    } else {
        (new_long, size)
    }
}

/// torchvision's `CenterCrop` box of a `crop × crop` square in a `width × height` image
/// (offsets `round((side - crop) / 2)`, half to even); `crop` must fit.
pub fn center_crop_box(width: usize, height: usize, crop: usize) -> CropBox {
    CropBox {
        top: py_round(height.saturating_sub(crop) as f64 / 2.0),
        left: py_round(width.saturating_sub(crop) as f64 / 2.0),
        height: crop.min(height),
        width: crop.min(width),
    }
}

/// torchvision's `RandomResizedCrop.get_params`: up to 10 tries of a random area fraction in
/// `scale` and a log-uniform aspect ratio in `ratio`, then the central fallback (the whole
/// image, clamped to the ratio range). The box always fits the image.
pub fn random_resized_crop_box(
    width: usize,
    height: usize,
    scale: [f64; 2],
    ratio: [f64; 2],
    rng: &mut ItemRng,
) -> CropBox {
    let area = (width * height) as f64;
    let (log_lo, log_hi) = (ratio[0].ln(), ratio[1].ln());
    for _ in 0..10 {
        let target_area = area * rng.uniform(scale[0], scale[1]);
        let aspect = rng.uniform(log_lo, log_hi).exp();
        let w = py_round((target_area * aspect).sqrt());
        let h = py_round((target_area / aspect).sqrt());
        if 0 < w && w <= width && 0 < h && h <= height {
            let top = rng.below(height - h + 1);
            let left = rng.below(width - w + 1);
            return CropBox {
                top,
                left,
                height: h,
                width: w,
            };
        }
    }
    let in_ratio = width as f64 / height as f64;
    let (w, h) = if in_ratio < ratio[0] {
        (width, py_round(width as f64 / ratio[0]).clamp(1, height))
    } else if in_ratio > ratio[1] {
        (py_round(height as f64 * ratio[1]).clamp(1, width), height)
    } else {
        (width, height)
    };
    CropBox {
        top: (height - h) / 2,
        left: (width - w) / 2,
        height: h,
        width: w,
    }
}

/// Turns decoded images into normalised `3 × crop × crop` CHW `f32` buffers.
#[derive(Debug)]
pub struct Preprocessor {
    config: ImageConfig,
    resizer: Resizer,
    /// `lut[c][v] = (v / 255 - mean[c]) / std[c]`, in `f32` like torchvision.
    lut: [[f32; 256]; 3],
}

impl Preprocessor {
    /// A preprocessor for a validated `config`.
    pub fn new(config: ImageConfig) -> Result<Self> {
        config.validate()?;
        let mut lut = [[0f32; 256]; 3];
        for (c, table) in lut.iter_mut().enumerate() {
            for (v, out) in table.iter_mut().enumerate() {
                *out = (v as f32 / 255.0 - config.mean[c]) / config.std[c];
            }
        }
        Ok(Self {
            config,
            resizer: Resizer::new(),
            lut,
        })
    }

    /// The options.
    pub fn config(&self) -> &ImageConfig {
        &self.config
    }

    /// The resizer (and its weight cache).
    pub fn resizer(&self) -> &Resizer {
        &self.resizer
    }

    /// Evaluation geometry in `u8`: `Resize(resize)` then `CenterCrop(crop)`.
    pub fn eval_bitmap(&self, image: &Bitmap) -> Result<Bitmap> {
        let (w, h) = (image.width(), image.height());
        let (rw, rh) = resize_shorter_size(w, h, self.config.resize);
        let area = center_crop_box(rw, rh, self.config.crop);
        if (rw, rh) == (w, h) {
            return image.crop(area);
        }
        if area == CropBox::full(rw, rh) {
            return self.resizer.resize(image, rw, rh);
        }
        self.resizer.resize(image, rw, rh)?.crop(area)
    }

    /// Training geometry in `u8`: `RandomResizedCrop(crop)` (or the evaluation geometry when
    /// off), then `RandomHorizontalFlip`, drawing from `rng`.
    pub fn train_bitmap(&self, image: &Bitmap, rng: &mut ItemRng) -> Result<Bitmap> {
        let aug: &AugmentConfig = &self.config.augment;
        let mut out = if aug.random_resized_crop {
            let (w, h) = (image.width(), image.height());
            let area = random_resized_crop_box(w, h, aug.scale, aug.ratio, rng);
            let crop = self.config.crop;
            self.resizer.resize_area(image, area, crop, crop)?
        } else {
            self.eval_bitmap(image)?
        };
        if aug.horizontal_flip && rng.next_f64() < aug.flip_probability {
            out.flip_horizontal();
        }
        Ok(out)
    }

    /// `ToTensor` + `Normalize` of a `crop × crop` bitmap into `out` (`3 × crop × crop`, CHW);
    /// gray images are replicated to the three channels.
    pub fn normalize_into(&self, image: &Bitmap, out: &mut [f32]) -> Result<()> {
        let crop = self.config.crop;
        if (image.width(), image.height()) != (crop, crop) || out.len() != 3 * crop * crop {
            return Err(DataError::arg(
                "normalize",
                format!(
                    "expected a {crop}×{crop} image and {} outputs, found {}×{} and {}",
                    3 * crop * crop,
                    image.width(),
                    image.height(),
                    out.len()
                ),
            ));
        }
        let ch = image.channels();
        for (c, plane) in out.chunks_exact_mut(crop * crop).enumerate() {
            let lut = &self.lut[c];
            let first = if ch == 1 { 0 } else { c };
            let values = image.data()[first..].iter().step_by(ch);
            for (o, &v) in plane.iter_mut().zip(values) {
                *o = lut[usize::from(v)];
            }
        }
        Ok(())
    }

    /// The evaluation path: [`Preprocessor::eval_bitmap`] then normalise into `out`.
    pub fn eval_into(&self, image: &Bitmap, out: &mut [f32]) -> Result<()> {
        self.normalize_into(&self.eval_bitmap(image)?, out)
    }

    /// The training path: [`Preprocessor::train_bitmap`] then normalise into `out`.
    pub fn train_into(&self, image: &Bitmap, rng: &mut ItemRng, out: &mut [f32]) -> Result<()> {
        self.normalize_into(&self.train_bitmap(image, rng)?, out)
    }
}
