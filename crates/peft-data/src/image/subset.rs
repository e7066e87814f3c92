//! Seeded, class-stratified subsets and validation splits, and the train/valid/test bundle.

use super::dataset::ImageDataset;
use super::rng::{ItemRng, SUBSET_STREAM};
use crate::error::{DataError, Result};

impl ImageDataset {
    /// A seeded, class-stratified subset of `n` items (all of them when `n >= len`), in
    /// dataset order: each class keeps its share, rounded by largest remainder.
    ///
    /// ```
    /// use peft_data::image::{ImageDataset, RawImages};
    /// let raw = RawImages::new("toy", 2, 2, 1, vec![0; 4 * 100])?;
    /// let labels = (0..100).map(|i| (i % 4 == 0) as u32).collect();
    /// let data = ImageDataset::from_raw(raw, labels, vec!["a".into(), "b".into()])?;
    /// let small = data.limit(20, 0)?;
    /// assert_eq!(small.class_counts(), [15, 5]);
    /// # Ok::<(), peft_data::DataError>(())
    /// ```
    pub fn limit(&self, n: usize, seed: u64) -> Result<Self> {
        if n == 0 {
            return Err(DataError::arg("limit", "expected at least 1 item, found 0"));
        }
        if n >= self.len() {
            return Ok(self.clone());
        }
        self.subset(&self.stratified_pick(n, seed))
    }

    /// Splits off a seeded, class-stratified `fraction` of the items: `(rest, split_off)`,
    /// both in dataset order (e.g. a validation split from a training set).
    pub fn split_off(&self, fraction: f64, seed: u64) -> Result<(Self, Self)> {
        let n = (fraction * self.len() as f64).round() as usize;
        if !(fraction > 0.0 && fraction < 1.0) || n == 0 || n >= self.len() {
            return Err(DataError::arg(
                "valid_fraction",
                format!(
                    "expected a fraction in (0, 1) leaving both parts non-empty; {fraction} of \
                     {} items in {} gives {n}",
                    self.len(),
                    self.name()
                ),
            ));
        }
        let picked = self.stratified_pick(n, seed);
        let mut keep = vec![true; self.len()];
        for &i in &picked {
            keep[i] = false;
        }
        let rest: Vec<usize> = (0..self.len()).filter(|&i| keep[i]).collect();
        Ok((self.subset(&rest)?, self.subset(&picked)?))
    }

    /// `n` sorted item indices, each class contributing its share of `n`.
    fn stratified_pick(&self, n: usize, seed: u64) -> Vec<usize> {
        let total = self.len() as u128;
        let mut by_class: Vec<Vec<usize>> = vec![Vec::new(); self.classes().len()];
        for (i, it) in self.items().iter().enumerate() {
            by_class[it.label as usize].push(i);
        }
        let share = |c: &Vec<usize>| (n as u128 * c.len() as u128 / total) as usize;
        let remainder = |c: &Vec<usize>| n as u128 * c.len() as u128 % total;
        let mut quota: Vec<usize> = by_class.iter().map(share).collect();
        let mut order: Vec<usize> = (0..by_class.len()).collect();
        order.sort_by_key(|&c| std::cmp::Reverse(remainder(&by_class[c])));
        let missing = n - quota.iter().sum::<usize>();
        for &c in order.iter().take(missing) {
            quota[c] += 1;
        }
        let mut rng = ItemRng::new(seed, SUBSET_STREAM, 0);
        let mut picked = Vec::with_capacity(n);
        for (members, q) in by_class.iter_mut().zip(quota) {
            rng.shuffle(members);
            picked.extend_from_slice(&members[..q]);
        }
        picked.sort_unstable();
        picked
    }
}

/// The train/valid/test splits of a source, sharing one class list.
#[derive(Debug, Clone)]
pub struct ImageSplits {
    /// Training items (defines the classes).
    pub train: ImageDataset,
    /// Validation items, when the source has them (or after
    /// [`ImageSplits::with_valid_fraction`]).
    pub valid: Option<ImageDataset>,
    /// Test items, when the source has them.
    pub test: Option<ImageDataset>,
}

impl ImageSplits {
    /// Class names (the training split's).
    pub fn classes(&self) -> &[String] {
        self.train.classes()
    }

    /// Keeps a given validation split; without one, splits a seeded, stratified `fraction` of
    /// the training items off as validation.
    pub fn with_valid_fraction(self, fraction: f64, seed: u64) -> Result<Self> {
        if self.valid.is_some() {
            return Ok(self);
        }
        let (train, valid) = self.train.split_off(fraction, seed)?;
        Ok(Self {
            train,
            valid: Some(valid),
            test: self.test,
        })
    }
}
