//! BatchNorm over channels-last activations, with PyTorch's train/eval semantics and the choice,
//! per model, of updating the running statistics while training or keeping them frozen.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::RwLock;

use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};

use crate::error::Result;
use crate::ops::{affine_act, batch_norm_train, ClampAct};

/// What BatchNorm layers do while training.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BatchNormMode {
    /// Normalise with the batch's statistics and update the running averages (PyTorch's
    /// `model.train()`, what torchvision and peft do by default); the updated statistics are
    /// part of the trained state and are saved with the adapter.
    #[default]
    Update,
    /// Normalise with the checkpoint's running statistics, unchanged (BatchNorm in eval mode
    /// while training).
    Frozen,
}

/// A BatchNorm's running statistics and batch count at one moment
/// ([`BatchNorm2d::running_state`]).
#[derive(Clone, Debug)]
pub struct RunningState {
    mean: Tensor,
    var: Tensor,
    tracked: u64,
}

/// A 2-D BatchNorm at a known module path: gain and shift (frozen tensors or trainable `Var`s by
/// plan) and running statistics.
#[derive(Debug)]
pub struct BatchNorm2d {
    path: String,
    weight: Tensor,
    bias: Tensor,
    running: RwLock<(Tensor, Tensor)>,
    eps: f64,
    momentum: f64,
    mode: BatchNormMode,
    /// Batches whose statistics went into the running averages (PyTorch's
    /// `num_batches_tracked`, counted from this model's construction).
    tracked: AtomicU64,
}

impl BatchNorm2d {
    /// A BatchNorm with the given parameters and running mean/variance.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        path: String,
        weight: Tensor,
        bias: Tensor,
        running_mean: Tensor,
        running_var: Tensor,
        eps: f64,
        momentum: f64,
        mode: BatchNormMode,
    ) -> Self {
        Self {
            path,
            weight,
            bias,
            running: RwLock::new((running_mean, running_var)),
            eps,
            momentum,
            mode,
            tracked: AtomicU64::new(0),
        }
    }

    /// The gain (a trainable `Var`'s tensor when unfrozen).
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// The shift (a trainable `Var`'s tensor when unfrozen).
    pub fn bias(&self) -> &Tensor {
        &self.bias
    }

    /// Batches tracked into the running statistics since construction.
    pub fn tracked_batches(&self) -> u64 {
        self.tracked.load(Ordering::Relaxed)
    }

    /// The module path.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// What the layer does while training.
    pub fn mode(&self) -> BatchNormMode {
        self.mode
    }

    /// The running mean and variance (f32).
    pub fn running_stats(&self) -> (Tensor, Tensor) {
        self.running
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Replaces the running statistics (loading a trained adapter).
    pub fn set_running_stats(&self, mean: Tensor, var: Tensor) -> Result<()> {
        let (m0, _) = self.running_stats();
        if mean.dims() != m0.dims() || var.dims() != m0.dims() {
            return Err(crate::PeftError::ShapeMismatch {
                name: format!("{}.running_mean/running_var", self.path),
                file: "adapter".into(),
                expected: m0.dims().to_vec(),
                found: mean.dims().to_vec(),
            });
        }
        *self.running.write().unwrap_or_else(|e| e.into_inner()) =
            (mean.to_dtype(DType::F32)?, var.to_dtype(DType::F32)?);
        Ok(())
    }

    /// The running statistics and batch count as they are now. Cheap: training replaces the
    /// statistics' tensors rather than writing into them, so the state keeps its own.
    pub fn running_state(&self) -> RunningState {
        let (mean, var) = self.running_stats();
        RunningState {
            mean,
            var,
            tracked: self.tracked_batches(),
        }
    }

    /// Puts back a state taken with [`Self::running_state`] (the best epoch's, after training).
    pub fn restore_running_state(&self, state: &RunningState) {
        *self.running.write().unwrap_or_else(|e| e.into_inner()) =
            (state.mean.clone(), state.var.clone());
        self.tracked.store(state.tracked, Ordering::Relaxed);
    }

    /// The per-channel `(scale, shift)` of evaluation: `w/√(var + ε)` and `b − mean·scale`.
    fn eval_affine(&self, train: bool) -> Result<(Tensor, Tensor)> {
        let (mean, var) = self.running_stats();
        let (w, b) = if train {
            (self.weight.clone(), self.bias.clone())
        } else {
            (self.weight.detach(), self.bias.detach())
        };
        let inv = var.affine(1.0, self.eps)?.sqrt()?.recip()?;
        let scale = w.to_dtype(DType::F32)?.mul(&inv)?;
        let shift = (b.to_dtype(DType::F32)? - mean.mul(&scale)?)?;
        Ok((scale, shift))
    }

    /// Normalises `x` of shape `(..., c)`. While training in [`BatchNormMode::Update`] the batch's
    /// statistics are used and the running averages updated (momentum, unbiased variance, as
    /// PyTorch); otherwise the running statistics.
    pub fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        self.forward_act(x, train, ClampAct::Identity)
    }

    /// [`Self::forward`] followed by `act`, fused into the same op.
    pub fn forward_act(&self, x: &Tensor, train: bool, act: ClampAct) -> Result<Tensor> {
        if train && self.mode == BatchNormMode::Update {
            let (y, stats) = batch_norm_train(x, &self.weight, &self.bias, self.eps, act)?;
            let n = stats.rows as f64;
            let unbias = if n > 1.0 { n / (n - 1.0) } else { 1.0 };
            let m = self.momentum;
            let mut running = self.running.write().unwrap_or_else(|e| e.into_inner());
            let device = running.0.device().clone();
            let c = stats.mean.len();
            let mean = Tensor::from_vec(stats.mean, c, &device)?;
            let var = Tensor::from_vec(stats.var, c, &device)?;
            let new_mean = ((&running.0 * (1.0 - m))? + (mean * m)?)?;
            let new_var = ((&running.1 * (1.0 - m))? + (var * (m * unbias))?)?;
            *running = (new_mean, new_var);
            self.tracked.fetch_add(1, Ordering::Relaxed);
            return Ok(y);
        }
        let trainable = train && (self.weight.is_variable() || self.bias.is_variable());
        let (scale, shift) = self.eval_affine(trainable)?;
        if trainable {
            // Frozen statistics with a trainable gain or shift: candle's ops carry their gradients.
            let dt = x.dtype();
            let y = x
                .broadcast_mul(&scale.to_dtype(dt)?)?
                .broadcast_add(&shift.to_dtype(dt)?)?;
            return Ok(match act {
                ClampAct::Identity => y,
                ClampAct::Clamp(max) => crate::ops::clamp_activation(&y, max)?,
            });
        }
        Ok(affine_act(x, &scale, &shift, act)?)
    }
}
