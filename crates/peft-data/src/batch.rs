//! Padding encoded sentences into row-major batches.

use std::ops::Range;

use crate::align::{Encoded, IGNORE_INDEX};
use crate::error::{DataError, Result};

/// A padded batch, each buffer row-major `batch_size × seq_len`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Batch {
    /// Sub-token ids, padded with the pad id.
    pub input_ids: Vec<u32>,
    /// 1 on real tokens, 0 on padding.
    pub attention_mask: Vec<u32>,
    /// Segment ids, padded with 0.
    pub token_type_ids: Vec<u32>,
    /// Label ids, padded with [`IGNORE_INDEX`].
    pub labels: Vec<i64>,
    /// Number of rows.
    pub batch_size: usize,
    /// Length of every row (the longest item, rounded up if asked).
    pub seq_len: usize,
    /// For each row, the index of its item in the split, so results can be put back in order.
    pub indices: Vec<usize>,
}

impl Batch {
    /// The flat range of row `row` in every buffer.
    pub fn row_range(&self, row: usize) -> Range<usize> {
        row * self.seq_len..(row + 1) * self.seq_len
    }

    /// Number of real (non-padding) tokens.
    pub fn num_tokens(&self) -> usize {
        self.attention_mask.iter().filter(|&&m| m == 1).count()
    }
}

/// Builds [`Batch`]es, padding dynamically to the longest item of each batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Collator {
    /// Id written into padded input positions (see [`crate::Aligner::pad_id`]).
    pub pad_id: u32,
    /// Round `seq_len` up to a multiple of this (e.g. 8 for tensor cores); `None` = exact.
    pub pad_to_multiple_of: Option<usize>,
}

impl Collator {
    /// A collator padding with `pad_id` to the exact longest length.
    pub fn new(pad_id: u32) -> Self {
        Self {
            pad_id,
            pad_to_multiple_of: None,
        }
    }

    /// Pads the items named by `indices` into one batch.
    ///
    /// ```
    /// use peft_data::{Collator, Encoded};
    /// let a = Encoded { input_ids: vec![1, 5, 2], token_type_ids: vec![0; 3],
    ///                   labels: vec![-100, 3, -100], ..Default::default() };
    /// let b = Encoded { input_ids: vec![1, 2], token_type_ids: vec![0; 2],
    ///                   labels: vec![-100; 2], ..Default::default() };
    /// let batch = Collator::new(0).collate(&[a, b], &[1, 0])?;
    /// assert_eq!((batch.batch_size, batch.seq_len), (2, 3));
    /// assert_eq!(batch.input_ids, [1, 2, 0, 1, 5, 2]);
    /// assert_eq!(batch.attention_mask, [1, 1, 0, 1, 1, 1]);
    /// assert_eq!(batch.labels, [-100, -100, -100, -100, 3, -100]);
    /// # Ok::<(), peft_data::DataError>(())
    /// ```
    pub fn collate(&self, items: &[Encoded], indices: &[usize]) -> Result<Batch> {
        let mut rows = Vec::with_capacity(indices.len());
        for &i in indices {
            let item = items.get(i).ok_or_else(|| {
                DataError::arg(
                    "batch indices",
                    format!("index {i} is out of range for {} items", items.len()),
                )
            })?;
            let n = item.input_ids.len();
            if item.token_type_ids.len() != n || item.labels.len() != n {
                return Err(DataError::arg(
                    "encoded item",
                    format!(
                        "item {i}: {n} input ids but {} token type ids and {} labels",
                        item.token_type_ids.len(),
                        item.labels.len()
                    ),
                ));
            }
            rows.push(item);
        }
        let longest = rows.iter().map(|r| r.len()).max().unwrap_or(0);
        let seq_len = match self.pad_to_multiple_of {
            Some(0) => {
                return Err(DataError::arg(
                    "pad_to_multiple_of",
                    "expected a positive multiple",
                ))
            }
            Some(m) => longest.div_ceil(m) * m,
            None => longest,
        };
        let total = rows.len() * seq_len;
        let mut batch = Batch {
            input_ids: Vec::with_capacity(total),
            attention_mask: Vec::with_capacity(total),
            token_type_ids: Vec::with_capacity(total),
            labels: Vec::with_capacity(total),
            batch_size: rows.len(),
            seq_len,
            indices: indices.to_vec(),
        };
        for row in rows {
            let pad = seq_len - row.len();
            batch.input_ids.extend(&row.input_ids);
            batch
                .input_ids
                .extend(std::iter::repeat_n(self.pad_id, pad));
            batch
                .attention_mask
                .extend(std::iter::repeat_n(1, row.len()));
            batch.attention_mask.extend(std::iter::repeat_n(0, pad));
            batch.token_type_ids.extend(&row.token_type_ids);
            batch.token_type_ids.extend(std::iter::repeat_n(0, pad));
            batch.labels.extend(&row.labels);
            batch.labels.extend(std::iter::repeat_n(IGNORE_INDEX, pad));
        }
        Ok(batch)
    }
}
