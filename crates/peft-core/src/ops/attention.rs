//! The core of multi-head self-attention, `dropout(softmax(scale·Q·Kᵀ + mask))·V` per head, from
//! Q, K and V in the linears' `(batch, seq, heads·head_dim)` layout to the context in the same
//! layout.
//!
//! On f32 CPU tensors and f32/bf16 CUDA tensors this is one op: the per-head GEMMs read the
//! heads in place (no split/merge copies), scale + mask + softmax is one pass, dropout re-derives
//! its mask from a seed, and nothing score-sized is kept for the backward, which recomputes the
//! probabilities from Q and K (as FlashAttention does, though one head's (CPU) or one layer's
//! (CUDA) scores are still materialised transiently). The CPU op is in cpu_attention.rs, the CUDA
//! one in cuda_attention.rs. Elsewhere (other dtypes, more keys than queries)
//! [`attention_reference`] composes candle ops and the other custom ops; it computes the same
//! function (same dropout mask for the same seed) and is the reference both ops are tested
//! against.

use candle_core::{CpuStorage, CustomOp1, CustomOp3, Layout, Shape, Storage, Tensor};

use super::dropout::apply_seeded_dropout;
use super::{contiguous_f32, masked_softmax, with_f32};

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
    let fused = keys == s && super::fused_kernels(q);
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
        q: &CpuStorage,
        ql: &Layout,
        k: &CpuStorage,
        kl: &Layout,
        v: &CpuStorage,
        vl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (q, k, v) = (
            contiguous_f32(q, ql, self.name())?,
            contiguous_f32(k, kl, self.name())?,
            contiguous_f32(v, vl, self.name())?,
        );
        let ctx = self.with_cpu_params(ql, |p| super::cpu_attention::forward(p, q, k, v))?;
        Ok((CpuStorage::F32(ctx), ql.shape().clone()))
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
        // An input that depends on no trainable tensor (the key of a first layer whose key
        // projection is frozen) would only have its gradient stored and dropped.
        let wanted = |i: usize, t: &Tensor| t.track_op().then(|| grads.get(i)).transpose();
        Ok((wanted(0, q)?, wanted(1, k)?, wanted(2, v)?))
    }
}

impl FusedAttention {
    /// Runs `f` with the CPU op's parameters for inputs of layout `l` (the mask read in place).
    fn with_cpu_params<R>(
        &self,
        l: &Layout,
        f: impl FnOnce(super::cpu_attention::Params<'_>) -> candle_core::Result<R>,
    ) -> candle_core::Result<R> {
        let (batch, seq, hidden) = l.shape().dims3()?;
        let params = super::cpu_attention::Params {
            batch,
            seq,
            hidden,
            heads: self.heads,
            scale: self.scale,
            mask: None,
            dropout: self.dropout,
        };
        match &self.mask {
            Some(m) => with_f32(m, |m| {
                f(super::cpu_attention::Params {
                    mask: Some(m),
                    ..params
                })
            })?,
            None => f(params),
        }
    }

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

    fn cpu_fwd(&self, g: &CpuStorage, gl: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let g = contiguous_f32(g, gl, self.name())?;
        // The forward's inputs are contiguous (it made them so): read them in place.
        let (qs, ql) = self.q.storage_and_layout();
        let (ks, kl) = self.k.storage_and_layout();
        let (vs, vl) = self.v.storage_and_layout();
        let (Storage::Cpu(qs), Storage::Cpu(ks), Storage::Cpu(vs)) = (&*qs, &*ks, &*vs) else {
            candle_core::bail!("attention-backward: q, k and v are not all on the CPU")
        };
        let q = contiguous_f32(qs, ql, self.name())?;
        let k = contiguous_f32(ks, kl, self.name())?;
        let v = contiguous_f32(vs, vl, self.name())?;
        let grads = self
            .forward
            .with_cpu_params(gl, |p| super::cpu_attention::backward(p, g, q, k, v))?;
        let mut dims = vec![3];
        dims.extend_from_slice(gl.dims());
        Ok((CpuStorage::F32(grads), Shape::from(dims)))
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
