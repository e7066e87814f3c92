//! Image classification: batches from an [`ImageLoader`] (decoded and augmented by its workers
//! while the model trains), mean cross-entropy, and accuracy with per-class detail.

use std::sync::{Arc, Mutex};

use candle_core::{Device, Tensor, D};
use peft_core::{BatchNorm2d, BatchNormMode};
use peft_data::image::{EpochIter, ImageBatch, ImageLoader};
use peft_models::ImageClassifier;
use serde::Serialize;

use super::candle;
use crate::error::{Result, TrainError};
use crate::trainer::{Evaluation, Task};

/// The pixels of a batch as a `(batch, 3, h, w)` tensor on `device`.
pub fn batch_pixels(batch: &ImageBatch, device: &Device) -> Result<Tensor> {
    let shape = (batch.batch_size, 3, batch.height, batch.width);
    candle(
        "image batch",
        Tensor::from_slice(&batch.pixels, shape, device),
    )
}

/// Mean cross-entropy of `logits` `(batch, classes)` against `labels`.
pub fn cross_entropy(logits: &Tensor, labels: &[u32]) -> Result<Tensor> {
    let device = logits.device();
    let targets = candle("labels", Tensor::from_slice(labels, labels.len(), device))?;
    let logits = candle("logits", logits.to_dtype(candle_core::DType::F32))?;
    candle(
        "cross-entropy",
        candle_nn::loss::cross_entropy(&logits, &targets),
    )
}

/// Accuracy and loss over a split, with per-class accuracy.
#[derive(Clone, Debug, Serialize)]
pub struct ImageScores {
    /// Fraction of images whose arg-max class is the label.
    pub accuracy: f64,
    /// Mean cross-entropy.
    pub loss: f64,
    /// Images scored.
    pub images: usize,
    /// Images left out as unreadable (`on_bad_image = "skip"`).
    pub skipped: usize,
    /// Accuracy per class, in class order.
    pub per_class: Vec<(String, f64)>,
}

/// Scores `model` on every batch of `loader` (evaluation mode), with `classes` naming the labels.
pub fn evaluate_images(
    model: &dyn ImageClassifier,
    loader: &ImageLoader,
    classes: &[String],
    device: &Device,
) -> Result<ImageScores> {
    let (mut correct, mut total, mut loss_sum) = (0usize, 0usize, 0f64);
    let mut per_class = vec![(0usize, 0usize); classes.len()];
    let mut batches = loader.epoch(0);
    for batch in batches.by_ref() {
        let batch = batch?;
        let logits = model.forward(&batch_pixels(&batch, device)?, false)?;
        let loss = cross_entropy(&logits, &batch.labels)?;
        loss_sum += candle("loss", loss.to_scalar::<f32>())? as f64 * batch.batch_size as f64;
        let preds = candle(
            "predictions",
            logits.argmax(D::Minus1).and_then(|p| p.to_vec1::<u32>()),
        )?;
        for (p, l) in preds.iter().zip(&batch.labels) {
            let hit = p == l;
            correct += hit as usize;
            if let Some(c) = per_class.get_mut(*l as usize) {
                c.0 += hit as usize;
                c.1 += 1;
            }
        }
        total += batch.batch_size;
    }
    Ok(ImageScores {
        accuracy: correct as f64 / total.max(1) as f64,
        loss: loss_sum / total.max(1) as f64,
        images: total,
        skipped: batches.skipped(),
        per_class: classes
            .iter()
            .zip(per_class)
            .map(|(name, (hit, n))| (name.clone(), hit as f64 / n.max(1) as f64))
            .collect(),
    })
}

/// The image classification task for the trainer loop.
pub struct ImageClassification<'a> {
    model: &'a dyn ImageClassifier,
    train: ImageLoader,
    valid: ImageLoader,
    classes: Vec<String>,
    device: Device,
    /// The epoch the trainer asked for last, and its batches as the loader's workers build them.
    current: Mutex<(u64, Option<EpochIter>)>,
    /// The model's BatchNorms that update their statistics (kept with the best epoch).
    batch_norms: Vec<Arc<BatchNorm2d>>,
}

impl<'a> ImageClassification<'a> {
    /// A task training `model` on `train` (a training-mode loader) and scoring on `valid`.
    pub fn new(
        model: &'a dyn ImageClassifier,
        train: ImageLoader,
        valid: ImageLoader,
        classes: Vec<String>,
        device: Device,
    ) -> Self {
        Self {
            model,
            train,
            valid,
            classes,
            device,
            current: Mutex::new((0, None)),
            batch_norms: Vec::new(),
        }
    }

    /// The model's BatchNorm layers, whose running statistics the trainer then snapshots with
    /// the best epoch's weights (those in [`BatchNormMode::Frozen`] are left out: they do not
    /// change).
    pub fn with_batch_norms(mut self, batch_norms: Vec<Arc<BatchNorm2d>>) -> Self {
        self.batch_norms = batch_norms
            .into_iter()
            .filter(|bn| bn.mode() == BatchNormMode::Update)
            .collect();
        self
    }

    /// The next prepared batch of the current epoch; it must hold `indices` (the trainer's plan),
    /// else the batch is built here.
    fn next_batch(&self, indices: &[usize]) -> Result<ImageBatch> {
        let mut current = self.current.lock().unwrap_or_else(|e| e.into_inner());
        let epoch = current.0;
        if current.1.is_none() {
            current.1 = Some(self.train.epoch(epoch));
        }
        let next = current.1.as_mut().and_then(Iterator::next).transpose()?;
        match next {
            Some(b) if b.indices == indices || b.skipped > 0 => Ok(b),
            _ => Ok(self.train.batch(epoch, indices)?),
        }
    }
}

impl Task for ImageClassification<'_> {
    fn batch_norms(&self) -> Vec<Arc<BatchNorm2d>> {
        self.batch_norms.clone()
    }

    fn epoch_batches(&self, epoch: usize) -> Vec<Vec<usize>> {
        let mut current = self.current.lock().unwrap_or_else(|e| e.into_inner());
        // A new epoch: drop the previous workers; the next `loss` starts this epoch's.
        *current = (epoch as u64, None);
        self.train.plan(epoch as u64)
    }

    fn loss(&self, batch: &[usize], train: bool) -> Result<(Tensor, usize)> {
        let b = self.next_batch(batch)?;
        if b.batch_size == 0 {
            return Err(TrainError::config(
                "images.on_bad_image",
                "every image of a training batch was unreadable",
            ));
        }
        let logits = self
            .model
            .forward(&batch_pixels(&b, &self.device)?, train)?;
        Ok((cross_entropy(&logits, &b.labels)?, b.batch_size))
    }

    fn evaluate(&self) -> Result<Evaluation> {
        let s = evaluate_images(self.model, &self.valid, &self.classes, &self.device)?;
        Ok(Evaluation {
            score: s.accuracy,
            loss: Some(s.loss),
            details: serde_json::to_value(&s).unwrap_or_default(),
        })
    }
}
