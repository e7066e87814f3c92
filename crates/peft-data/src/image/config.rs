//! Options of the image pipeline: sizes, normalisation, augmentation and bad-image policy.

use serde::Deserialize;

use crate::error::{DataError, Result};

/// ImageNet channel means (RGB), torchvision's usual `Normalize` mean.
pub const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];

/// ImageNet channel standard deviations (RGB), torchvision's usual `Normalize` std.
pub const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];

/// What the loader does with an image it cannot read or decode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OnBadImage {
    /// Stop the epoch with an error naming the file and the decoder's reason.
    #[default]
    Fail,
    /// Leave the item out of its batch and count it (see [`super::ImageBatch::skipped`]).
    Skip,
}

/// Training augmentation: torchvision's `RandomResizedCrop` and `RandomHorizontalFlip`.
#[derive(Debug, Clone, PartialEq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AugmentConfig {
    /// Crop a random area and aspect ratio, resized to `crop × crop` (instead of resize +
    /// center crop).
    pub random_resized_crop: bool,
    /// Range of the crop's area as a fraction of the image's.
    pub scale: [f64; 2],
    /// Range of the crop's aspect ratio (width / height), drawn log-uniformly.
    pub ratio: [f64; 2],
    /// Mirror left to right at random.
    pub horizontal_flip: bool,
    /// Probability of a flip.
    pub flip_probability: f64,
}

impl Default for AugmentConfig {
    /// Both augmentations on, with torchvision's defaults: scale (0.08, 1), ratio (3/4, 4/3),
    /// flip probability 0.5.
    fn default() -> Self {
        Self {
            random_resized_crop: true,
            scale: [0.08, 1.0],
            ratio: [3.0 / 4.0, 4.0 / 3.0],
            horizontal_flip: true,
            flip_probability: 0.5,
        }
    }
}

impl AugmentConfig {
    /// No augmentation: training images go through the evaluation path.
    pub fn none() -> Self {
        Self {
            random_resized_crop: false,
            horizontal_flip: false,
            ..Self::default()
        }
    }

    fn validate(&self) -> Result<()> {
        let [lo, hi] = self.scale;
        if !(lo > 0.0 && lo <= hi && hi <= 1.0) {
            return Err(DataError::arg(
                "augment.scale",
                format!("expected 0 < min <= max <= 1, found [{lo}, {hi}]"),
            ));
        }
        let [lo, hi] = self.ratio;
        if !(lo > 0.0 && lo <= hi && hi.is_finite()) {
            return Err(DataError::arg(
                "augment.ratio",
                format!("expected 0 < min <= max, found [{lo}, {hi}]"),
            ));
        }
        let p = self.flip_probability;
        if !(0.0..=1.0).contains(&p) {
            return Err(DataError::arg(
                "augment.flip_probability",
                format!("expected a probability in [0, 1], found {p}"),
            ));
        }
        Ok(())
    }
}

/// The image pipeline's options, e.g. from a TOML/JSON table:
///
/// ```
/// use peft_data::image::{ImageConfig, OnBadImage};
/// let config: ImageConfig = serde_json::from_str(r#"{
///     "resize": 64, "crop": 64, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5],
///     "augment": { "horizontal_flip": false }, "on_bad_image": "skip"
/// }"#).unwrap();
/// config.validate()?;
/// assert!(config.augment.random_resized_crop && !config.augment.horizontal_flip);
/// assert_eq!(config.on_bad_image, OnBadImage::Skip);
/// assert!(serde_json::from_str::<ImageConfig>(r#"{ "size": 64 }"#).is_err());
/// # Ok::<(), peft_data::DataError>(())
/// ```
#[derive(Debug, Clone, PartialEq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ImageConfig {
    /// The shorter side after resizing (torchvision's `Resize(resize)`), evaluation path.
    pub resize: usize,
    /// Side of the square output (`CenterCrop(crop)` or `RandomResizedCrop(crop)`).
    pub crop: usize,
    /// Per-channel mean subtracted after scaling to [0, 1] (RGB).
    pub mean: [f32; 3],
    /// Per-channel standard deviation divided by (RGB).
    pub std: [f32; 3],
    /// Training augmentation (used by training loaders only).
    pub augment: AugmentConfig,
    /// What to do with unreadable or undecodable images.
    pub on_bad_image: OnBadImage,
}

impl Default for ImageConfig {
    /// ImageNet style: resize 256, crop 224, ImageNet mean/std, default augmentation, fail on
    /// bad images.
    fn default() -> Self {
        Self {
            resize: 256,
            crop: 224,
            mean: IMAGENET_MEAN,
            std: IMAGENET_STD,
            augment: AugmentConfig::default(),
            on_bad_image: OnBadImage::Fail,
        }
    }
}

impl ImageConfig {
    /// Defaults with the given resize and crop sizes.
    pub fn new(resize: usize, crop: usize) -> Self {
        Self {
            resize,
            crop,
            ..Self::default()
        }
    }

    /// The `preprocessor_config.json` with which transformers' `AutoImageProcessor` prepares
    /// images as this evaluation path does: a `BitImageProcessor` that converts to RGB, resizes
    /// the shorter side to `resize` (bilinear, as Pillow), center-crops `crop`, rescales by 1/255
    /// and normalises with `mean`/`std` (checked against `peft-rs predict` by
    /// tests/fixtures/dinov2_onnx/check_merged_adapter.py).
    pub fn hf_image_processor(&self) -> serde_json::Value {
        // f32 statistics written as the decimals they were given in (0.485, not 0.48500001).
        let decimal = |v: &[f32; 3]| -> Vec<f64> {
            v.iter()
                .map(|x| format!("{x}").parse().unwrap_or(f64::from(*x)))
                .collect()
        };
        serde_json::json!({
            "image_processor_type": "BitImageProcessor",
            "do_convert_rgb": true,
            "do_resize": true,
            "size": { "shortest_edge": self.resize },
            "resample": 2,
            "do_center_crop": true,
            "crop_size": { "height": self.crop, "width": self.crop },
            "do_rescale": true,
            "rescale_factor": 1.0 / 255.0,
            "do_normalize": true,
            "image_mean": decimal(&self.mean),
            "image_std": decimal(&self.std),
        })
    }

    /// Checks every option's range; the error names the option.
    pub fn validate(&self) -> Result<()> {
        if self.resize == 0 {
            return Err(DataError::arg("resize", "expected at least 1, found 0"));
        }
        if self.crop == 0 || self.crop > self.resize {
            return Err(DataError::arg(
                "crop",
                format!(
                    "expected 1..={} (at most resize, so the center crop fits), found {}",
                    self.resize, self.crop
                ),
            ));
        }
        if let Some(c) = (0..3).find(|&c| !self.mean[c].is_finite()) {
            return Err(DataError::arg(
                "mean",
                format!(
                    "channel {c}: expected a finite number, found {}",
                    self.mean[c]
                ),
            ));
        }
        if let Some(c) = (0..3).find(|&c| !(self.std[c] > 0.0 && self.std[c].is_finite())) {
            return Err(DataError::arg(
                "std",
                format!(
                    "channel {c}: expected a positive number, found {}",
                    self.std[c]
                ),
            ));
        }
        self.augment.validate()
    }

    /// Number of `f32` values of one normalised image: `3 × crop × crop`.
    pub fn image_len(&self) -> usize {
        3 * self.crop * self.crop
    }
}
