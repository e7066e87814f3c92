//! Choosing which items go into which batch: length-bucketed shuffling for training and
//! length-sorted order for evaluation.

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;

use crate::error::{DataError, Result};

/// Plans batches of item indices from item lengths. Deterministic given the seed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batcher {
    lengths: Vec<usize>,
    batch_size: usize,
    seed: u64,
    bucket_factor: usize,
}

impl Batcher {
    /// Items per length-sorted bucket, in batches: a bucket holds `50 × batch_size` items.
    pub const DEFAULT_BUCKET_FACTOR: usize = 50;

    /// A batcher over items of the given lengths (e.g. [`crate::EncodedSplit::lengths`]).
    pub fn new(lengths: Vec<usize>, batch_size: usize, seed: u64) -> Result<Self> {
        if batch_size == 0 {
            return Err(DataError::arg("batch_size", "expected at least 1, found 0"));
        }
        Ok(Self {
            lengths,
            batch_size,
            seed,
            bucket_factor: Self::DEFAULT_BUCKET_FACTOR,
        })
    }

    /// Sets how many batches' worth of items are sorted together (1 = batches of similar
    /// length only by chance; larger = less padding, less randomness).
    pub fn with_bucket_factor(mut self, factor: usize) -> Result<Self> {
        if factor == 0 {
            return Err(DataError::arg(
                "bucket_factor",
                "expected at least 1, found 0",
            ));
        }
        self.bucket_factor = factor;
        Ok(self)
    }

    /// Number of items.
    pub fn len(&self) -> usize {
        self.lengths.len()
    }

    /// Whether there are no items.
    pub fn is_empty(&self) -> bool {
        self.lengths.is_empty()
    }

    /// Items per batch (the last batch of a bucket may hold fewer).
    pub fn batch_size(&self) -> usize {
        self.batch_size
    }

    /// Number of batches [`Batcher::epoch_batches`] returns each epoch.
    pub fn num_batches(&self) -> usize {
        let bucket = self.bucket_len();
        let full = self.len() / bucket * bucket.div_ceil(self.batch_size);
        full + (self.len() % bucket).div_ceil(self.batch_size)
    }

    fn bucket_len(&self) -> usize {
        self.batch_size.saturating_mul(self.bucket_factor)
    }

    /// Training batches for `epoch`: shuffle all indices (seeded with `seed + epoch`), sort each
    /// bucket of `bucket_factor × batch_size` by length, cut buckets into batches, shuffle the
    /// batch order. Every index appears exactly once.
    ///
    /// ```
    /// use peft_data::Batcher;
    /// let batcher = Batcher::new(vec![5, 9, 3, 7, 4], 2, 42)?;
    /// let batches = batcher.epoch_batches(0);
    /// let mut all: Vec<usize> = batches.concat();
    /// all.sort();
    /// assert_eq!(all, [0, 1, 2, 3, 4]);
    /// assert_eq!(batches, batcher.epoch_batches(0));
    /// # Ok::<(), peft_data::DataError>(())
    /// ```
    pub fn epoch_batches(&self, epoch: u64) -> Vec<Vec<usize>> {
        let mut rng = StdRng::seed_from_u64(self.seed.wrapping_add(epoch));
        let mut order: Vec<usize> = (0..self.len()).collect();
        order.shuffle(&mut rng);
        let mut batches = Vec::with_capacity(self.num_batches());
        for bucket in order.chunks_mut(self.bucket_len()) {
            bucket.sort_by_key(|&i| self.lengths[i]);
            batches.extend(bucket.chunks(self.batch_size).map(<[usize]>::to_vec));
        }
        batches.shuffle(&mut rng);
        batches
    }

    /// Evaluation batches: all indices sorted by length, longest first (so memory problems
    /// show on the first batch), ties in index order. Use [`crate::Batch::indices`] to put
    /// results back in input order.
    pub fn sequential(&self) -> Vec<Vec<usize>> {
        let mut order: Vec<usize> = (0..self.len()).collect();
        order.sort_by_key(|&i| std::cmp::Reverse(self.lengths[i]));
        order
            .chunks(self.batch_size)
            .map(<[usize]>::to_vec)
            .collect()
    }
}
