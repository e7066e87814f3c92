//! LayerNorm whose parameters are frozen tensors or trainable `Var`s by plan.

use candle_core::Tensor;

use crate::error::Result;
use crate::ops::layer_norm;

/// LayerNorm over the last dimension with gain and bias.
#[derive(Clone, Debug)]
pub struct LayerNorm {
    gamma: Tensor,
    beta: Tensor,
    eps: f64,
}

impl LayerNorm {
    /// A LayerNorm with the given parameters.
    pub fn new(gamma: Tensor, beta: Tensor, eps: f64) -> Self {
        Self { gamma, beta, eps }
    }

    /// Normalises `x`. At evaluation (`train = false`) trainable parameters are used detached,
    /// so that no autograd graph keeps the activations alive.
    pub fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        if train {
            Ok(layer_norm(x, &self.gamma, &self.beta, self.eps)?)
        } else {
            Ok(layer_norm(
                x,
                &self.gamma.detach(),
                &self.beta.detach(),
                self.eps,
            )?)
        }
    }
}
