//! LoRA on an embedding table as peft defines it: `E(ids) = W[ids] + s·(Aᵀ[ids])·Bᵀ` with
//! `lora_embedding_A` (`r × vocab`) zero and `lora_embedding_B` (`dim × r`) standard normal at
//! initialisation (the transpose of the linear case's choice, so the model still starts at the
//! base output). No dropout, as in peft. Merging adds `s·(B·A)ᵀ` to the table.

use candle_core::{DType, Tensor, Var};

use super::{use_param, LoraConfig};
use crate::error::Result;

/// The LoRA pair of one embedding table.
#[derive(Debug)]
pub struct LoraEmbedding {
    /// `r × vocab`.
    pub a: Var,
    /// `dim × r`.
    pub b: Var,
    /// The factor applied to the update.
    pub scaling: f64,
}

impl LoraEmbedding {
    /// A fresh adapter for a `vocab × dim` table.
    pub fn new(
        cfg: &LoraConfig,
        vocab: usize,
        dim: usize,
        rng: &mut impl rand::Rng,
        device: &candle_core::Device,
    ) -> Result<Self> {
        let b: Vec<f32> = (0..dim * cfg.r)
            .map(|_| crate::weights::standard_normal(rng) as f32)
            .collect();
        Ok(Self {
            a: Var::zeros((cfg.r, vocab), DType::F32, device)?,
            b: Var::from_tensor(&Tensor::from_vec(b, (dim, cfg.r), device)?)?,
            scaling: cfg.scaling(),
        })
    }

    /// The trainable tensors with their peft keys under the table's path.
    pub fn named_params(&self) -> Vec<(String, Var)> {
        vec![
            ("lora_embedding_A".into(), self.a.clone()),
            ("lora_embedding_B".into(), self.b.clone()),
        ]
    }

    /// `s·(Aᵀ[ids])·Bᵀ` for flat `ids`, `(n, dim)` in `dtype`.
    pub fn delta(&self, ids: &Tensor, dtype: DType, train: bool) -> Result<Tensor> {
        let rows = use_param(&self.a, train).index_select(ids, 1)?.t()?;
        let b = use_param(&self.b, train);
        Ok((rows.matmul(&b.t()?)? * self.scaling)?.to_dtype(dtype)?)
    }

    /// The table update `s·(B·A)ᵀ` (`vocab × dim`, f32).
    pub fn delta_weight(&self) -> Result<Tensor> {
        Ok((self.b.as_tensor().matmul(self.a.as_tensor())?.t()? * self.scaling)?)
    }
}
