//! Batch normalisation over channels-last activations, followed by an optional clamp activation
//! (ReLU, ReLU6), as one op each way:
//! - [`batch_norm_train`]: the batch statistics, normalisation, affine map and activation forward;
//!   the exact backward through the activation and the statistics (PyTorch's
//!   `BatchNorm2d.train()`), gain/shift gradients only when they are trainable;
//! - [`affine_act`]: evaluation (running statistics folded into a per-channel scale and shift).
//!
//! Each direction is two passes over the activation at most, reading candle's storage in place;
//! candle's op-by-op version costs about ten passes plus one buffer per intermediate.
//! [`batch_norm_train_reference`] computes the same from plain candle ops for the tests.

use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp1, CustomOp3, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::{contiguous_f32, with_f32, written_f32};

/// Rows (`batch·h·w` positions) per parallel task.
const ROWS_PER_TASK: usize = 128;

/// The statistics of one call: per-channel mean and biased variance.
#[derive(Clone, Debug)]
pub struct BatchStats {
    /// Per-channel mean.
    pub mean: Vec<f32>,
    /// Per-channel biased variance (divided by the row count).
    pub var: Vec<f32>,
    /// Rows (`batch · h · w`) the statistics were taken over.
    pub rows: usize,
}

/// The activation after the normalisation: none, or `min(max(y, 0), max)`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum ClampAct {
    /// `y` unchanged.
    Identity,
    /// `min(max(y, 0), max)`: ReLU with `f32::INFINITY`, ReLU6 with 6.
    Clamp(f32),
}

impl ClampAct {
    #[inline(always)]
    fn apply(self, y: f32) -> f32 {
        match self {
            Self::Identity => y,
            Self::Clamp(max) => y.max(0.0).min(max),
        }
    }

    /// The open interval of outputs through which the gradient passes. Loops multiply by the
    /// 0/1 mask instead of branching: that keeps them vectorised (about 5× faster).
    fn pass_range(self) -> (f32, f32) {
        match self {
            Self::Identity => (f32::NEG_INFINITY, f32::INFINITY),
            Self::Clamp(max) => (0.0, max),
        }
    }
}

/// Per-channel sums over the rows of a `rows × c` buffer, in parallel: each task accumulates
/// `f(rows_of_task, acc)` in f32 over at most [`ROWS_PER_TASK`] rows, tasks are summed in f64.
fn channel_sums<const K: usize>(
    rows: usize,
    c: usize,
    f: impl Fn(std::ops::Range<usize>, &mut [Vec<f32>; K]) + Sync,
) -> [Vec<f64>; K] {
    (0..rows.div_ceil(ROWS_PER_TASK))
        .into_par_iter()
        .fold(
            || std::array::from_fn(|_| vec![0f64; c]),
            |mut total: [Vec<f64>; K], task| {
                let mut acc: [Vec<f32>; K] = std::array::from_fn(|_| vec![0f32; c]);
                f(
                    task * ROWS_PER_TASK..((task + 1) * ROWS_PER_TASK).min(rows),
                    &mut acc,
                );
                for (t, a) in total.iter_mut().zip(&acc) {
                    t.iter_mut().zip(a).for_each(|(t, a)| *t += *a as f64);
                }
                total
            },
        )
        .reduce(
            || std::array::from_fn(|_| vec![0f64; c]),
            |mut a, b| {
                for (a, b) in a.iter_mut().zip(&b) {
                    a.iter_mut().zip(b).for_each(|(a, b)| *a += b);
                }
                a
            },
        )
}

fn stats_of(x: &[f32], c: usize) -> BatchStats {
    let rows = x.len() / c.max(1);
    let n = rows.max(1) as f64;
    let [sums] = channel_sums::<1>(rows, c, |range, [acc]| {
        for row in x[range.start * c..range.end * c].chunks_exact(c) {
            acc.iter_mut().zip(row).for_each(|(a, v)| *a += v);
        }
    });
    let mean: Vec<f32> = sums.iter().map(|s| (s / n) as f32).collect();
    let [sq] = channel_sums::<1>(rows, c, |range, [acc]| {
        for row in x[range.start * c..range.end * c].chunks_exact(c) {
            for ((a, v), m) in acc.iter_mut().zip(row).zip(&mean) {
                let d = v - m;
                *a += d * d;
            }
        }
    });
    BatchStats {
        mean,
        var: sq.iter().map(|s| (s / n) as f32).collect(),
        rows,
    }
}

/// `out = act(x·scale + shift)` per channel, in parallel over row blocks.
fn affine_rows(
    x: &[f32],
    scale: &[f32],
    shift: &[f32],
    act: ClampAct,
) -> candle_core::Result<Vec<f32>> {
    let c = scale.len();
    if c == 0 || !x.len().is_multiple_of(c) || shift.len() != c {
        candle_core::bail!("batch-norm: {c} channels do not fit {} values", x.len())
    }
    // SAFETY: the blocks and their rows of `c` tile the buffer exactly (checked above), and
    // every element is written once from `x`, never read.
    Ok(unsafe {
        written_f32(x.len(), |y| {
            y.par_chunks_mut(c * ROWS_PER_TASK)
                .zip(x.par_chunks(c * ROWS_PER_TASK))
                .for_each(|(y, x)| {
                    for (yr, xr) in y.chunks_exact_mut(c).zip(x.chunks_exact(c)) {
                        for (((y, x), s), t) in yr.iter_mut().zip(xr).zip(scale).zip(shift) {
                            *y = act.apply(x * s + t);
                        }
                    }
                })
        })
    })
}

struct BatchNormTrain {
    eps: f64,
    act: ClampAct,
    grads: (bool, bool),
    /// Written by the forward; read by the caller and by the backward.
    stats: Arc<Mutex<Option<BatchStats>>>,
}

impl BatchNormTrain {
    fn inv_std(&self, s: &BatchStats) -> Vec<f32> {
        s.var
            .iter()
            .map(|v| 1.0 / (*v as f64 + self.eps).sqrt() as f32)
            .collect()
    }
}

impl CustomOp3 for BatchNormTrain {
    fn name(&self) -> &'static str {
        "batch-norm-train"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        x_l: &Layout,
        ws: &CpuStorage,
        w_l: &Layout,
        bs: &CpuStorage,
        b_l: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(xs, x_l, "batch-norm")?;
        let w = contiguous_f32(ws, w_l, "batch-norm")?;
        let b = contiguous_f32(bs, b_l, "batch-norm")?;
        let c = w.len();
        if c == 0 || !x.len().is_multiple_of(c) || b.len() != c {
            candle_core::bail!("batch-norm: {c} channels do not fit input {:?}", x_l.dims())
        }
        let stats = stats_of(x, c);
        let inv = self.inv_std(&stats);
        let scale: Vec<f32> = inv.iter().zip(w).map(|(i, w)| i * w).collect();
        let shift: Vec<f32> = stats
            .mean
            .iter()
            .zip(&scale)
            .zip(b)
            .map(|((m, s), b)| b - m * s)
            .collect();
        let y = affine_rows(x, &scale, &shift, self.act)?;
        *self.stats.lock().unwrap_or_else(|e| e.into_inner()) = Some(stats);
        Ok((CpuStorage::F32(y), x_l.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let Some(stats) = self.stats.lock().unwrap_or_else(|e| e.into_inner()).clone() else {
            candle_core::bail!("batch-norm: backward before forward")
        };
        let c = w.elem_count();
        let len = x.elem_count();
        if c == 0 || len != c * stats.rows || res.elem_count() != len || grad.elem_count() != len {
            candle_core::bail!(
                "batch-norm backward: input {:?}, output {:?} and gradient {:?} do not match {c} channels",
                x.dims(),
                res.dims(),
                grad.dims()
            )
        }
        // The input needs no gradient where nothing before it is trained (the stem's BatchNorm).
        let track_x = x.track_op();
        let wv = w.to_vec1::<f32>()?;
        let inv = self.inv_std(&stats);
        let (rows, n) = (stats.rows, stats.rows.max(1) as f64);
        let ((lo, hi), mean) = (self.act.pass_range(), &stats.mean);
        let (dx, sum_g, sum_gx) =
            with_f32(x, |xv| {
                with_f32(res, |yv| {
                    with_f32(grad, |gv| {
                        // Σ g' and Σ g'·x̂ per channel, g' = g where the activation passes.
                        let [sum_g, sum_gx] = channel_sums::<2>(rows, c, |range, [sg, sgx]| {
                            let span = range.start * c..range.end * c;
                            for ((xr, yr), gr) in xv[span.clone()]
                                .chunks_exact(c)
                                .zip(yv[span.clone()].chunks_exact(c))
                                .zip(gv[span].chunks_exact(c))
                            {
                                let channels =
                                    xr.iter().zip(yr).zip(gr).zip(mean.iter()).zip(inv.iter());
                                for (((((x, y), g), m), i), (sg, sgx)) in
                                    channels.zip(sg.iter_mut().zip(sgx.iter_mut()))
                                {
                                    let g = *g * ((*y > lo) & (*y < hi)) as u8 as f32;
                                    *sg += g;
                                    *sgx += g * (x - m) * i;
                                }
                            }
                        });
                        // dx = w·inv·(g' − Σg'/n − x̂·Σg'x̂/n)
                        let k: Vec<f32> = wv.iter().zip(&inv).map(|(w, i)| w * i).collect();
                        let mg: Vec<f32> = sum_g.iter().map(|s| (s / n) as f32).collect();
                        let mgx: Vec<f32> = sum_gx.iter().map(|s| (s / n) as f32).collect();
                        let block = c * ROWS_PER_TASK;
                        let fill =
                            |dx: &mut [f32]| {
                                dx.par_chunks_mut(block)
                                    .zip(xv.par_chunks(block))
                                    .zip(yv.par_chunks(block).zip(gv.par_chunks(block)))
                                    .for_each(|((dx, x), (y, g))| {
                                        for (((dr, xr), yr), gr) in dx
                                            .chunks_exact_mut(c)
                                            .zip(x.chunks_exact(c))
                                            .zip(y.chunks_exact(c))
                                            .zip(g.chunks_exact(c))
                                        {
                                            let coef = k
                                                .iter()
                                                .zip(&mg)
                                                .zip(&mgx)
                                                .zip(mean.iter())
                                                .zip(inv.iter());
                                            for (((d, x), y), g) in
                                                dr.iter_mut().zip(xr).zip(yr).zip(gr).zip(coef).map(
                                                    |((((d, x), y), g), c)| (((d, x), y), (g, c)),
                                                )
                                            {
                                                let (g, ((((k, mg), mgx), m), i)) = g;
                                                let g = *g * ((*y > lo) & (*y < hi)) as u8 as f32;
                                                *d = k * (g - mg - (x - m) * i * mgx);
                                            }
                                        }
                                    })
                            };
                        // SAFETY: x, y and g have the same length, a multiple of c (checked before),
                        // so the blocks and rows tile dx exactly; each element is written, never read.
                        let dx = track_x.then(|| unsafe { written_f32(xv.len(), fill) });
                        (dx, sum_g, sum_gx)
                    })
                })
            })???;
        let dev = x.device();
        let dx = dx
            .map(|dx| Tensor::from_vec(dx, x.shape(), dev))
            .transpose()?;
        let to_t =
            |v: &[f64]| Tensor::from_vec(v.iter().map(|s| *s as f32).collect::<Vec<_>>(), c, dev);
        let dw = if self.grads.0 {
            Some(to_t(&sum_gx)?)
        } else {
            None
        };
        let db = if self.grads.1 {
            Some(to_t(&sum_g)?)
        } else {
            None
        };
        Ok((dx, dw, db))
    }
}

fn fused(x: &Tensor) -> bool {
    x.device().is_cpu() && x.dtype() == candle_core::DType::F32
}

/// Batch normalisation of `x` (`(..., c)`, channels last) with the statistics of this batch,
/// then `act`: `act((x − μ)/√(σ² + ε)·w + b)`. Returns the output and the statistics (for the
/// running averages). Differentiable in `x`, and in `w`/`b` where they are trainable variables.
/// f32 on the CPU runs the fused op, anything else [`batch_norm_train_reference`].
pub fn batch_norm_train(
    x: &Tensor,
    w: &Tensor,
    b: &Tensor,
    eps: f64,
    act: ClampAct,
) -> candle_core::Result<(Tensor, BatchStats)> {
    if !fused(x) {
        return batch_norm_train_reference(x, w, b, eps, act);
    }
    let stats = Arc::new(Mutex::new(None));
    let op = BatchNormTrain {
        eps,
        act,
        grads: (w.is_variable(), b.is_variable()),
        stats: stats.clone(),
    };
    let y = x.contiguous()?.apply_op3_arc(
        &w.to_dtype(x.dtype())?,
        &b.to_dtype(x.dtype())?,
        Arc::new(Box::new(op)),
    )?;
    let stats = stats.lock().unwrap_or_else(|e| e.into_inner()).clone();
    match stats {
        Some(s) => Ok((y, s)),
        None => candle_core::bail!("batch-norm: the op computed no statistics"),
    }
}

fn clamp_reference(y: Tensor, act: ClampAct) -> candle_core::Result<Tensor> {
    match act {
        ClampAct::Identity => Ok(y),
        ClampAct::Clamp(max) if max.is_finite() => y.clamp(0f32, max),
        ClampAct::Clamp(_) => y.relu(),
    }
}

/// The same function as [`batch_norm_train`] from plain candle ops.
pub fn batch_norm_train_reference(
    x: &Tensor,
    w: &Tensor,
    b: &Tensor,
    eps: f64,
    act: ClampAct,
) -> candle_core::Result<(Tensor, BatchStats)> {
    let c = w.elem_count();
    let rows = x.elem_count() / c.max(1);
    let x2 = x.reshape((rows, c))?;
    let mean = x2.mean_keepdim(0)?;
    let centered = x2.broadcast_sub(&mean)?;
    let var = centered.sqr()?.mean_keepdim(0)?;
    let scale =
        (var.affine(1.0, eps)?.sqrt()?.recip()? * w.to_dtype(x.dtype())?.reshape((1, c))?)?;
    let y = centered
        .broadcast_mul(&scale)?
        .broadcast_add(&b.to_dtype(x.dtype())?.reshape((1, c))?)?;
    let f = |t: &Tensor| {
        t.flatten_all()?
            .to_dtype(candle_core::DType::F32)?
            .to_vec1::<f32>()
    };
    let stats = BatchStats {
        mean: f(&mean)?,
        var: f(&var)?,
        rows,
    };
    Ok((clamp_reference(y.reshape(x.shape())?, act)?, stats))
}

struct AffineAct {
    scale: Vec<f32>,
    shift: Vec<f32>,
    act: ClampAct,
}

impl CustomOp1 for AffineAct {
    fn name(&self) -> &'static str {
        "affine-activation"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(s, l, "affine-activation")?;
        let y = affine_rows(x, &self.scale, &self.shift, self.act)?;
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let (c, (lo, hi), scale) = (self.scale.len(), self.act.pass_range(), &self.scale);
        let len = res.elem_count();
        if c == 0 || !len.is_multiple_of(c) || grad.elem_count() != len {
            candle_core::bail!(
                "affine-activation backward: output {:?} and gradient {:?} do not match {c} channels",
                res.dims(),
                grad.dims()
            )
        }
        let dx = with_f32(res, |yv| {
            with_f32(grad, |gv| {
                let block = c * ROWS_PER_TASK;
                let fill = |dx: &mut [f32]| {
                    dx.par_chunks_mut(block)
                        .zip(yv.par_chunks(block).zip(gv.par_chunks(block)))
                        .for_each(|(dx, (y, g))| {
                            for ((dr, yr), gr) in dx
                                .chunks_exact_mut(c)
                                .zip(y.chunks_exact(c))
                                .zip(g.chunks_exact(c))
                            {
                                for (((d, y), g), s) in dr.iter_mut().zip(yr).zip(gr).zip(scale) {
                                    *d = g * s * ((*y > lo) & (*y < hi)) as u8 as f32;
                                }
                            }
                        })
                };
                // SAFETY: y and g have the same length, a multiple of c (checked above), so the
                // blocks and rows tile dx exactly; each element is written once, never read.
                unsafe { written_f32(yv.len(), fill) }
            })
        })??;
        Ok(Some(Tensor::from_vec(dx, res.shape(), res.device())?))
    }
}

/// `act(x·scale + shift)` per channel of channels-last `x`, differentiable in `x` only
/// (`scale` and `shift` are constants: BatchNorm with frozen statistics and parameters).
pub fn affine_act(
    x: &Tensor,
    scale: &Tensor,
    shift: &Tensor,
    act: ClampAct,
) -> candle_core::Result<Tensor> {
    let dt = x.dtype();
    if !fused(x) {
        let y = x
            .broadcast_mul(&scale.to_dtype(dt)?)?
            .broadcast_add(&shift.to_dtype(dt)?)?;
        return clamp_reference(y, act);
    }
    let op = AffineAct {
        scale: scale.to_dtype(dt)?.to_vec1()?,
        shift: shift.to_dtype(dt)?.to_vec1()?,
        act,
    };
    x.contiguous()?.apply_op1_arc(Arc::new(Box::new(op)))
}
