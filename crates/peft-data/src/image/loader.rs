//! Batches of normalised images and the loader that plans and builds them.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use serde::Deserialize;

use super::config::{ImageConfig, OnBadImage};
use super::dataset::ImageDataset;
use super::epoch::EpochIter;
use super::rng::{ItemRng, ORDER_STREAM};
use super::transform::Preprocessor;
use crate::error::{DataError, Result};

/// Whether a loader serves training (shuffled, augmented) or evaluation (in order).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Items shuffled from `(seed, epoch)`, augmented from `(seed, epoch, item)`.
    Train,
    /// Items in dataset order, resize + center crop only.
    Eval,
}

/// Batch size and threading of an [`ImageLoader`].
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LoaderOptions {
    /// Images per batch (the last batch may be smaller unless `drop_last`).
    pub batch_size: usize,
    /// Worker threads decoding and augmenting (at least 1).
    pub workers: usize,
    /// Most batches built ahead of the consumer (at least 1); bounds memory.
    pub prefetch: usize,
    /// Drop the last, incomplete batch of a training epoch.
    pub drop_last: bool,
}

impl Default for LoaderOptions {
    /// 64 images, 2 workers, 4 batches ahead, keep the last batch.
    fn default() -> Self {
        Self {
            batch_size: 64,
            workers: 2,
            prefetch: 4,
            drop_last: false,
        }
    }
}

/// A batch of normalised images, row-major `batch_size × 3 × height × width`.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ImageBatch {
    /// Normalised pixels, CHW per image.
    pub pixels: Vec<f32>,
    /// Class index per image.
    pub labels: Vec<u32>,
    /// Dataset index per image, to put predictions back in order.
    pub indices: Vec<usize>,
    /// Number of images (planned items minus skipped ones).
    pub batch_size: usize,
    /// Image height.
    pub height: usize,
    /// Image width.
    pub width: usize,
    /// Planned items left out because their image was bad (`on_bad_image = "skip"`).
    pub skipped: usize,
}

impl ImageBatch {
    /// The `3 × height × width` pixels of row `row`.
    pub fn image(&self, row: usize) -> &[f32] {
        let n = 3 * self.height * self.width;
        &self.pixels[row * n..(row + 1) * n]
    }
}

/// A built batch and the messages of the images it skipped.
pub(super) type Built = Result<(ImageBatch, Vec<String>)>;

/// What loaders and their workers share.
#[derive(Debug)]
pub(super) struct Shared {
    pub(super) dataset: ImageDataset,
    pub(super) pre: Preprocessor,
    pub(super) mode: Mode,
    pub(super) seed: u64,
    pub(super) options: LoaderOptions,
}

impl Shared {
    pub(super) fn build(&self, epoch: u64, indices: &[usize], stop: Option<&AtomicBool>) -> Built {
        let crop = self.pre.config().crop;
        let per = 3 * crop * crop;
        let mut batch = ImageBatch {
            pixels: vec![0.0; indices.len() * per],
            height: crop,
            width: crop,
            ..ImageBatch::default()
        };
        let mut reasons = Vec::new();
        for &i in indices {
            if stop.is_some_and(|s| s.load(Ordering::Relaxed)) {
                break;
            }
            let row = batch.batch_size;
            let out = &mut batch.pixels[row * per..(row + 1) * per];
            let done = self.dataset.load(i).and_then(|image| match self.mode {
                Mode::Eval => self.pre.eval_into(&image, out),
                Mode::Train => {
                    let mut rng = ItemRng::new(self.seed, epoch, i as u64);
                    self.pre.train_into(&image, &mut rng, out)
                }
            });
            match (done, self.pre.config().on_bad_image) {
                (Ok(()), _) => {
                    batch.labels.push(self.dataset.items()[i].label);
                    batch.indices.push(i);
                    batch.batch_size += 1;
                }
                (Err(e), OnBadImage::Fail) => return Err(e),
                (Err(e), OnBadImage::Skip) => {
                    batch.skipped += 1;
                    reasons.push(e.to_string());
                }
            }
        }
        batch.pixels.truncate(batch.batch_size * per);
        Ok((batch, reasons))
    }
}

/// Decodes, transforms and batches an [`ImageDataset`] in background threads.
///
/// ```
/// use peft_data::image::{ImageConfig, ImageDataset, ImageLoader, LoaderOptions, Mode, RawImages};
/// let raw = RawImages::new("toy", 28, 28, 1, vec![128; 28 * 28 * 10])?;
/// let data = ImageDataset::from_raw(raw, (0..10).map(|i| i % 2).collect(),
///                                   vec!["even".into(), "odd".into()])?;
/// let options = LoaderOptions { batch_size: 4, ..LoaderOptions::default() };
/// let loader = ImageLoader::new(data, ImageConfig::new(32, 32), Mode::Train, 42, options)?;
/// let mut seen = 0;
/// for batch in loader.epoch(0) {
///     let batch = batch?;
///     assert_eq!(batch.pixels.len(), batch.batch_size * 3 * 32 * 32);
///     seen += batch.batch_size;
/// }
/// assert_eq!(seen, 10);
/// # Ok::<(), peft_data::DataError>(())
/// ```
#[derive(Debug, Clone)]
pub struct ImageLoader {
    shared: Arc<Shared>,
}

impl ImageLoader {
    /// A loader of `dataset` through the pipeline of `config`; `seed` keys the shuffling and
    /// augmentation of [`Mode::Train`].
    pub fn new(
        dataset: ImageDataset,
        config: ImageConfig,
        mode: Mode,
        seed: u64,
        options: LoaderOptions,
    ) -> Result<Self> {
        for (name, value) in [
            ("batch_size", options.batch_size),
            ("workers", options.workers),
            ("prefetch", options.prefetch),
        ] {
            if value == 0 {
                return Err(DataError::arg(name, "expected at least 1, found 0"));
            }
        }
        let pre = Preprocessor::new(config)?;
        let shared = Shared {
            dataset,
            pre,
            mode,
            seed,
            options,
        };
        Ok(Self {
            shared: Arc::new(shared),
        })
    }

    /// The dataset.
    pub fn dataset(&self) -> &ImageDataset {
        &self.shared.dataset
    }

    /// The preprocessor (and through it the config).
    pub fn preprocessor(&self) -> &Preprocessor {
        &self.shared.pre
    }

    /// Number of batches per epoch.
    pub fn num_batches(&self) -> usize {
        let (n, b) = (self.shared.dataset.len(), self.shared.options.batch_size);
        match self.shared.mode {
            Mode::Train if self.shared.options.drop_last => n / b,
            _ => n.div_ceil(b),
        }
    }

    /// The item indices of each batch of `epoch`: a seeded shuffle for training, dataset
    /// order for evaluation.
    pub fn plan(&self, epoch: u64) -> Vec<Vec<usize>> {
        let s = &self.shared;
        let mut order: Vec<usize> = (0..s.dataset.len()).collect();
        if s.mode == Mode::Train {
            ItemRng::new(s.seed, epoch, ORDER_STREAM).shuffle(&mut order);
        }
        let mut batches: Vec<Vec<usize>> = order
            .chunks(s.options.batch_size)
            .map(<[usize]>::to_vec)
            .collect();
        batches.truncate(self.num_batches());
        batches
    }

    /// Builds one batch of `epoch` in the calling thread: the same content the workers build.
    pub fn batch(&self, epoch: u64, indices: &[usize]) -> Result<ImageBatch> {
        self.shared.build(epoch, indices, None).map(|(b, _)| b)
    }

    /// The batches of `epoch`, built in the background (see [`EpochIter`]).
    pub fn epoch(&self, epoch: u64) -> EpochIter {
        self.epoch_from(epoch, 0)
    }

    /// The batches of `epoch` from batch `first` on, e.g. to resume a run mid-epoch.
    pub fn epoch_from(&self, epoch: u64, first: usize) -> EpochIter {
        let mut plan = self.plan(epoch);
        plan.drain(..first.min(plan.len()));
        EpochIter::start(self.shared.clone(), epoch, plan)
    }
}
