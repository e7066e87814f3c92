//! The one training loop for every task: AdamW over the trainable parameters, a learning-rate
//! schedule, gradient accumulation and clipping, evaluation each epoch, best-checkpoint keeping,
//! early stopping, a progress bar, JSON-lines metrics and a plot of the curves.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};
use indicatif::{ProgressBar, ProgressStyle};
use peft_core::{BatchNorm2d, RunningState};
use serde::Serialize;

use crate::clip::{clip_coef, grad_norm};
use crate::early_stop::{BestTracker, Mode, Verdict};
use crate::error::{Result, TrainError};
use crate::log::{Event, LogRecord, MetricsLog};
use crate::optim::{AdamW, AdamWConfig};
use crate::schedule::ScheduleConfig;

/// What the loop needs from a task.
pub trait Task {
    /// Training batches (example indices) of `epoch`, shuffled from the task's seed.
    fn epoch_batches(&self, epoch: usize) -> Vec<Vec<usize>>;
    /// The mean loss over a batch (a scalar tensor) and the number of tokens (or samples) in it.
    fn loss(&self, batch: &[usize], train: bool) -> Result<(Tensor, usize)>;
    /// Scores the validation split.
    fn evaluate(&self) -> Result<Evaluation>;
    /// BatchNorm layers whose running statistics training updates: the trainer keeps their
    /// state with the best epoch's weights and restores both together.
    fn batch_norms(&self) -> Vec<Arc<BatchNorm2d>> {
        Vec::new()
    }
}

/// The outcome of one evaluation.
#[derive(Clone, Debug, Serialize)]
pub struct Evaluation {
    /// The score to maximise (entity F1, accuracy, ...).
    pub score: f64,
    /// Mean loss, when the task computes it.
    pub loss: Option<f64>,
    /// The task's full metrics.
    pub details: serde_json::Value,
}

/// Loop settings.
#[derive(Clone, Debug)]
pub struct TrainerConfig {
    /// Passes over the data.
    pub epochs: usize,
    /// AdamW settings (the schedule scales `lr`).
    pub optimizer: AdamWConfig,
    /// Learning-rate schedule.
    pub schedule: ScheduleConfig,
    /// Global gradient-norm clipping.
    pub max_grad_norm: Option<f64>,
    /// Micro-batches per optimiser step.
    pub grad_accumulation: usize,
    /// Epochs without improvement before stopping.
    pub early_stopping_patience: Option<usize>,
    /// Log the training loss every N steps.
    pub log_every: usize,
    /// Where `metrics.jsonl`, `curves.svg` and `best.safetensors` go.
    pub run_dir: PathBuf,
    /// Show a progress bar.
    pub progress: bool,
}

/// What a finished run reports.
#[derive(Clone, Debug, Serialize)]
pub struct TrainSummary {
    /// Optimiser steps taken.
    pub steps: usize,
    /// Epochs run (fewer than asked after early stopping).
    pub epochs_run: usize,
    /// The best epoch (1-based) and its evaluation.
    pub best_epoch: usize,
    /// The best evaluation.
    pub best: Option<Evaluation>,
    /// Wall time of the training loop, evaluations included.
    pub train_seconds: f64,
    /// Tokens processed per second of training (evaluations excluded).
    pub tokens_per_second: f64,
    /// Seconds in training steps (evaluations excluded).
    pub step_seconds: f64,
}

/// Runs the loop over the named trainable parameters.
pub struct Trainer {
    config: TrainerConfig,
    params: Vec<(String, Var)>,
}

impl Trainer {
    /// A trainer for `params` (all of which train).
    pub fn new(config: TrainerConfig, params: Vec<(String, Var)>) -> Result<Self> {
        if params.is_empty() {
            return Err(TrainError::config(
                "tuning",
                "the model has no trainable parameters",
            ));
        }
        if config.grad_accumulation == 0 || config.epochs == 0 {
            return Err(TrainError::config(
                "train",
                "epochs and grad_accumulation must be at least 1",
            ));
        }
        Ok(Self { config, params })
    }

    fn snapshot(&self) -> Result<Vec<Tensor>> {
        self.params
            .iter()
            .map(|(_, v)| v.as_tensor().copy())
            .collect::<candle_core::Result<_>>()
            .map_err(|e| TrainError::candle("snapshot of the best weights", e))
    }

    fn save_best(&self, snapshot: &[Tensor]) -> Result<()> {
        let path = self.config.run_dir.join("best.safetensors");
        let tensors: Vec<(&str, &Tensor)> = self
            .params
            .iter()
            .zip(snapshot)
            .map(|((n, _), t)| (n.as_str(), t))
            .collect();
        let bytes = safetensors::serialize(tensors.iter().map(|(n, t)| (*n, *t)), None)
            .map_err(|e| TrainError::config("best.safetensors", e.to_string()))?;
        Ok(peft_core::fsio::write_atomic(&path, &bytes)?)
    }

    /// Trains `task`; at the end the parameters hold the best epoch's values.
    pub fn fit<T: Task>(&self, task: &T) -> Result<TrainSummary> {
        let c = &self.config;
        std::fs::create_dir_all(&c.run_dir).map_err(|e| TrainError::io(&c.run_dir, e))?;
        let micro_batches = task.epoch_batches(0).len();
        let steps_per_epoch = micro_batches.div_ceil(c.grad_accumulation);
        let total_steps = steps_per_epoch * c.epochs;
        let schedule = c.schedule.build(c.optimizer.lr, total_steps)?;
        let mut optimizer = AdamW::new(self.params.clone(), c.optimizer.clone())?;
        let vars: Vec<Var> = self.params.iter().map(|(_, v)| v.clone()).collect();
        let mut log = MetricsLog::create(c.run_dir.join("metrics.jsonl"))?;
        let mut records = Vec::new();
        let mut tracker = BestTracker::new(Mode::Max, c.early_stopping_patience);
        let (mut best, mut best_epoch, mut best_snapshot) = (None, 0, None);
        let batch_norms = task.batch_norms();
        let mut best_batch_norms: Vec<RunningState> = Vec::new();
        let start = Instant::now();
        let (mut step, mut train_tokens, mut train_secs, mut epochs_run) =
            (0usize, 0usize, 0f64, 0);

        for epoch in 0..c.epochs {
            epochs_run = epoch + 1;
            let batches = task.epoch_batches(epoch);
            let bar = progress_bar(c.progress, batches.len(), epoch, c.epochs);
            let epoch_start = Instant::now();
            let (mut window_loss, mut window_n, mut epoch_tokens, mut epoch_step) =
                (0f64, 0usize, 0usize, 0usize);
            for chunk in batches.chunks(c.grad_accumulation) {
                let mut acc: Option<GradStore> = None;
                let mut chunk_loss = 0f64;
                for batch in chunk {
                    let (loss, tokens) = task.loss(batch, true)?;
                    chunk_loss += loss
                        .to_scalar::<f32>()
                        .map_err(|e| TrainError::candle("loss", e))?
                        as f64;
                    epoch_tokens += tokens;
                    let grads = loss
                        .backward()
                        .map_err(|e| TrainError::candle("backward", e))?;
                    acc = Some(match acc {
                        None => grads,
                        Some(sum) => add_grads(sum, grads, &vars)?,
                    });
                    bar.inc(1);
                }
                let grads = acc.expect("chunks are non-empty");
                let scale = 1.0 / chunk.len() as f64;
                let norm = grad_norm(&grads, vars.iter())? * scale;
                let clip = c
                    .max_grad_norm
                    .and_then(|m| clip_coef(norm, m))
                    .unwrap_or(1.0);
                let lr = schedule.lr_at(step);
                optimizer.set_lr(lr);
                if let Some(beta1) = schedule.beta1_at(step) {
                    optimizer.set_beta1(beta1);
                }
                if norm.is_finite() {
                    optimizer.step_scaled(&grads, scale * clip)?;
                } else {
                    tracing::warn!("step {step}: gradient norm is {norm}; update skipped");
                }
                step += 1;
                epoch_step += 1;
                let mean_loss = chunk_loss * scale;
                window_loss += mean_loss;
                window_n += 1;
                let elapsed = epoch_start.elapsed().as_secs_f64();
                bar.set_message(format!(
                    "loss {mean_loss:.4} lr {lr:.2e} {:.0} tok/s",
                    epoch_tokens as f64 / elapsed.max(1e-9)
                ));
                if step % c.log_every.max(1) == 0 || step == total_steps {
                    let rec = LogRecord {
                        event: Event::Train,
                        step: step as u64,
                        epoch: Some(epoch as f64 + epoch_step as f64 / steps_per_epoch as f64),
                        loss: Some(window_loss / window_n.max(1) as f64),
                        lr: Some(lr),
                        grad_norm: Some(norm),
                        elapsed_s: Some(start.elapsed().as_secs_f64()),
                        ..Default::default()
                    };
                    log.log(&rec)?;
                    records.push(rec);
                    (window_loss, window_n) = (0.0, 0);
                }
            }
            bar.finish_and_clear();
            train_secs += epoch_start.elapsed().as_secs_f64();
            train_tokens += epoch_tokens;

            let eval = task.evaluate()?;
            let rec = LogRecord {
                event: Event::Eval,
                step: step as u64,
                epoch: Some((epoch + 1) as f64),
                loss: eval.loss,
                f1: Some(eval.score),
                elapsed_s: Some(start.elapsed().as_secs_f64()),
                extra: [(
                    "epoch_train_seconds".to_string(),
                    epoch_start.elapsed().as_secs_f64(),
                )]
                .into(),
                ..Default::default()
            };
            log.log(&rec)?;
            records.push(rec);
            crate::plot::svg_plot(&records, c.run_dir.join("curves.svg"))?;
            tracing::info!(
                "epoch {}/{}: validation score {:.4}",
                epoch + 1,
                c.epochs,
                eval.score
            );
            let verdict = tracker.update(eval.score);
            if matches!(verdict, Verdict::Improved) {
                let snap = self.snapshot()?;
                self.save_best(&snap)?;
                best_snapshot = Some(snap);
                best_batch_norms = batch_norms.iter().map(|bn| bn.running_state()).collect();
                best = Some(eval);
                best_epoch = epoch + 1;
            }
            if matches!(verdict, Verdict::Stop) {
                tracing::info!("early stopping after epoch {}", epoch + 1);
                break;
            }
        }
        if let Some(snap) = best_snapshot {
            for ((_, var), t) in self.params.iter().zip(snap) {
                var.set(&t)
                    .map_err(|e| TrainError::candle("restoring the best weights", e))?;
            }
            for (bn, state) in batch_norms.iter().zip(&best_batch_norms) {
                bn.restore_running_state(state);
            }
        }
        Ok(TrainSummary {
            steps: step,
            epochs_run,
            best_epoch,
            best,
            train_seconds: start.elapsed().as_secs_f64(),
            tokens_per_second: train_tokens as f64 / train_secs.max(1e-9),
            step_seconds: train_secs,
        })
    }
}

/// Adds the gradients of `vars` in `more` to those in `sum`.
fn add_grads(mut sum: GradStore, mut more: GradStore, vars: &[Var]) -> Result<GradStore> {
    for v in vars {
        let Some(g) = more.remove(v) else { continue };
        let total = match sum.remove(v) {
            Some(s) => (s + g).map_err(|e| TrainError::candle("accumulating gradients", e))?,
            None => g,
        };
        sum.insert(v, total);
    }
    Ok(sum)
}

fn progress_bar(show: bool, len: usize, epoch: usize, epochs: usize) -> ProgressBar {
    if !show {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(len as u64);
    let style = ProgressStyle::with_template(
        "epoch {prefix} [{bar:30}] {pos}/{len} {elapsed_precise}<{eta_precise} {msg}",
    )
    .unwrap_or_else(|_| ProgressStyle::default_bar())
    .progress_chars("=> ");
    bar.set_style(style);
    bar.set_prefix(format!("{}/{}", epoch + 1, epochs));
    bar
}
