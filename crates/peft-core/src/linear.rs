//! The tunable linear: a frozen (or fully trainable) base plus whatever adapter the plan gave its
//! path, mergeable into the base and back.

use std::sync::{RwLock, RwLockReadGuard};

use candle_core::Tensor;

use crate::error::{PeftError, Result};
use crate::lora::LoraAdapter;
use crate::ops::{frozen_linear, lora_linear, LoraBranch};

struct LinearState {
    weight: Tensor,
    merged: bool,
}

/// A linear layer at a known module path. Model code builds it with
/// [`crate::ModelBuilder::linear`] and never names an adapter method.
pub struct TunableLinear {
    path: String,
    state: RwLock<LinearState>,
    bias: Option<Tensor>,
    lora: Option<LoraAdapter>,
}

impl std::fmt::Debug for TunableLinear {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TunableLinear")
            .field("path", &self.path)
            .field("lora", &self.lora.is_some())
            .finish()
    }
}

impl TunableLinear {
    /// A linear at `path` with `weight` (`out × in`), optional `bias` and optional LoRA.
    pub fn new(
        path: String,
        weight: Tensor,
        bias: Option<Tensor>,
        lora: Option<LoraAdapter>,
    ) -> Self {
        Self {
            path,
            state: RwLock::new(LinearState {
                weight,
                merged: false,
            }),
            bias,
            lora,
        }
    }

    fn state(&self) -> RwLockReadGuard<'_, LinearState> {
        self.state.read().unwrap_or_else(|e| e.into_inner())
    }

    /// The module path (Hugging Face name).
    pub fn path(&self) -> &str {
        &self.path
    }

    /// The LoRA adapter, if any.
    pub fn lora(&self) -> Option<&LoraAdapter> {
        self.lora.as_ref()
    }

    /// The current base weight (with the adapter folded in while merged).
    pub fn weight(&self) -> Tensor {
        self.state().weight.clone()
    }

    /// The bias, if any.
    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    /// Whether the adapter is currently folded into the weight.
    pub fn is_merged(&self) -> bool {
        self.state().merged
    }

    /// `(in, out)` features.
    pub fn dims(&self) -> (usize, usize) {
        let d = self.state().weight.dims().to_vec();
        (d[1], d[0])
    }

    /// Applies the layer to `x` of shape `(..., in)`.
    pub fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let state = self.state();
        // At evaluation every parameter is used detached, so that no autograd graph (and no
        // activation it would keep alive) is built for trainable weights.
        let (w, bias) = if train {
            (state.weight.clone(), self.bias.clone())
        } else {
            (
                state.weight.detach(),
                self.bias.as_ref().map(Tensor::detach),
            )
        };
        let (w, bias) = (&w, bias.as_ref());
        let trainable_base = train && (w.is_variable() || bias.is_some_and(|b| b.is_variable()));
        let lora = self.lora.as_ref().filter(|_| !state.merged);
        match (lora, trainable_base) {
            // Frozen base: one op over `(..., in)`, no reshape nodes in the autograd graph.
            (None, false) => Ok(frozen_linear(x, w, bias)?),
            (Some(lora), false) => {
                let mask = lora.dropout_mask(x, train)?;
                let (a, b) = if train {
                    (lora.a.as_tensor().clone(), lora.b.as_tensor().clone())
                } else {
                    (lora.a.as_tensor().detach(), lora.b.as_tensor().detach())
                };
                let branch = LoraBranch {
                    a: &a,
                    b: &b,
                    scale: lora.scaling,
                    mask: mask.as_ref(),
                };
                Ok(lora_linear(&x.contiguous()?, w, bias, &branch)?)
            }
            (lora, true) => {
                // A trainable base (full fine-tuning, or an unfrozen layer): plain ops, cast to
                // the activations' dtype so that mixed precision keeps f32 master weights.
                let dims = x.dims().to_vec();
                let in_features = *dims.last().unwrap_or(&0);
                let x2 = x.reshape((x.elem_count() / in_features.max(1), in_features))?;
                let dtype = x2.dtype();
                let mut y = x2.matmul(&w.to_dtype(dtype)?.t()?)?;
                if let Some(b) = bias {
                    y = y.broadcast_add(&b.to_dtype(dtype)?)?;
                }
                if let Some(lora) = lora {
                    y = (y + lora.delta(&x2, train)?)?;
                }
                let mut out_dims = dims;
                if let Some(last) = out_dims.last_mut() {
                    *last = w.dims()[0];
                }
                Ok(y.reshape(out_dims)?)
            }
        }
    }

    /// Folds the adapter into the base weight: `W ← W + s·B·A`. A no-op without an adapter.
    pub fn merge(&self) -> Result<()> {
        self.fold(true)
    }

    /// Undoes [`Self::merge`]: `W ← W − s·B·A`.
    pub fn unmerge(&self) -> Result<()> {
        self.fold(false)
    }

    fn fold(&self, merge: bool) -> Result<()> {
        let Some(lora) = &self.lora else {
            return Ok(());
        };
        let mut state = self.state.write().unwrap_or_else(|e| e.into_inner());
        if state.merged == merge {
            return Ok(());
        }
        if state.weight.is_variable() {
            return Err(PeftError::Config {
                key: self.path.clone(),
                message: "cannot merge an adapter into a base weight that is itself trained".into(),
            });
        }
        let delta = lora.delta_weight()?.to_dtype(state.weight.dtype())?;
        state.weight = if merge {
            (&state.weight + delta)?
        } else {
            (&state.weight - delta)?
        };
        state.merged = merge;
        Ok(())
    }
}
