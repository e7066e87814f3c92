//! Embedding and LayerNorm whose parameters are frozen tensors or trainable `Var`s by plan.

use candle_core::{DType, Tensor};

use crate::error::Result;
use crate::ops::layer_norm;

/// A lookup table `(vocab, dim)`.
#[derive(Clone, Debug)]
pub struct Embedding {
    table: Tensor,
    dtype: DType,
}

impl Embedding {
    /// Wraps a table of shape `(vocab, dim)`; lookups come out in the table's dtype.
    pub fn new(table: Tensor) -> Self {
        let dtype = table.dtype();
        Self { table, dtype }
    }

    /// Lookups come out in `dtype` (the model's compute dtype, when a trainable table is f32).
    pub fn with_output_dtype(mut self, dtype: DType) -> Self {
        self.dtype = dtype;
        self
    }

    /// The table.
    pub fn table(&self) -> &Tensor {
        &self.table
    }

    /// Looks up `ids` of any shape; the result gains a trailing `dim` axis.
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        let mut dims = ids.dims().to_vec();
        dims.push(self.table.dim(1)?);
        let flat = ids.flatten_all()?;
        Ok(self
            .table
            .index_select(&flat, 0)?
            .reshape(dims)?
            .to_dtype(self.dtype)?)
    }
}

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
