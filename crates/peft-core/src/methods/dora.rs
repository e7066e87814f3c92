//! DoRA (weight-decomposed LoRA) as peft implements it for linear layers:
//! `W' = m ⊙ (W + s·B·A) / ‖W + s·B·A‖` with the norm taken per output row and detached, so that
//! `y = (m/‖·‖) ⊙ (x·Wᵀ + s·B·A·x) + b`. The magnitude `m` starts at `‖W‖` (the base output at
//! initialisation) and trains with `A` and `B`. With dropout in training, peft applies the base
//! part of the rescaling to the dropped-out input too; so does this module.

use std::sync::Mutex;

use candle_core::{DType, Tensor, Var, D};

use super::lora::LoraLayer;
use super::{use_param, BaseLinear};
use crate::error::Result;

/// The trainable magnitude vector of one DoRA layer.
#[derive(Debug)]
pub(crate) struct Magnitude {
    /// `‖W + s·B·A‖` per output row, f32 (peft's `lora_magnitude_vector`).
    pub vector: Var,
    /// `m / ‖W + ΔW‖` at the last merge, to undo it exactly.
    merge_factor: Mutex<Option<Tensor>>,
}

/// `‖w‖₂` of each row of `w`, in f32.
fn row_norms(w: &Tensor) -> Result<Tensor> {
    Ok(w.to_dtype(DType::F32)?.sqr()?.sum(D::Minus1)?.sqrt()?)
}

impl Magnitude {
    /// The magnitude of `weight` (`out × in`): its row norms.
    pub fn new(weight: &Tensor) -> Result<Self> {
        Ok(Self {
            vector: Var::from_tensor(&row_norms(weight)?)?,
            merge_factor: Mutex::new(None),
        })
    }

    /// `m / ‖W + s·B·A‖` (`out`, f32); the norm is detached, as in peft.
    fn scale(&self, lora: &LoraLayer, weight: &Tensor, train: bool) -> Result<Tensor> {
        let w = (weight.detach().to_dtype(DType::F32)? + lora.delta_weight()?.detach())?;
        let norm = row_norms(&w)?;
        Ok(use_param(&self.vector, train).div(&norm)?)
    }

    /// The DoRA layer's output.
    pub fn forward(
        &self,
        lora: &LoraLayer,
        x: &Tensor,
        base: &BaseLinear<'_>,
        mask: Option<&Tensor>,
        train: bool,
    ) -> Result<Tensor> {
        let scale = self.scale(lora, base.weight, train)?.to_dtype(x.dtype())?;
        match mask {
            None => {
                let y = lora
                    .base_plus_delta(x, base, false, None, train)?
                    .broadcast_mul(&scale)?;
                Ok(match base.bias {
                    Some(b) => y.broadcast_add(&b.to_dtype(x.dtype())?)?,
                    None => y,
                })
            }
            Some(mask) => {
                // peft: base(x) + (scale − 1)·(x̃·Wᵀ) + scale·s·B·A·x̃ with x̃ the dropped-out x.
                let dropped = x.mul(mask)?;
                let rescaled = lora
                    .base_plus_delta(&dropped, base, false, None, train)?
                    .broadcast_mul(&scale)?;
                Ok(((base.forward(x)? - base.forward_no_bias(&dropped)?)? + rescaled)?)
            }
        }
    }

    /// `(m/‖W + Δ‖) ⊙ (W + Δ)`, remembering the factor for [`Self::unmerged`].
    pub fn merged(&self, weight: &Tensor, delta: &Tensor) -> Result<Tensor> {
        let w = (weight.to_dtype(DType::F32)? + delta.to_dtype(DType::F32)?)?;
        let factor = self.vector.as_tensor().detach().div(&row_norms(&w)?)?;
        let merged = w.broadcast_mul(&factor.unsqueeze(1)?)?;
        *self.merge_factor.lock().unwrap_or_else(|e| e.into_inner()) = Some(factor);
        Ok(merged.to_dtype(weight.dtype())?)
    }

    /// `W'/factor − Δ`, with the factor of the last merge.
    pub fn unmerged(&self, weight: &Tensor, delta: &Tensor) -> Result<Tensor> {
        let factor = self
            .merge_factor
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        let factor = match factor {
            Some(f) => f,
            None => {
                return Err(crate::PeftError::Config {
                    key: "unmerge".into(),
                    message: "DoRA layer was not merged".into(),
                })
            }
        };
        let w = weight
            .to_dtype(DType::F32)?
            .broadcast_div(&factor.unsqueeze(1)?)?;
        Ok((w - delta.to_dtype(DType::F32)?)?.to_dtype(weight.dtype())?)
    }
}
