//! Image classification data: sources, torchvision-equivalent preprocessing, augmentation,
//! splits and background batching.
//!
//! 1. A source gives an [`ImageDataset`] (items = image + class index, with class names) or
//!    [`ImageSplits`]: [`read_idx`] / [`read_idx_dir`] (MNIST, Fashion-MNIST; pixels kept in
//!    memory), [`read_image_folder`] / [`read_image_folder_splits`] (`root/<class>/<image>`,
//!    decoded lazily) or [`read_image_csv`] (paths and labels, optional split column).
//! 2. [`ImageSplits::with_valid_fraction`] and [`ImageDataset::limit`] cut seeded, stratified
//!    validation splits and subsets.
//! 3. [`ImageConfig`] sets the pipeline: evaluation = `Resize(resize)` (Pillow's bilinear,
//!    byte-exact) + `CenterCrop(crop)`; training = `RandomResizedCrop(crop)` +
//!    `RandomHorizontalFlip` from a `(seed, epoch, item)` stream; then `ToTensor` +
//!    `Normalize(mean, std)` to CHW `f32`, gray replicated to RGB.
//! 4. [`ImageLoader`] builds [`ImageBatch`]es in worker threads, a bounded number ahead of
//!    the consumer.
//!
//! ```no_run
//! use peft_data::image::{read_idx_dir, ImageConfig, ImageLoader, LoaderOptions, Mode,
//!     FASHION_MNIST_CLASSES};
//! let splits = read_idx_dir("assets/data/fashion-mnist", Some(&FASHION_MNIST_CLASSES))?
//!     .with_valid_fraction(0.1, 0)?;
//! let config = ImageConfig { mean: [0.5; 3], std: [0.5; 3], ..ImageConfig::new(64, 64) };
//! let train = splits.train.limit(20_000, 0)?;
//! let loader = ImageLoader::new(train, config, Mode::Train, 42, LoaderOptions::default())?;
//! for epoch in 0..3 {
//!     for batch in loader.epoch(epoch) {
//!         let batch = batch?; // batch.pixels: B×3×64×64, batch.labels: B
//!     }
//! }
//! # Ok::<(), peft_data::DataError>(())
//! ```

mod bitmap;
mod config;
mod csv;
mod dataset;
mod epoch;
mod folder;
mod idx;
mod loader;
mod resample;
mod rng;
mod subset;
mod transform;

pub use bitmap::{Bitmap, CropBox};
pub use config::{AugmentConfig, ImageConfig, OnBadImage, IMAGENET_MEAN, IMAGENET_STD};
pub use csv::{read_image_csv, CsvColumns};
pub use dataset::{ImageDataset, ImageItem, ImageSource, RawImages};
pub use epoch::EpochIter;
pub use folder::{read_image_folder, read_image_folder_splits, IMAGE_EXTENSIONS};
pub use idx::{read_idx, read_idx_dir, FASHION_MNIST_CLASSES};
pub use loader::{ImageBatch, ImageLoader, LoaderOptions, Mode};
pub use resample::Resizer;
pub use rng::ItemRng;
pub use subset::ImageSplits;
pub use transform::{center_crop_box, random_resized_crop_box, resize_shorter_size, Preprocessor};
