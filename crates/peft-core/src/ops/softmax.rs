//! Softmax over the last dimension with an optional frozen additive mask, as attention needs it.
//! The mask lives inside the op, so autograd computes no gradient buffer for it; the backward is
//! one fused op as well.

use super::vmath::{self, simd_kernel};
use super::{contiguous_f32, fused_kernels, written_f32};
use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Shape, Storage, Tensor};
use rayon::prelude::*;

/// Rows of scores one CPU task takes (rows are short: one per query of one head).
const ROWS_PER_TASK: usize = 32;

/// Where the mask row of each score row is: rows `first_row..` of a block, `rows_per_batch` score
/// rows per mask row of `keys` values.
#[derive(Clone, Copy)]
pub(super) struct RowMask<'a> {
    pub mask: Option<&'a [f32]>,
    pub keys: usize,
    pub first_row: usize,
    pub rows_per_batch: usize,
}

simd_kernel! {
    /// `out = softmax(scale·x + mask)` row by row over a block of rows.
    pub(super) fn softmax_rows(out: &mut [f32], x: &[f32], rows: RowMask<'_>, scale: f32) {
        let keys = rows.keys;
        for (i, (row, o)) in x.chunks_exact(keys).zip(out.chunks_exact_mut(keys)).enumerate() {
            match rows.mask {
                Some(mask) => {
                    let r = rows.first_row + i;
                    let m = &mask[(r / rows.rows_per_batch) * keys..][..keys];
                    for ((o, &x), &m) in o.iter_mut().zip(row).zip(m) {
                        *o = scale * x + m;
                    }
                }
                None => {
                    for (o, &x) in o.iter_mut().zip(row) {
                        *o = scale * x;
                    }
                }
            }
            let sum = vmath::exp_shifted_sum(o, vmath::max(o));
            let inv = 1.0 / sum;
            o.iter_mut().for_each(|v| *v *= inv);
        }
    }
}

simd_kernel! {
    /// `dx = scale · p ⊙ (g − Σ g⊙p)` row by row over a block of rows.
    pub(super) fn softmax_backward_rows(dx: &mut [f32], p: &[f32], g: &[f32], keys: usize, scale: f32) {
        for ((p, g), d) in p.chunks_exact(keys).zip(g.chunks_exact(keys)).zip(dx.chunks_exact_mut(keys)) {
            let dot = vmath::dot(p, g);
            for ((d, &p), &g) in d.iter_mut().zip(p).zip(g) {
                *d = scale * p * (g - dot);
            }
        }
    }
}

struct MaskedSoftmax {
    /// Additive f32 mask of shape `(batch, keys)`, contiguous, broadcast over heads and queries.
    mask: Option<Tensor>,
    /// Rows of scores per batch element (heads × queries).
    rows_per_batch: usize,
    /// Multiplies the scores before the mask is added.
    scale: f32,
}

impl CustomOp1 for MaskedSoftmax {
    fn name(&self) -> &'static str {
        "masked-softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(s, l, self.name())?;
        let keys = l.dims()[l.dims().len() - 1];
        let guard = self.mask.as_ref().map(|m| m.storage_and_layout());
        let mask = match &guard {
            Some((storage, layout)) => match &**storage {
                Storage::Cpu(c) => Some(contiguous_f32(c, layout, self.name())?),
                _ => candle_core::bail!("masked-softmax: the mask is not on the CPU"),
            },
            None => None,
        };
        if x.is_empty() {
            return Ok((CpuStorage::F32(Vec::new()), l.shape().clone()));
        }
        let rows = x.len() / keys;
        if let Some(m) = mask {
            if self.rows_per_batch == 0 || m.len() < rows.div_ceil(self.rows_per_batch) * keys {
                candle_core::bail!(
                    "masked-softmax: a mask of {} values for {:?}",
                    m.len(),
                    l.dims()
                )
            }
        }
        let block = keys * ROWS_PER_TASK;
        // SAFETY: x's length is rows·keys, so the blocks and rows of `keys` tile out exactly;
        // softmax_rows writes each row (scores, then exp) before it reads it back.
        let out = unsafe {
            written_f32(x.len(), |out| {
                out.par_chunks_mut(block)
                    .zip(x.par_chunks(block))
                    .enumerate()
                    .for_each(|(task, (out, x))| {
                        let rows = RowMask {
                            mask,
                            keys,
                            first_row: task * ROWS_PER_TASK,
                            rows_per_batch: self.rows_per_batch,
                        };
                        softmax_rows(out, x, rows, self.scale)
                    })
            })
        };
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        super::cuda_ops::masked_softmax(s, l, self.mask.as_ref(), self.rows_per_batch, self.scale)
    }

    fn bwd(&self, _x: &Tensor, p: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let backward = SoftmaxBackward { scale: self.scale };
        Ok(Some(p.apply_op2_no_bwd(&grad.contiguous()?, &backward)?))
    }
}

/// `dx = scale · p ⊙ (g − Σ g⊙p)` over the last dimension.
struct SoftmaxBackward {
    scale: f32,
}

impl CustomOp2 for SoftmaxBackward {
    fn name(&self) -> &'static str {
        "softmax-backward"
    }

    fn cpu_fwd(
        &self,
        ps: &CpuStorage,
        pl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let p = contiguous_f32(ps, pl, self.name())?;
        let g = contiguous_f32(gs, gl, self.name())?;
        let keys = pl.dims()[pl.dims().len() - 1];
        if p.is_empty() {
            return Ok((CpuStorage::F32(Vec::new()), pl.shape().clone()));
        }
        if g.len() != p.len() {
            candle_core::bail!(
                "softmax backward: gradient {:?} for {:?}",
                gl.dims(),
                pl.dims()
            )
        }
        let block = keys * ROWS_PER_TASK;
        // SAFETY: p, g and dx have one length, rows·keys, so the blocks and rows tile dx
        // exactly; softmax_backward_rows writes every element and reads none.
        let dx = unsafe {
            written_f32(p.len(), |dx| {
                dx.par_chunks_mut(block)
                    .zip(p.par_chunks(block).zip(g.par_chunks(block)))
                    .for_each(|(dx, (p, g))| softmax_backward_rows(dx, p, g, keys, self.scale))
            })
        };
        Ok((CpuStorage::F32(dx), pl.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        ps: &candle_core::CudaStorage,
        pl: &Layout,
        gs: &candle_core::CudaStorage,
        gl: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        super::cuda_ops::softmax_bwd(ps, pl, gs, gl, self.scale)
    }
}

/// `softmax(scale · scores + mask)` over the last dimension (attention's `1/√d` scale folded in).
/// `scores` has shape `(batch, heads, queries, keys)`; `mask`, if given, shape `(batch, keys)`
/// with 0 for kept keys and a large negative value for masked ones. The mask gets no gradient.
pub fn masked_softmax(
    scores: &Tensor,
    mask: Option<&Tensor>,
    scale: f64,
) -> candle_core::Result<Tensor> {
    let (batch, heads, queries, keys) = scores.dims4()?;
    if fused_kernels(scores) {
        let mask = match mask {
            Some(m) => {
                if m.elem_count() != batch * keys {
                    candle_core::bail!(
                        "masked-softmax: mask has shape {:?}, expected {batch}×{keys}",
                        m.shape()
                    )
                }
                Some(m.to_dtype(candle_core::DType::F32)?.contiguous()?.detach())
            }
            None => None,
        };
        scores.contiguous()?.apply_op1(MaskedSoftmax {
            mask,
            rows_per_batch: heads * queries,
            scale: scale as f32,
        })
    } else {
        let scores = (scores * scale)?;
        let scores = match mask {
            Some(m) => scores.broadcast_add(
                &m.detach()
                    .to_dtype(scores.dtype())?
                    .reshape((batch, 1, 1, keys))?,
            )?,
            None => scores.clone(),
        };
        // candle_nn's fused `softmax_last_dim` has no backward: the composite one does.
        candle_nn::ops::softmax(&scores, candle_core::D::Minus1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// The op against candle's composite softmax, forward within 1e-6 and gradient within 1e-5.
    fn check_against_composite(
        dims: (usize, usize, usize, usize),
        mask: Tensor,
    ) -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let (b, _, _, k) = dims;
        let s = Var::randn(0f32, 2., dims, &dev)?;
        let w = Tensor::randn(0f32, 1., dims, &dev)?;
        let ours = masked_softmax(s.as_tensor(), Some(&mask), 0.125)?;
        let reference = candle_nn::ops::softmax(
            &(s.as_tensor() * 0.125)?.broadcast_add(&mask.reshape((b, 1, 1, k))?)?,
            candle_core::D::Minus1,
        )?;
        let diff = (&ours - &reference)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-6, "{dims:?}: forward differs by {diff}");
        let g1 = (ours * &w)?.sum_all()?.backward()?;
        let g2 = (reference * &w)?.sum_all()?.backward()?;
        let d = (g1.get(s.as_tensor()).unwrap() - g2.get(s.as_tensor()).unwrap())?;
        let diff = d.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-5, "{dims:?}: gradient differs by {diff}");
        assert!(g1.get(&mask).is_none());
        Ok(())
    }

    #[test]
    fn matches_composite_softmax_and_gradient() -> candle_core::Result<()> {
        let mask = Tensor::new(
            &[[0f32, 0., 0., -1e4, -1e4], [0., 0., 0., 0., 0.]],
            &Device::Cpu,
        )?;
        check_against_composite((2, 3, 4, 5), mask)
    }

    /// More rows than one CPU task takes, batches that split tasks, rows longer than the SIMD
    /// lanes with a tail, and masked keys at −∞ and f32::MIN.
    #[test]
    fn matches_composite_across_tasks_and_lanes() -> candle_core::Result<()> {
        let (b, k) = (3, 37);
        let mask: Vec<f32> = (0..b * k)
            .map(|i| match i % 11 {
                3 => f32::NEG_INFINITY,
                7 => f32::MIN,
                _ => 0.0,
            })
            .collect();
        check_against_composite((b, 5, 7, k), Tensor::from_vec(mask, (b, k), &Device::Cpu)?)
    }
}
