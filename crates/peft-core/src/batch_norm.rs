//! BatchNorm over channels-last activations, with PyTorch's train/eval semantics and the choice,
//! per model, of updating the running statistics while training or keeping them frozen.
//!
//! Running statistics are kept per adapter, as peft keeps a BatchNorm in `modules_to_save`: each
//! named adapter has its own (a copy of the base's until it trains or loads its own), and with
//! no adapter active (none added, or adapters disabled) the base's are used and updated.

use std::collections::BTreeMap;
use std::sync::RwLock;

use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};

use crate::error::Result;
use crate::ops::{affine_act, batch_norm_train, ClampAct};
use crate::switch::AdapterSwitch;

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

impl RunningState {
    /// The running mean and variance (f32).
    pub fn stats(&self) -> (&Tensor, &Tensor) {
        (&self.mean, &self.var)
    }

    /// Batches tracked into them since the model's construction.
    pub fn tracked_batches(&self) -> u64 {
        self.tracked
    }
}

/// `adapter`'s state in `running`: its own, else the base's (always present).
fn own_or_base<'a>(
    running: &'a BTreeMap<Option<String>, RunningState>,
    adapter: &Option<String>,
) -> &'a RunningState {
    running
        .get(adapter)
        .or_else(|| running.get(&None))
        .expect("the base state is always present")
}

/// A 2-D BatchNorm at a known module path: gain and shift (frozen tensors or trainable `Var`s by
/// plan) and running statistics, per adapter.
#[derive(Debug)]
pub struct BatchNorm2d {
    path: String,
    weight: Tensor,
    bias: Tensor,
    /// The running statistics by adapter (`None`: the base's, used with no adapter active);
    /// `tracked` counts the batches that went into them since this model's construction
    /// (PyTorch's `num_batches_tracked`).
    running: RwLock<BTreeMap<Option<String>, RunningState>>,
    switch: AdapterSwitch,
    eps: f64,
    momentum: f64,
    mode: BatchNormMode,
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
        let base = RunningState {
            mean: running_mean,
            var: running_var,
            tracked: 0,
        };
        Self {
            path,
            weight,
            bias,
            running: RwLock::new(BTreeMap::from([(None, base)])),
            switch: AdapterSwitch::default(),
            eps,
            momentum,
            mode,
        }
    }

    /// The layer with its statistics following `switch`'s active adapter (the model builder
    /// passes the registry's; without one, the base's statistics are always used).
    pub(crate) fn with_switch(mut self, switch: AdapterSwitch) -> Self {
        self.switch = switch;
        self
    }

    /// The state of `adapter` (`None`: the base): its own, else a copy of the base's.
    pub fn state_of(&self, adapter: &Option<String>) -> RunningState {
        let running = self.running.read().unwrap_or_else(|e| e.into_inner());
        own_or_base(&running, adapter).clone()
    }

    fn set_state_of(&self, adapter: Option<String>, state: RunningState) {
        self.running
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(adapter, state);
    }

    /// Replaces `adapter`'s state by `f` of its current one (its own, else the base's), under
    /// one write lock, so that concurrent updates are not lost.
    fn update_state_of(
        &self,
        adapter: Option<String>,
        f: impl FnOnce(&RunningState) -> Result<RunningState>,
    ) -> Result<()> {
        let mut running = self.running.write().unwrap_or_else(|e| e.into_inner());
        let next = f(own_or_base(&running, &adapter))?;
        running.insert(adapter, next);
        Ok(())
    }

    /// Forgets adapter `name`'s statistics (the adapter was deleted).
    pub(crate) fn remove_adapter(&self, name: &str) {
        self.running
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&Some(name.to_string()));
    }

    /// The gain (a trainable `Var`'s tensor when unfrozen).
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// The shift (a trainable `Var`'s tensor when unfrozen).
    pub fn bias(&self) -> &Tensor {
        &self.bias
    }

    /// Batches tracked into the active adapter's running statistics since construction.
    pub fn tracked_batches(&self) -> u64 {
        self.running_state().tracked
    }

    /// The module path.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// What the layer does while training.
    pub fn mode(&self) -> BatchNormMode {
        self.mode
    }

    /// The active adapter's running mean and variance (f32).
    pub fn running_stats(&self) -> (Tensor, Tensor) {
        let s = self.running_state();
        (s.mean, s.var)
    }

    /// Replaces the active adapter's running statistics (loading a trained adapter).
    pub fn set_running_stats(&self, mean: Tensor, var: Tensor) -> Result<()> {
        self.set_running_stats_of(self.switch.active(), mean, var)
    }

    /// Replaces adapter `adapter`'s running statistics (`None`: the base's), active or not.
    pub fn set_running_stats_of(
        &self,
        adapter: Option<String>,
        mean: Tensor,
        var: Tensor,
    ) -> Result<()> {
        let (m0, _) = self.running_stats();
        if mean.dims() != m0.dims() || var.dims() != m0.dims() {
            return Err(crate::PeftError::ShapeMismatch {
                name: format!("{}.running_mean/running_var", self.path),
                file: "adapter".into(),
                expected: m0.dims().to_vec(),
                found: mean.dims().to_vec(),
            });
        }
        let (mean, var) = (mean.to_dtype(DType::F32)?, var.to_dtype(DType::F32)?);
        self.update_state_of(adapter, |old| {
            Ok(RunningState {
                mean,
                var,
                tracked: old.tracked,
            })
        })
    }

    /// The active adapter's running statistics and batch count as they are now. Cheap: training
    /// replaces the statistics' tensors rather than writing into them, so the state keeps its
    /// own.
    pub fn running_state(&self) -> RunningState {
        self.state_of(&self.switch.active())
    }

    /// Puts back a state taken with [`Self::running_state`] (the best epoch's, after training)
    /// as the active adapter's.
    pub fn restore_running_state(&self, state: &RunningState) {
        self.set_state_of(self.switch.active(), state.clone());
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
            self.update_state_of(self.switch.active(), |old| {
                let device = old.mean.device();
                let c = stats.mean.len();
                let mean = Tensor::from_vec(stats.mean, c, device)?;
                let var = Tensor::from_vec(stats.var, c, device)?;
                Ok(RunningState {
                    mean: ((&old.mean * (1.0 - m))? + (mean * m)?)?,
                    var: ((&old.var * (1.0 - m))? + (var * (m * unbias))?)?,
                    tracked: old.tracked + 1,
                })
            })?;
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
