//! AdamW with the exact update of `torch.optim.AdamW`, over named trainable variables.
//!
//! Weight decay is decoupled (`p -= lr * wd * p`) and applies to the parameters a name
//! predicate selects ([`hf_weight_decay`] by default: not to biases and normalization weights).
//! State is kept per parameter like PyTorch's (`exp_avg`, `exp_avg_sq`, `step`), created at the
//! first step that parameter has a gradient; parameters without a gradient are skipped and their
//! step count does not advance. On the CPU the update runs in place without temporaries.

mod decay;
mod kernels;
mod state;

use std::collections::HashSet;

use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};
use serde::{Deserialize, Serialize};

pub use decay::hf_weight_decay;

use crate::error::{CandleContext, Result, TrainError};

/// AdamW hyper-parameters, with `torch.optim.AdamW`'s defaults.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdamWConfig {
    /// Learning rate (the schedule's base rate).
    pub lr: f64,
    /// Decay of the first-moment average.
    pub beta1: f64,
    /// Decay of the second-moment average.
    pub beta2: f64,
    /// Added to the denominator for numerical stability.
    pub eps: f64,
    /// Decoupled weight decay coefficient.
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 1e-2,
        }
    }
}

impl AdamWConfig {
    /// Checks the ranges PyTorch checks: `lr, eps, weight_decay >= 0`, betas in `[0, 1)`.
    pub fn validate(&self) -> Result<()> {
        let checks = [
            ("optimizer.lr", self.lr, self.lr >= 0.0, ">= 0"),
            ("optimizer.eps", self.eps, self.eps >= 0.0, ">= 0"),
            (
                "optimizer.weight_decay",
                self.weight_decay,
                self.weight_decay >= 0.0,
                ">= 0",
            ),
            (
                "optimizer.beta1",
                self.beta1,
                (0.0..1.0).contains(&self.beta1),
                "in [0, 1)",
            ),
            (
                "optimizer.beta2",
                self.beta2,
                (0.0..1.0).contains(&self.beta2),
                "in [0, 1)",
            ),
        ];
        for (key, value, ok, expected) in checks {
            if !ok || !value.is_finite() {
                return Err(TrainError::config(
                    key,
                    format!("expected {expected}, found {value}"),
                ));
            }
        }
        Ok(())
    }
}

/// Per-parameter optimizer state.
#[derive(Debug)]
struct Moments {
    m: Tensor,
    v: Tensor,
    step: u64,
}

/// One trainable parameter and its state.
#[derive(Debug)]
struct Slot {
    name: String,
    var: Var,
    decay: bool,
    state: Option<Moments>,
}

/// The AdamW optimizer over a list of named variables.
#[derive(Debug)]
pub struct AdamW {
    slots: Vec<Slot>,
    config: AdamWConfig,
}

impl AdamW {
    /// AdamW over `vars`, decaying the parameters [`hf_weight_decay`] selects.
    pub fn new(vars: impl IntoIterator<Item = (String, Var)>, config: AdamWConfig) -> Result<Self> {
        Self::with_decay_filter(vars, config, hf_weight_decay)
    }

    /// AdamW over `vars`, decaying the parameters whose name `decays` accepts.
    ///
    /// Names must be unique and variables must be of a float dtype.
    pub fn with_decay_filter(
        vars: impl IntoIterator<Item = (String, Var)>,
        config: AdamWConfig,
        decays: impl Fn(&str) -> bool,
    ) -> Result<Self> {
        config.validate()?;
        let mut seen = HashSet::new();
        let mut slots = Vec::new();
        for (name, var) in vars {
            if !var.dtype().is_float() {
                return Err(TrainError::config(
                    &name,
                    format!(
                        "trainable variable has dtype {:?}; expected a float",
                        var.dtype()
                    ),
                ));
            }
            if !seen.insert(name.clone()) {
                return Err(TrainError::config(&name, "trainable variable named twice"));
            }
            let decay = decays(&name);
            slots.push(Slot {
                name,
                var,
                decay,
                state: None,
            });
        }
        Ok(Self { slots, config })
    }

    /// AdamW over every variable of a `VarMap`, in name order.
    pub fn from_var_map(map: &candle_nn::VarMap, config: AdamWConfig) -> Result<Self> {
        let data = map
            .data()
            .lock()
            .map_err(|_| TrainError::config("var_map", "lock poisoned by a panic"))?;
        let mut vars: Vec<(String, Var)> =
            data.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        drop(data);
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        Self::new(vars, config)
    }

    /// The current learning rate.
    pub fn lr(&self) -> f64 {
        self.config.lr
    }

    /// Sets β₁ for the following steps (a one-cycle schedule cycles it, as PyTorch does for
    /// Adam; the bias correction then uses the current β₁, also as PyTorch).
    pub fn set_beta1(&mut self, beta1: f64) {
        self.config.beta1 = beta1;
    }

    /// Sets the learning rate for the following steps (called by the schedule each step).
    pub fn set_lr(&mut self, lr: f64) {
        self.config.lr = lr;
    }

    /// The hyper-parameters.
    pub fn config(&self) -> &AdamWConfig {
        &self.config
    }

    /// The variables, in the order given, with their names.
    pub fn vars(&self) -> impl Iterator<Item = (&str, &Var)> {
        self.slots.iter().map(|s| (s.name.as_str(), &s.var))
    }

    /// Whether the parameter `name` gets weight decay (`None` if unknown).
    pub fn decays(&self, name: &str) -> Option<bool> {
        self.slots.iter().find(|s| s.name == name).map(|s| s.decay)
    }

    /// The number of steps taken for parameter `name` (0 before its first gradient).
    pub fn param_step(&self, name: &str) -> Option<u64> {
        let slot = self.slots.iter().find(|s| s.name == name)?;
        Some(slot.state.as_ref().map_or(0, |s| s.step))
    }

    /// One optimizer step with the gradients in `grads`; variables without one are skipped.
    pub fn step(&mut self, grads: &GradStore) -> Result<()> {
        self.step_scaled(grads, 1.0)
    }

    /// One step with every gradient multiplied by `grad_scale` first: fold gradient clipping
    /// ([`crate::clip::clip_coef`]) or an accumulation average into the update without
    /// rescaling the gradients separately.
    pub fn step_scaled(&mut self, grads: &GradStore, grad_scale: f64) -> Result<()> {
        if !grad_scale.is_finite() {
            return Err(TrainError::config(
                "grad_scale",
                format!("not finite: {grad_scale}"),
            ));
        }
        let c = self.config.clone();
        let scale = (grad_scale != 1.0).then_some(grad_scale);
        for slot in &mut self.slots {
            let Some(g) = grads.get(&slot.var) else {
                continue;
            };
            let name = &slot.name;
            if g.dims() != slot.var.dims() || g.dtype() != slot.var.dtype() {
                return Err(TrainError::OptimizerState {
                    key: name.clone(),
                    message: format!(
                        "gradient is {:?} {:?}, parameter is {:?} {:?}",
                        g.dtype(),
                        g.dims(),
                        slot.var.dtype(),
                        slot.var.dims()
                    ),
                });
            }
            let g = g.contiguous().ctx(|| format!("gradient of `{name}`"))?;
            let st = match &mut slot.state {
                Some(st) => st,
                None => {
                    let m = slot.var.zeros_like().ctx(|| format!("state of `{name}`"))?;
                    let v = m.zeros_like().ctx(|| format!("state of `{name}`"))?;
                    slot.state.insert(Moments { m, v, step: 0 })
                }
            };
            st.step += 1;
            let t = st.step as f64;
            let bc1 = 1.0 - c.beta1.powf(t);
            let h = kernels::Hyper {
                lerp_w: 1.0 - c.beta1,
                beta2: c.beta2,
                one_minus_beta2: 1.0 - c.beta2,
                decay: (slot.decay && c.weight_decay != 0.0).then_some(1.0 - c.lr * c.weight_decay),
                bc2_sqrt: (1.0 - c.beta2.powf(t)).sqrt(),
                eps: c.eps,
                neg_step_size: -(c.lr / bc1),
                grad_scale: scale,
            };
            if kernels::can_fuse(&slot.var) {
                kernels::fused_step(&slot.var, &st.m, &st.v, &g, h)
                    .ctx(|| format!("adamw update of `{name}`"))?;
            } else {
                let (m, v) = kernels::tensor_step(&slot.var, &st.m, &st.v, &g, h)
                    .ctx(|| format!("adamw update of `{name}`"))?;
                (st.m, st.v) = (m, v);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
