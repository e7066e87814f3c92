//! LoRA as peft defines it: `y = base(x) + s · B(A(dropout(x)))`, `s = alpha/r` (or `alpha/√r`).

use candle_core::{DType, Device, Tensor, Var};
use rand::Rng;

use crate::error::Result;
use crate::ops::Dropout;
use crate::plan::{LoraConfig, LoraInit};

/// The trainable pair `A` (`r × in`) and `B` (`out × r`) of one adapted linear layer.
#[derive(Debug)]
pub struct LoraAdapter {
    /// Down-projection, `r × in`.
    pub a: Var,
    /// Up-projection, `out × r`; zero at initialisation so the model starts at the base output.
    pub b: Var,
    /// The factor applied to `B·A·x`.
    pub scaling: f64,
    dropout: Dropout,
}

impl LoraAdapter {
    /// A fresh adapter for an `in_features → out_features` linear.
    pub fn new(
        cfg: &LoraConfig,
        in_features: usize,
        out_features: usize,
        dropout: Dropout,
        rng: &mut impl Rng,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let r = cfg.r;
        let a: Vec<f32> = match cfg.init {
            // kaiming_uniform_(a=√5): bound = gain·√(3/fan_in) with gain = √(2/(1+5)) = 1/√fan_in.
            LoraInit::Kaiming => {
                let bound = 1.0 / (in_features as f64).sqrt();
                (0..r * in_features)
                    .map(|_| rng.gen_range(-bound..bound) as f32)
                    .collect()
            }
            LoraInit::Gaussian => (0..r * in_features)
                .map(|_| (crate::weights::standard_normal(rng) / r as f64) as f32)
                .collect(),
        };
        let a = Tensor::from_vec(a, (r, in_features), device)?.to_dtype(dtype)?;
        let b = Tensor::zeros((out_features, r), dtype, device)?;
        Ok(Self {
            a: Var::from_tensor(&a)?,
            b: Var::from_tensor(&b)?,
            scaling: cfg.scaling(),
            dropout,
        })
    }

    /// `s · B·A·dropout(x)` for `x` of shape `(rows, in)`, in `x`'s dtype.
    pub fn delta(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let x = self.dropout.forward(x, train)?;
        let h = x.matmul(&self.a.as_tensor().to_dtype(x.dtype())?.t()?)?;
        let y = h.matmul(&self.b.as_tensor().to_dtype(x.dtype())?.t()?)?;
        Ok((y * self.scaling)?)
    }

    /// The next dropout keep-mask for the adapter's input `x` (`None` at evaluation or `p = 0`).
    pub fn dropout_mask(&self, x: &Tensor, train: bool) -> Result<Option<Tensor>> {
        Ok(self.dropout.mask_for(x, train)?)
    }

    /// The weight update `s · B·A` (`out × in`), as merged into the base.
    pub fn delta_weight(&self) -> Result<Tensor> {
        Ok((self.b.as_tensor().matmul(self.a.as_tensor())? * self.scaling)?)
    }
}
