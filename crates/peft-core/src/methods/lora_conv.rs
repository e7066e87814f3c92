//! LoRA on a 2-D convolution as peft defines it: `A` is a convolution from the input channels to
//! `r` with the base's kernel size, stride and padding, `B` a 1×1 convolution from `r` to the
//! output channels, `y = conv(x, W) + b + s·B(A(dropout(x)))`. `B` starts at zero. Merging adds
//! `s·(B₂·A₂)` reshaped to the kernel's shape, with `B₂ = B` as `out × r` and `A₂ = A` as
//! `r × (in·kh·kw)`.

use candle_core::{DType, Tensor, Var};
use rand::Rng;

use super::{use_param, LoraConfig};
use crate::conv::ConvGeometry;
use crate::error::Result;
use crate::ops::Dropout;

/// The LoRA pair of one convolution.
#[derive(Debug)]
pub struct LoraConv2d {
    /// `r × in × kh × kw`.
    pub a: Var,
    /// `out × r × 1 × 1`.
    pub b: Var,
    /// The factor applied to the update.
    pub scaling: f64,
    geometry: ConvGeometry,
    dropout: Dropout,
}

impl LoraConv2d {
    /// A fresh adapter for a kernel of shape `out × in × kh × kw`: `A` kaiming-uniform
    /// (`a = √5`, fan-in `in·kh·kw`, as peft's default), `B` zero.
    pub fn new(
        cfg: &LoraConfig,
        kernel_dims: &[usize],
        geometry: ConvGeometry,
        dropout: Dropout,
        rng: &mut impl Rng,
        device: &candle_core::Device,
    ) -> Result<Self> {
        let [out, inp, kh, kw] = kernel_dims else {
            return Err(crate::PeftError::Config {
                key: "adapter".into(),
                message: format!("a Conv2d kernel has 4 dimensions, got {kernel_dims:?}"),
            });
        };
        let fan_in = inp * kh * kw;
        let bound = 1.0 / (fan_in as f64).sqrt();
        let a: Vec<f32> = (0..cfg.r * fan_in)
            .map(|_| rng.gen_range(-bound..bound) as f32)
            .collect();
        Ok(Self {
            a: Var::from_tensor(&Tensor::from_vec(a, (cfg.r, *inp, *kh, *kw), device)?)?,
            b: Var::zeros((*out, cfg.r, 1, 1), DType::F32, device)?,
            scaling: cfg.scaling(),
            geometry,
            dropout,
        })
    }

    /// The trainable tensors with their peft keys under the layer's path.
    pub fn named_params(&self) -> Vec<(String, Var)> {
        vec![
            ("lora_A.weight".into(), self.a.clone()),
            ("lora_B.weight".into(), self.b.clone()),
        ]
    }

    /// `s·B(A(dropout(x)))` for `x` of shape `(batch, in, h, w)`, in `x`'s dtype.
    pub fn delta(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let x = self.dropout.forward(x, train)?;
        let a = use_param(&self.a, train).to_dtype(x.dtype())?;
        let b = use_param(&self.b, train).to_dtype(x.dtype())?;
        let g = self.geometry;
        let h = x.conv2d(&a, g.padding, g.stride, 1, 1)?;
        Ok((h.conv2d(&b, 0, 1, 1, 1)? * self.scaling)?)
    }

    /// The base 1×1 convolution (`w2`: `out × in`, channels-last `x`) plus this adapter, as the
    /// fused LoRA linear op: a 1×1 LoRA convolution is a LoRA linear over channels.
    pub(crate) fn pointwise(
        &self,
        x: &Tensor,
        w2: &Tensor,
        bias: Option<&Tensor>,
        train: bool,
    ) -> Result<Tensor> {
        let r = self.a.dim(0)?;
        let a = use_param(&self.a, train).reshape((r, ()))?;
        let b = use_param(&self.b, train).reshape(((), r))?;
        let mask = self.dropout.mask_for(x, train)?;
        let branch = crate::ops::LoraBranch {
            a: &a,
            b: &b,
            scale: self.scaling,
            mask: mask.as_ref(),
        };
        Ok(crate::ops::lora_linear(x, w2, bias, &branch)?)
    }

    /// The kernel update `s·B·A` (`out × in × kh × kw`, f32).
    pub fn delta_weight(&self) -> Result<Tensor> {
        let dims = self.a.dims().to_vec();
        let (out, r) = (self.b.dim(0)?, dims[0]);
        let a = self
            .a
            .as_tensor()
            .reshape((r, dims[1] * dims[2] * dims[3]))?;
        let b = self.b.as_tensor().reshape((out, r))?;
        Ok((b.matmul(&a)?.reshape((out, dims[1], dims[2], dims[3]))? * self.scaling)?)
    }
}
