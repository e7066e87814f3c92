//! ReLU and ReLU6 as one op each, whose backward is one pass over the output: candle builds them
//! from `maximum`/`minimum` (or a comparison) whose backward allocates several masks of the
//! activation's size, which dominates the step time of a CNN on the CPU.

use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::{contiguous_f32, with_f32, written_f32};

/// Elements per parallel task.
const CHUNK: usize = 1 << 14;

struct ClampAct {
    max: f32,
}

impl CustomOp1 for ClampAct {
    fn name(&self) -> &'static str {
        "clamp-activation"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(s, l, "clamp-activation")?;
        let max = self.max;
        // SAFETY: the chunks of y pair with equal chunks of x, every element written once.
        let y = unsafe {
            written_f32(x.len(), |y| {
                y.par_chunks_mut(CHUNK)
                    .zip(x.par_chunks(CHUNK))
                    .for_each(|(y, x)| {
                        for (y, x) in y.iter_mut().zip(x) {
                            *y = x.max(0.0).min(max);
                        }
                    })
            })
        };
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        // 0 < y < max exactly where 0 < x < max, so the output alone gives the mask.
        if grad.elem_count() != res.elem_count() {
            candle_core::bail!(
                "clamp-activation backward: gradient {:?} for {:?}",
                grad.dims(),
                res.dims()
            )
        }
        let max = self.max;
        let dx = with_f32(res, |y| {
            with_f32(grad, |g| {
                // SAFETY: dx, y and g have one length; every element is written once, never read.
                unsafe {
                    written_f32(y.len(), |dx| {
                        dx.par_chunks_mut(CHUNK)
                            .zip(y.par_chunks(CHUNK).zip(g.par_chunks(CHUNK)))
                            .for_each(|(dx, (y, g))| {
                                for ((d, y), g) in dx.iter_mut().zip(y).zip(g) {
                                    // A 0/1 factor rather than a branch keeps the loop vectorised.
                                    *d = *g * ((*y > 0.0) & (*y < max)) as u8 as f32;
                                }
                            })
                    })
                }
            })
        })??;
        Ok(Some(Tensor::from_vec(dx, res.shape(), res.device())?))
    }
}

/// `min(max(x, 0), max)` (`max` = ∞ for ReLU, 6 for ReLU6). f32 on the CPU runs the fused op;
/// anything else candle's `clamp`.
pub fn clamp_activation(x: &Tensor, max: f32) -> candle_core::Result<Tensor> {
    if !(x.device().is_cpu() && x.dtype() == candle_core::DType::F32) {
        return if max.is_finite() {
            x.clamp(0f32, max)
        } else {
            x.relu()
        };
    }
    x.contiguous()?
        .apply_op1_arc(std::sync::Arc::new(Box::new(ClampAct { max })))
}
