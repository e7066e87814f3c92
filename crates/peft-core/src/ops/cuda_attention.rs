//! CUDA forward and backward of the fused attention op ([`super::attention`]).
//!
//! Layout: Q, K, V, the context and their gradients are `(b, s, H·d)` row-major; head `h` of
//! batch item `i` is the `s × d` block at offset `i·s·H·d + h·d` with row stride `H·d`, so one
//! strided-batched GEMM per head covers the batch. Scores and probabilities are `(b, H, s, s)`.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaView};
use candle_core::cuda_backend::{CudaDevice, WrapErr};
use candle_core::{CudaStorage, DType, Layout, Result, Shape, Tensor};

use super::cuda_ops::{launch_dropout, launch_masked_softmax};
use crate::cuda::{
    alloc, gemm_batched, launch, rows_cfg, storage, tensor_view, view, Elem, Op, Strided,
};

/// The op's settings.
pub(crate) struct Params<'a> {
    pub heads: usize,
    pub scale: f32,
    pub mask: Option<&'a Tensor>,
    pub dropout: Option<(u64, f32)>,
}

struct Dims {
    b: usize,
    s: usize,
    hd: usize,
    d: usize,
    heads: usize,
}

impl Dims {
    fn new(l: &Layout, heads: usize) -> Result<Self> {
        let (b, s, hd) = l.shape().dims3()?;
        Ok(Self {
            b,
            s,
            hd,
            d: hd / heads,
            heads,
        })
    }
    /// Head `h` of Q/K/V/context: row stride `H·d`, batch stride `s·H·d`.
    fn head(&self, op: Op) -> Strided {
        Strided {
            op,
            ld: self.hd,
            stride: self.s * self.hd,
        }
    }
    /// Head `h` of scores/probabilities: row stride `s`, batch stride `H·s·s`.
    fn scores(&self, op: Op) -> Strided {
        Strided {
            op,
            ld: self.s,
            stride: self.heads * self.s * self.s,
        }
    }
    fn score_len(&self) -> usize {
        self.b * self.heads * self.s * self.s
    }
}

/// Probabilities `softmax(scale·Q·Kᵀ + mask)` (and their dropped-out copy when dropout is on).
fn probabilities<T: Elem>(
    dev: &CudaDevice,
    p: &Params<'_>,
    dims: &Dims,
    q: &CudaView<'_, T>,
    k: &CudaView<'_, T>,
) -> Result<(CudaSlice<T>, Option<CudaSlice<T>>)> {
    let (s, d, hs) = (dims.s, dims.d, dims.s * dims.s);
    // Scores in f32 (bf16 inputs, f32 accumulation and output), as FlashAttention keeps them.
    let mut scores = alloc::<f32>(dev, dims.score_len())?;
    for h in 0..dims.heads {
        let qh = q.slice(h * d..);
        let kh = k.slice(h * d..);
        let mut sh = scores.slice_mut(h * hs..);
        gemm_batched::<T, f32, _, _, _>(
            dev,
            (dims.b, s, s, d),
            1.0,
            (&qh, dims.head(Op::N)),
            (&kh, dims.head(Op::T)),
            0.0,
            (&mut sh, s, dims.heads * hs),
        )?;
    }
    let mut probs = alloc::<T>(dev, dims.score_len())?;
    launch_masked_softmax::<T, f32>(
        dev,
        "masked_softmax_from_f32",
        &scores.slice(..),
        p.mask,
        &mut probs,
        (dims.b * dims.heads * s, s, dims.heads * s),
        p.scale,
    )?;
    drop(scores);
    let dropped = match p.dropout {
        Some(seeded) => {
            let mut out = alloc::<T>(dev, dims.score_len())?;
            launch_dropout::<T>(dev, &probs.slice(..), &mut out, dims.score_len(), seeded)?;
            Some(out)
        }
        None => None,
    };
    Ok((probs, dropped))
}

fn forward_t<T: Elem>(
    p: Params<'_>,
    (q, ql): (&CudaStorage, &Layout),
    (k, kl): (&CudaStorage, &Layout),
    (v, vl): (&CudaStorage, &Layout),
) -> Result<(CudaStorage, Shape)> {
    const OP: &str = "attention";
    let dev = q.device();
    let dims = Dims::new(ql, p.heads)?;
    let (qv, kv, vv) = (
        view::<T>(q, ql, OP)?,
        view::<T>(k, kl, OP)?,
        view::<T>(v, vl, OP)?,
    );
    let (probs, dropped) = probabilities::<T>(dev, &p, &dims, &qv, &kv)?;
    let used = dropped.as_ref().unwrap_or(&probs);
    let (s, d, hs) = (dims.s, dims.d, dims.s * dims.s);
    let mut ctx = alloc::<T>(dev, dims.b * s * dims.hd)?;
    for h in 0..dims.heads {
        let ph = used.slice(h * hs..);
        let vh = vv.slice(h * d..);
        let mut ch = ctx.slice_mut(h * d..);
        gemm_batched::<T, T, _, _, _>(
            dev,
            (dims.b, s, d, s),
            1.0,
            (&ph, dims.scores(Op::N)),
            (&vh, dims.head(Op::N)),
            0.0,
            (&mut ch, dims.hd, s * dims.hd),
        )?;
    }
    Ok((storage(ctx, dev), ql.shape().clone()))
}

/// The attention context.
pub(crate) fn forward(
    p: Params<'_>,
    q: (&CudaStorage, &Layout),
    k: (&CudaStorage, &Layout),
    v: (&CudaStorage, &Layout),
) -> Result<(CudaStorage, Shape)> {
    match q.0.dtype() {
        DType::F32 => forward_t::<f32>(p, q, k, v),
        DType::BF16 => forward_t::<half::bf16>(p, q, k, v),
        d => candle_core::bail!("attention: CUDA kernels support f32 and bf16, got {d:?}"),
    }
}

fn backward_t<T: Elem>(
    p: Params<'_>,
    (g, gl): (&CudaStorage, &Layout),
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
) -> Result<(CudaStorage, Shape)> {
    const OP: &str = "attention-backward";
    let dev = g.device();
    let dims = Dims::new(gl, p.heads)?;
    let gv = view::<T>(g, gl, OP)?;
    let (qs, qlay) = q.storage_and_layout();
    let (ks, klay) = k.storage_and_layout();
    let (vs, vlay) = v.storage_and_layout();
    let qv = tensor_view::<T>(&qs, qlay, OP)?;
    let kv = tensor_view::<T>(&ks, klay, OP)?;
    let vv = tensor_view::<T>(&vs, vlay, OP)?;
    let (probs, dropped) = probabilities::<T>(dev, &p, &dims, &qv, &kv)?;
    let (s, d, hs) = (dims.s, dims.d, dims.s * dims.s);
    let n = dims.b * s * dims.hd;
    // Output: dq, dk, dv stacked.
    let mut out = alloc::<T>(dev, 3 * n)?;
    // dV_h = P̃_hᵀ · G_h (P̃: the dropped-out probabilities).
    {
        let used = dropped.as_ref().unwrap_or(&probs);
        for h in 0..dims.heads {
            let ph = used.slice(h * hs..);
            let gh = gv.slice(h * d..);
            let mut dvh = out.slice_mut(2 * n + h * d..);
            gemm_batched::<T, T, _, _, _>(
                dev,
                (dims.b, s, d, s),
                1.0,
                (&ph, dims.scores(Op::T)),
                (&gh, dims.head(Op::N)),
                0.0,
                (&mut dvh, dims.hd, s * dims.hd),
            )?;
        }
    }
    drop(dropped);
    // dP̃_h = G_h · V_hᵀ, then back through dropout (same seed) and softmax (with the scale).
    let mut dp = alloc::<f32>(dev, dims.score_len())?;
    for h in 0..dims.heads {
        let gh = gv.slice(h * d..);
        let vh = vv.slice(h * d..);
        let mut dph = dp.slice_mut(h * hs..);
        gemm_batched::<T, f32, _, _, _>(
            dev,
            (dims.b, s, s, d),
            1.0,
            (&gh, dims.head(Op::N)),
            (&vh, dims.head(Op::T)),
            0.0,
            (&mut dph, s, dims.heads * hs),
        )?;
    }
    let dp = match p.dropout {
        Some(seeded) => {
            let mut undropped = alloc::<f32>(dev, dims.score_len())?;
            launch_dropout::<f32>(dev, &dp.slice(..), &mut undropped, dims.score_len(), seeded)?;
            undropped
        }
        None => dp,
    };
    let mut ds = alloc::<T>(dev, dims.score_len())?;
    let keys = s as i32;
    launch!(
        dev,
        T,
        "softmax_bwd_from_f32",
        rows_cfg(dims.b * dims.heads * s, s),
        &probs,
        &dp,
        &mut ds,
        &keys,
        &p.scale
    )?;
    drop(dp);
    drop(probs);
    // dQ_h = dS_h · K_h; dK_h = dS_hᵀ · Q_h.
    for h in 0..dims.heads {
        let dsh = ds.slice(h * hs..);
        let kh = kv.slice(h * d..);
        let mut dqh = out.slice_mut(h * d..);
        gemm_batched::<T, T, _, _, _>(
            dev,
            (dims.b, s, d, s),
            1.0,
            (&dsh, dims.scores(Op::N)),
            (&kh, dims.head(Op::N)),
            0.0,
            (&mut dqh, dims.hd, s * dims.hd),
        )?;
        let qh = qv.slice(h * d..);
        let mut dkh = out.slice_mut(n + h * d..);
        gemm_batched::<T, T, _, _, _>(
            dev,
            (dims.b, s, d, s),
            1.0,
            (&dsh, dims.scores(Op::T)),
            (&qh, dims.head(Op::N)),
            0.0,
            (&mut dkh, dims.hd, s * dims.hd),
        )?;
    }
    Ok((storage(out, dev), Shape::from((3, dims.b, s, dims.hd))))
}

/// `(dq, dk, dv)` stacked as `(3, batch, seq, hidden)`.
pub(crate) fn backward(
    p: Params<'_>,
    g: (&CudaStorage, &Layout),
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
) -> Result<(CudaStorage, Shape)> {
    match g.0.dtype() {
        DType::F32 => backward_t::<f32>(p, g, q, k, v),
        DType::BF16 => backward_t::<half::bf16>(p, g, q, k, v),
        d => candle_core::bail!("attention-backward: CUDA kernels support f32 and bf16, got {d:?}"),
    }
}
