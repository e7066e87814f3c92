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

    /// Normalises `x`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(layer_norm(x, &self.gamma, &self.beta, self.eps)?)
    }
}
