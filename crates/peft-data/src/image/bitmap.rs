//! 8-bit images (gray or RGB), decoding from PNG/JPEG/BMP, cropping and flipping.

use std::io::Cursor;
use std::path::Path;

use ::image::{DynamicImage, ImageReader};

use crate::error::{DataError, Result};

/// A rectangle of an image in pixels, as torchvision writes it: `(top, left, height, width)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CropBox {
    /// First row.
    pub top: usize,
    /// First column.
    pub left: usize,
    /// Number of rows.
    pub height: usize,
    /// Number of columns.
    pub width: usize,
}

impl CropBox {
    /// The whole of a `width × height` image.
    pub fn full(width: usize, height: usize) -> Self {
        Self {
            top: 0,
            left: 0,
            height,
            width,
        }
    }

    /// Whether the box is non-empty and lies inside a `width × height` image.
    pub fn fits(&self, width: usize, height: usize) -> bool {
        self.width > 0
            && self.height > 0
            && self
                .left
                .checked_add(self.width)
                .is_some_and(|r| r <= width)
            && self
                .top
                .checked_add(self.height)
                .is_some_and(|b| b <= height)
    }
}

/// An 8-bit image, row-major HWC, with 1 (gray) or 3 (RGB) channels.
///
/// Gray images stay gray through resizing and cropping (each RGB channel of a gray image would
/// get the same values) and are replicated to RGB when normalised, which is 3× cheaper than
/// converting first and gives the same numbers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bitmap {
    width: usize,
    height: usize,
    channels: usize,
    data: Vec<u8>,
}

impl Bitmap {
    /// An image from raw HWC bytes; `channels` is 1 or 3 and both sides are positive.
    pub fn new(width: usize, height: usize, channels: usize, data: Vec<u8>) -> Result<Self> {
        if channels != 1 && channels != 3 {
            return Err(DataError::arg(
                "bitmap channels",
                format!("expected 1 (gray) or 3 (RGB), found {channels}"),
            ));
        }
        if width == 0 || height == 0 {
            return Err(DataError::arg(
                "bitmap size",
                format!("expected positive sides, found {width}×{height}"),
            ));
        }
        let expected = width
            .checked_mul(height)
            .and_then(|n| n.checked_mul(channels));
        if expected != Some(data.len()) {
            return Err(DataError::arg(
                "bitmap data",
                format!(
                    "{width}×{height}×{channels} needs {} bytes, found {}",
                    width.saturating_mul(height).saturating_mul(channels),
                    data.len()
                ),
            ));
        }
        Ok(Self {
            width,
            height,
            channels,
            data,
        })
    }

    /// Reads and decodes an image file (see [`Bitmap::decode`]).
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(|e| DataError::io(path, e))?;
        Self::decode(&bytes, path)
    }

    /// Decodes a PNG, JPEG or BMP image (format from the bytes, not the name) to gray or RGB:
    /// gray+alpha and RGBA lose their alpha channel, as Pillow's `convert("RGB")` does. `path`
    /// only names the image in errors.
    pub fn decode(bytes: &[u8], path: &Path) -> Result<Self> {
        let image_err = |reason: String| DataError::Image {
            path: path.display().to_string(),
            reason,
        };
        let reader = ImageReader::new(Cursor::new(bytes))
            .with_guessed_format()
            .map_err(|e| image_err(e.to_string()))?;
        let image = reader.decode().map_err(|e| image_err(e.to_string()))?;
        let (width, height) = (image.width() as usize, image.height() as usize);
        let (channels, data) = match image {
            DynamicImage::ImageLuma8(b) => (1, b.into_raw()),
            DynamicImage::ImageLumaA8(b) => {
                (1, b.into_raw().chunks_exact(2).map(|p| p[0]).collect())
            }
            DynamicImage::ImageRgb8(b) => (3, b.into_raw()),
            DynamicImage::ImageRgba8(b) => (
                3,
                b.into_raw()
                    .chunks_exact(4)
                    .flat_map(|p| [p[0], p[1], p[2]])
                    .collect(),
            ),
            other => {
                return Err(DataError::ImageFormat {
                    path: path.display().to_string(),
                    found: format!("{:?}", other.color()),
                })
            }
        };
        if width == 0 || height == 0 {
            return Err(image_err(format!("empty image ({width}×{height})")));
        }
        Self::new(width, height, channels, data)
    }

    /// Width in pixels.
    pub fn width(&self) -> usize {
        self.width
    }

    /// Height in pixels.
    pub fn height(&self) -> usize {
        self.height
    }

    /// 1 (gray) or 3 (RGB).
    pub fn channels(&self) -> usize {
        self.channels
    }

    /// The pixels, row-major HWC.
    pub fn data(&self) -> &[u8] {
        &self.data
    }

    /// The pixels, row-major HWC.
    pub fn into_data(self) -> Vec<u8> {
        self.data
    }

    /// The value of channel `c` of pixel `(x, y)`; a gray image answers its one channel for
    /// every `c`.
    pub fn get(&self, x: usize, y: usize, c: usize) -> u8 {
        let c = if self.channels == 1 { 0 } else { c };
        self.data[(y * self.width + x) * self.channels + c]
    }

    /// The same image with 3 channels (gray replicated).
    pub fn to_rgb(&self) -> Bitmap {
        if self.channels == 3 {
            return self.clone();
        }
        Bitmap {
            width: self.width,
            height: self.height,
            channels: 3,
            data: self.data.iter().flat_map(|&v| [v, v, v]).collect(),
        }
    }

    /// The pixels inside `area`, which must fit (see [`CropBox::fits`]).
    pub fn crop(&self, area: CropBox) -> Result<Bitmap> {
        if !area.fits(self.width, self.height) {
            return Err(DataError::arg(
                "crop box",
                format!(
                    "{area:?} does not fit a {}×{} image",
                    self.width, self.height
                ),
            ));
        }
        if area == CropBox::full(self.width, self.height) {
            return Ok(self.clone());
        }
        let ch = self.channels;
        let mut data = Vec::with_capacity(area.width * area.height * ch);
        for y in area.top..area.top + area.height {
            let start = (y * self.width + area.left) * ch;
            data.extend_from_slice(&self.data[start..start + area.width * ch]);
        }
        Ok(Bitmap {
            width: area.width,
            height: area.height,
            channels: ch,
            data,
        })
    }

    /// Mirrors the image left to right in place.
    pub fn flip_horizontal(&mut self) {
        let ch = self.channels;
        for row in self.data.chunks_exact_mut(self.width * ch) {
            let w = self.width;
            for x in 0..w / 2 {
                for c in 0..ch {
                    row.swap(x * ch + c, (w - 1 - x) * ch + c);
                }
            }
        }
    }
}
