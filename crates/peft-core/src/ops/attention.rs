//! The core of multi-head self-attention, `dropout(softmax(scale·Q·Kᵀ + mask))·V` per head, from
//! Q, K and V in the linears' `(batch, seq, heads·head_dim)` layout to the context in the same
//! layout.
//!
//! On CUDA this is one op: per-head strided-batched cuBLAS GEMMs read the heads in place (no
//! split/merge copies), one kernel does scale + mask + softmax, dropout re-derives its mask from a
//! seed, and nothing score-sized is kept for the backward, which recomputes the probabilities
//! from Q and K (as FlashAttention does, though the scores of one layer are still materialised
//! transiently). Elsewhere [`attention_reference`] composes candle ops and the other custom ops;
//! it computes the same function (same dropout mask for the same seed) and is the reference the
//! device checks compare against.

use candle_core::{CpuStorage, CustomOp1, CustomOp3, Layout, Shape, Tensor};

use super::dropout::apply_seeded_dropout;
use super::masked_softmax;

/// Settings of one attention call besides Q, K and V.
#[derive(Clone, Copy, Debug)]
pub struct AttentionSpec<'a> {
    /// Number of heads; `hidden` must be a multiple.
    pub heads: usize,
    /// Multiplies the scores (`1/√head_dim`).
    pub scale: f64,
    /// Additive f32 mask `(batch, keys)`: 0 for kept keys, a large negative value for masked ones.
    pub mask: Option<&'a Tensor>,
    /// Dropout on the attention probabilities: `(seed, keep probability)`.
    pub dropout: Option<(u64, f32)>,
}

/// The attention context for `q` of shape `(batch, queries, hidden)` and `k`, `v` of shape
/// `(batch, keys, hidden)` (more keys than queries with prefix tuning's per-layer prefixes).
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    spec: &AttentionSpec<'_>,
) -> candle_core::Result<Tensor> {
    let (b, s, hidden) = q.dims3()?;
    let (kb, keys, k_hidden) = k.dims3()?;
    if kb != b
        || k_hidden != hidden
        || v.dims() != k.dims()
        || spec.heads == 0
        || hidden % spec.heads != 0
    {
        candle_core::bail!(
            "attention: q {:?}, k {:?}, v {:?} with {} heads do not fit",
            q.shape(),
            k.shape(),
            v.shape(),
            spec.heads
        )
    }
    let fused = q.device().is_cuda()
        && keys == s
        && matches!(
            q.dtype(),
            candle_core::DType::F32 | candle_core::DType::BF16
        );
    if !fused {
        return attention_reference(q, k, v, spec);
    }
    let mask = match spec.mask {
        Some(m) => {
            if m.elem_count() != b * s {
                candle_core::bail!("attention: mask {:?} is not (batch, keys)", m.shape())
            }
            Some(m.to_dtype(candle_core::DType::F32)?.contiguous()?.detach())
        }
        None => None,
    };
    let op = FusedAttention {
        heads: spec.heads,
        scale: spec.scale as f32,
        mask,
        dropout: spec.dropout,
    };
    q.contiguous()?.apply_op3_arc(
        &k.contiguous()?,
        &v.contiguous()?,
        std::sync::Arc::new(Box::new(op)),
    )
}

/// The same function from candle ops: split heads, `masked_softmax`, seeded dropout, merge heads.
pub fn attention_reference(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    spec: &AttentionSpec<'_>,
) -> candle_core::Result<Tensor> {
    let (b, s, hidden) = q.dims3()?;
    let d = hidden / spec.heads;
    let split = |x: &Tensor| -> candle_core::Result<Tensor> {
        let len = x.dim(1)?;
        x.reshape((b, len, spec.heads, d))?
            .transpose(1, 2)?
            .contiguous()
    };
    let (q, k, v) = (split(q)?, split(k)?, split(v)?);
    let probs = masked_softmax(&q.matmul(&k.t()?)?, spec.mask, spec.scale)?;
    let probs = match spec.dropout {
        Some((seed, keep)) => apply_seeded_dropout(&probs, seed, keep)?,
        None => probs,
    };
    probs.matmul(&v)?.transpose(1, 2)?.reshape((b, s, hidden))
}

#[derive(Clone)]
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
struct FusedAttention {
    heads: usize,
    scale: f32,
    mask: Option<Tensor>,
    dropout: Option<(u64, f32)>,
}

impl CustomOp3 for FusedAttention {
    fn name(&self) -> &'static str {
        "attention"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("attention: the fused op runs on CUDA; the CPU uses the composite")
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        q: &candle_core::CudaStorage,
        ql: &Layout,
        k: &candle_core::CudaStorage,
        kl: &Layout,
        v: &candle_core::CudaStorage,
        vl: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        super::cuda_attention::forward(self.params(), (q, ql), (k, kl), (v, vl))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _ctx: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let backward = AttentionBackward {
            forward: self.clone(),
            q: q.detach(),
            k: k.detach(),
            v: v.detach(),
        };
        let grads = g.contiguous()?.apply_op1_no_bwd(&backward)?;
        Ok((
            Some(grads.get(0)?),
            Some(grads.get(1)?),
            Some(grads.get(2)?),
        ))
    }
}

impl FusedAttention {
    #[cfg(feature = "cuda")]
    fn params(&self) -> super::cuda_attention::Params<'_> {
        super::cuda_attention::Params {
            heads: self.heads,
            scale: self.scale,
            mask: self.mask.as_ref(),
            dropout: self.dropout,
        }
    }
}

/// Maps the context gradient to `(dq, dk, dv)` stacked in one `(3, batch, seq, hidden)` tensor.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
struct AttentionBackward {
    forward: FusedAttention,
    q: Tensor,
    k: Tensor,
    v: Tensor,
}

impl CustomOp1 for AttentionBackward {
    fn name(&self) -> &'static str {
        "attention-backward"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("attention-backward: the fused op runs on CUDA")
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        g: &candle_core::CudaStorage,
        gl: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        super::cuda_attention::backward(self.forward.params(), (g, gl), &self.q, &self.k, &self.v)
    }
}
