//! Training-mode batch normalisation over channels-last activations as one op: the batch
//! statistics, the normalisation and the affine map forward; the exact backward through the
//! statistics (as PyTorch's `BatchNorm2d.train()`), with gain/shift gradients only when they are
//! trainable. [`batch_norm_train_reference`] computes the same from plain candle ops.

use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::contiguous_f32;

/// Rows per parallel task when reducing over `rows × channels`.
const ROWS_PER_TASK: usize = 256;

/// The statistics of one call: per-channel mean and biased variance, f64-accumulated.
#[derive(Clone, Debug)]
pub struct BatchStats {
    /// Per-channel mean.
    pub mean: Vec<f32>,
    /// Per-channel biased variance (divided by the row count).
    pub var: Vec<f32>,
    /// Rows (`batch · h · w`) the statistics were taken over.
    pub rows: usize,
}

struct BatchNormTrain {
    eps: f64,
    grads: (bool, bool),
    /// Written by the forward; read by the caller and by the backward.
    stats: Arc<Mutex<Option<BatchStats>>>,
}

/// Per-channel sums of `f(row)` over the rows of a `rows × c` buffer, in parallel.
fn channel_sums(rows: usize, c: usize, f: impl Fn(usize, &mut [f64]) + Sync) -> Vec<f64> {
    (0..rows.div_ceil(ROWS_PER_TASK))
        .into_par_iter()
        .fold(
            || vec![0f64; c],
            |mut acc, task| {
                for row in task * ROWS_PER_TASK..((task + 1) * ROWS_PER_TASK).min(rows) {
                    f(row, &mut acc);
                }
                acc
            },
        )
        .reduce(
            || vec![0f64; c],
            |mut a, b| {
                a.iter_mut().zip(&b).for_each(|(a, b)| *a += b);
                a
            },
        )
}

fn stats_of(x: &[f32], c: usize) -> BatchStats {
    let rows = x.len() / c.max(1);
    let sums = channel_sums(rows, c, |r, acc| {
        for (a, v) in acc.iter_mut().zip(&x[r * c..(r + 1) * c]) {
            *a += *v as f64;
        }
    });
    let mean: Vec<f64> = sums.iter().map(|s| s / rows.max(1) as f64).collect();
    let sq = channel_sums(rows, c, |r, acc| {
        for ((a, v), m) in acc.iter_mut().zip(&x[r * c..(r + 1) * c]).zip(&mean) {
            let d = *v as f64 - m;
            *a += d * d;
        }
    });
    BatchStats {
        mean: mean.iter().map(|m| *m as f32).collect(),
        var: sq.iter().map(|s| (s / rows.max(1) as f64) as f32).collect(),
        rows,
    }
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
        if c == 0 || x.len() % c != 0 || b.len() != c {
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
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(c * ROWS_PER_TASK)
            .zip(x.par_chunks(c * ROWS_PER_TASK))
            .for_each(|(y, x)| {
                for (yr, xr) in y.chunks_exact_mut(c).zip(x.chunks_exact(c)) {
                    for (((y, x), s), t) in yr.iter_mut().zip(xr).zip(&scale).zip(&shift) {
                        *y = x * s + t;
                    }
                }
            });
        *self.stats.lock().unwrap_or_else(|e| e.into_inner()) = Some(stats);
        Ok((CpuStorage::F32(y), x_l.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let Some(stats) = self.stats.lock().unwrap_or_else(|e| e.into_inner()).clone() else {
            candle_core::bail!("batch-norm: backward before forward")
        };
        let c = w.elem_count();
        let xv = x.flatten_all()?.to_vec1::<f32>()?;
        let gv = grad.flatten_all()?.to_vec1::<f32>()?;
        let wv = w.to_vec1::<f32>()?;
        let inv = self.inv_std(&stats);
        let rows = stats.rows;
        // Σ g and Σ g·x̂ per channel.
        let sum_g = channel_sums(rows, c, |r, acc| {
            for (a, g) in acc.iter_mut().zip(&gv[r * c..(r + 1) * c]) {
                *a += *g as f64;
            }
        });
        let sum_gx = channel_sums(rows, c, |r, acc| {
            let (xr, gr) = (&xv[r * c..(r + 1) * c], &gv[r * c..(r + 1) * c]);
            for ch in 0..c {
                acc[ch] += gr[ch] as f64 * ((xr[ch] - stats.mean[ch]) * inv[ch]) as f64;
            }
        });
        let n = rows as f64;
        // dx = w·inv·(g − Σg/n − x̂·Σgx̂/n)
        let k: Vec<f32> = wv.iter().zip(&inv).map(|(w, i)| w * i).collect();
        let mg: Vec<f32> = sum_g.iter().map(|s| (s / n) as f32).collect();
        let mgx: Vec<f32> = sum_gx.iter().map(|s| (s / n) as f32).collect();
        let mut dx = vec![0f32; xv.len()];
        dx.par_chunks_mut(c * ROWS_PER_TASK)
            .zip(
                xv.par_chunks(c * ROWS_PER_TASK)
                    .zip(gv.par_chunks(c * ROWS_PER_TASK)),
            )
            .for_each(|(dx, (x, g))| {
                for ((dr, xr), gr) in dx
                    .chunks_exact_mut(c)
                    .zip(x.chunks_exact(c))
                    .zip(g.chunks_exact(c))
                {
                    for ch in 0..c {
                        let xhat = (xr[ch] - stats.mean[ch]) * inv[ch];
                        dr[ch] = k[ch] * (gr[ch] - mg[ch] - xhat * mgx[ch]);
                    }
                }
            });
        let dev = x.device();
        let dx = Tensor::from_vec(dx, x.shape(), dev)?;
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
        Ok((Some(dx), dw, db))
    }
}

/// Batch normalisation of `x` (`(..., c)`, channels last) with the statistics of this batch,
/// `y = (x − μ)/√(σ² + ε)·w + b`; returns `y` and the statistics (for the running averages).
/// Differentiable in `x`, and in `w`/`b` where they are trainable variables. f32 on the CPU runs
/// the fused op, anything else [`batch_norm_train_reference`].
pub fn batch_norm_train(
    x: &Tensor,
    w: &Tensor,
    b: &Tensor,
    eps: f64,
) -> candle_core::Result<(Tensor, BatchStats)> {
    if !(x.device().is_cpu() && x.dtype() == candle_core::DType::F32) {
        return batch_norm_train_reference(x, w, b, eps);
    }
    let stats = Arc::new(Mutex::new(None));
    let op = BatchNormTrain {
        eps,
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

/// The same function from plain candle ops.
pub fn batch_norm_train_reference(
    x: &Tensor,
    w: &Tensor,
    b: &Tensor,
    eps: f64,
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
    Ok((y.reshape(x.shape())?, stats))
}
