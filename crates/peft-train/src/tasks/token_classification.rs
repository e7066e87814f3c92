//! Token classification (NER): batches from aligned sentences, masked cross-entropy, and
//! entity-level evaluation with conlleval semantics.

use candle_core::{DType, Device, Tensor, D};
use peft_data::{Batcher, Collator, Encoded, LabelSet, IGNORE_INDEX};
use peft_models::BertForTokenClassification;

use super::candle;
use crate::error::{Result, TrainError};
use crate::metrics::{entity_scores, EntityScores};
use crate::trainer::{Evaluation, Task};

fn core<T>(r: peft_core::Result<T>) -> Result<T> {
    Ok(r?)
}

/// The tensors of one padded batch.
pub struct BatchTensors {
    /// `(batch, seq)` token ids.
    pub input_ids: Tensor,
    /// `(batch, seq)` segment ids.
    pub token_type_ids: Tensor,
    /// `(batch, seq)` 1 for tokens, 0 for padding.
    pub attention_mask: Tensor,
    /// `(batch·seq)` labels, −100 where ignored.
    pub labels: Vec<i64>,
}

/// Collates `indices` of `items` into tensors on `device`.
pub fn batch_tensors(
    collator: &Collator,
    items: &[Encoded],
    indices: &[usize],
    device: &Device,
) -> Result<BatchTensors> {
    let b = collator.collate(items, indices)?;
    let shape = (b.batch_size, b.seq_len);
    let t = |v: Vec<u32>| candle("batch", Tensor::from_vec(v, shape, device));
    Ok(BatchTensors {
        input_ids: t(b.input_ids)?,
        token_type_ids: t(b.token_type_ids)?,
        attention_mask: t(b.attention_mask)?,
        labels: b.labels,
    })
}

/// Mean cross-entropy over the positions whose label is not −100, and their count.
pub fn masked_cross_entropy(logits: &Tensor, labels: &[i64]) -> Result<(Tensor, usize)> {
    let classes = candle("logits", logits.dim(D::Minus1))?;
    // The loss is computed in f32 whatever the model's compute dtype.
    let flat = candle(
        "logits",
        logits
            .to_dtype(DType::F32)
            .and_then(|l| l.reshape(((), classes))),
    )?;
    let (rows, targets): (Vec<u32>, Vec<u32>) = labels
        .iter()
        .enumerate()
        .filter(|(_, l)| **l != IGNORE_INDEX)
        .map(|(i, l)| (i as u32, *l as u32))
        .unzip();
    if rows.is_empty() {
        return Err(TrainError::config(
            "labels",
            "a batch has no labelled token",
        ));
    }
    let n = rows.len();
    let device = logits.device();
    let loss = (|| {
        let picked = flat.index_select(&Tensor::from_vec(rows, n, device)?, 0)?;
        let logp = candle_nn::ops::log_softmax(&picked, D::Minus1)?;
        let targets = Tensor::from_vec(targets, (n, 1), device)?;
        logp.gather(&targets, 1)?.mean_all()?.neg()
    })();
    Ok((candle("cross-entropy", loss)?, n))
}

/// Predicted word tags for `items`, in their order, with sequences run longest first.
pub fn predict_tags(
    model: &BertForTokenClassification,
    items: &[Encoded],
    labels: &LabelSet,
    collator: &Collator,
    batch_size: usize,
) -> Result<Vec<Vec<String>>> {
    let batcher = Batcher::new(items.iter().map(|e| e.len()).collect(), batch_size, 0)?;
    let device = model.device();
    let mut out = vec![Vec::new(); items.len()];
    for idx in batcher.sequential() {
        let bt = batch_tensors(collator, items, &idx, device)?;
        let logits =
            core(model.forward(&bt.input_ids, &bt.token_type_ids, &bt.attention_mask, false))?;
        let preds: Vec<Vec<u32>> = candle(
            "argmax",
            logits
                .argmax(D::Minus1)
                .and_then(|t| t.to_dtype(DType::U32)?.to_vec2()),
        )?;
        for (row, i) in idx.iter().enumerate() {
            out[*i] = items[*i].word_tags(&preds[row], labels)?;
        }
    }
    Ok(out)
}

/// Entity scores of the model on `items` against the gold word tags.
pub fn evaluate_tags(
    model: &BertForTokenClassification,
    items: &[Encoded],
    gold: &[Vec<String>],
    labels: &LabelSet,
    collator: &Collator,
    batch_size: usize,
) -> Result<EntityScores> {
    let pred = predict_tags(model, items, labels, collator, batch_size)?;
    entity_scores(gold, &pred)
}

/// A token-classification task over encoded train and validation splits.
pub struct TokenClassification<'a> {
    /// The model being trained.
    pub model: &'a BertForTokenClassification,
    /// Encoded training sentences.
    pub train: Vec<Encoded>,
    /// Encoded validation sentences.
    pub valid: Vec<Encoded>,
    /// Gold word tags of the validation sentences.
    pub valid_gold: Vec<Vec<String>>,
    /// The label set.
    pub labels: LabelSet,
    /// Pads batches.
    pub collator: Collator,
    /// Shuffles and buckets training batches.
    pub batcher: Batcher,
    /// Batch size for evaluation.
    pub eval_batch_size: usize,
    /// Mean number of labelled tokens per training batch (see [`TokenClassification::loss`]).
    labelled_per_batch: f64,
}

impl<'a> TokenClassification<'a> {
    /// A task training `model` on `train` and scoring it on `valid` against `valid_gold`
    /// (evaluation batches of 64 sentences; set `eval_batch_size` to change that).
    pub fn new(
        model: &'a BertForTokenClassification,
        train: Vec<Encoded>,
        valid: Vec<Encoded>,
        valid_gold: Vec<Vec<String>>,
        labels: LabelSet,
        collator: Collator,
        batcher: Batcher,
    ) -> Self {
        let labelled: usize = train
            .iter()
            .map(|e| e.labels.iter().filter(|l| **l != IGNORE_INDEX).count())
            .sum();
        let labelled_per_batch = labelled as f64 / batcher.num_batches().max(1) as f64;
        Self {
            model,
            train,
            valid,
            valid_gold,
            labels,
            collator,
            batcher,
            eval_batch_size: 64,
            labelled_per_batch,
        }
    }
}

impl Task for TokenClassification<'_> {
    fn epoch_batches(&self, epoch: usize) -> Vec<Vec<usize>> {
        self.model
            .parts
            .dropout_rng
            .reseed(self.model.parts.plan.seed.wrapping_add(1 + epoch as u64));
        self.batcher.epoch_batches(epoch as u64)
    }

    /// The summed cross-entropy of the batch's labelled tokens divided by the mean number of
    /// labelled tokens per batch: every token weighs the same whichever batch it lands in.
    /// Length-bucketed batches differ a lot in size (CoNLL mixes one-line score tables with long
    /// news sentences), and a plain per-batch mean would give a token in a short batch many times
    /// the weight of one in a long batch; over an epoch this objective averages to the mean
    /// per-token loss, the expectation of what randomly composed batches minimise.
    fn loss(&self, batch: &[usize], train: bool) -> Result<(Tensor, usize)> {
        let device = self.model.device();
        let bt = batch_tensors(&self.collator, &self.train, batch, device)?;
        let logits =
            core(
                self.model
                    .forward(&bt.input_ids, &bt.token_type_ids, &bt.attention_mask, train),
            )?;
        let (mean, labelled) = masked_cross_entropy(&logits, &bt.labels)?;
        let loss = candle(
            "loss weighting",
            mean.affine(labelled as f64 / self.labelled_per_batch, 0.0),
        )?;
        Ok((loss, bt.labels.len()))
    }

    fn evaluate(&self) -> Result<Evaluation> {
        let scores = evaluate_tags(
            self.model,
            &self.valid,
            &self.valid_gold,
            &self.labels,
            &self.collator,
            self.eval_batch_size,
        )?;
        Ok(Evaluation {
            score: scores.overall.f1,
            loss: None,
            details: serde_json::to_value(&scores).unwrap_or_default(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cross_entropy_ignores_minus_100_and_matches_the_formula() -> candle_core::Result<()> {
        let logits = Tensor::new(
            &[
                [[1.0f32, 2.0, 0.5], [0.1, 0.2, 0.3]],
                [[3.0, -1.0, 0.0], [0.0, 0.0, 0.0]],
            ],
            &Device::Cpu,
        )?;
        let labels = [1, IGNORE_INDEX, 0, 2];
        let (loss, n) = masked_cross_entropy(&logits, &labels).unwrap();
        let lse = |v: [f64; 3]| v.iter().map(|x| x.exp()).sum::<f64>().ln();
        let expected =
            ((lse([1.0, 2.0, 0.5]) - 2.0) + (lse([3.0, -1.0, 0.0]) - 3.0) + (lse([0.0; 3]) - 0.0))
                / 3.0;
        assert_eq!(n, 3);
        assert!((loss.to_scalar::<f32>()? as f64 - expected).abs() < 1e-6);
        assert!(masked_cross_entropy(&logits, &[IGNORE_INDEX; 4]).is_err());
        Ok(())
    }
}
