//! Softmax over the last dimension with an optional frozen additive mask, as attention needs it.
//! The mask lives inside the op, so autograd computes no gradient buffer for it.

use super::contiguous_f32;
use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor, D};

struct MaskedSoftmax {
    /// Additive mask of shape `(batch, keys)`, broadcast over heads and queries.
    mask: Option<Vec<f32>>,
    /// Rows of scores per batch element (heads × queries).
    rows_per_batch: usize,
}

impl CustomOp1 for MaskedSoftmax {
    fn name(&self) -> &'static str {
        "masked-softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(s, l, self.name())?;
        let keys = l.dims()[l.dims().len() - 1];
        let mut out = vec![0f32; x.len()];
        for (r, (row, o)) in x
            .chunks_exact(keys)
            .zip(out.chunks_exact_mut(keys))
            .enumerate()
        {
            match &self.mask {
                Some(mask) => {
                    let m = &mask[(r / self.rows_per_batch) * keys..][..keys];
                    for i in 0..keys {
                        o[i] = row[i] + m[i];
                    }
                }
                None => o.copy_from_slice(row),
            }
            let max = o.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut sum = 0f32;
            for v in o.iter_mut() {
                *v = (*v - max).exp();
                sum += *v;
            }
            let inv = 1.0 / sum;
            o.iter_mut().for_each(|v| *v *= inv);
        }
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, p: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let dot = (grad * p)?.sum_keepdim(D::Minus1)?;
        Ok(Some((grad.broadcast_sub(&dot)? * p)?))
    }
}

/// `softmax(scores + mask)` over the last dimension. `scores` has shape
/// `(batch, heads, queries, keys)`; `mask`, if given, shape `(batch, keys)` with 0 for kept keys
/// and a large negative value for masked ones. The mask receives no gradient.
pub fn masked_softmax(scores: &Tensor, mask: Option<&Tensor>) -> candle_core::Result<Tensor> {
    let (batch, heads, queries, keys) = scores.dims4()?;
    if scores.device().is_cpu() && scores.dtype() == candle_core::DType::F32 {
        let mask = match mask {
            Some(m) => Some(
                m.to_dtype(candle_core::DType::F32)?
                    .flatten_all()?
                    .to_vec1()?,
            ),
            None => None,
        };
        if let Some(m) = &mask {
            if m.len() != batch * keys {
                candle_core::bail!(
                    "masked-softmax: mask has {} values, expected {batch}×{keys}",
                    m.len()
                )
            }
        }
        scores.contiguous()?.apply_op1(MaskedSoftmax {
            mask,
            rows_per_batch: heads * queries,
        })
    } else {
        let scores = match mask {
            Some(m) => scores.broadcast_add(&m.detach().reshape((batch, 1, 1, keys))?)?,
            None => scores.clone(),
        };
        candle_nn::ops::softmax_last_dim(&scores)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn matches_composite_softmax_and_gradient() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let s = Var::randn(0f32, 2., (2, 3, 4, 5), &dev)?;
        let mask = Tensor::new(&[[0f32, 0., 0., -1e4, -1e4], [0., 0., 0., 0., 0.]], &dev)?;
        let w = Tensor::randn(0f32, 1., (2, 3, 4, 5), &dev)?;
        let ours = masked_softmax(s.as_tensor(), Some(&mask))?;
        let reference =
            candle_nn::ops::softmax(&s.broadcast_add(&mask.reshape((2, 1, 1, 5))?)?, D::Minus1)?;
        let diff = (&ours - &reference)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-6, "forward differs by {diff}");
        let g1 = (ours * &w)?.sum_all()?.backward()?;
        let g2 = (reference * &w)?.sum_all()?.backward()?;
        let d = (g1.get(s.as_tensor()).unwrap() - g2.get(s.as_tensor()).unwrap())?;
        let diff = d.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-5, "gradient differs by {diff}");
        assert!(g1.get(&mask).is_none());
        Ok(())
    }
}
