//! LayerNorm over the last dimension as custom ops whose backward works from the saved input in
//! one pass over the rows: with a frozen affine (`gamma`, `beta`) it gives `dx` alone, with a
//! trainable one also `dγ = Σ dy·x̂` and `dβ = Σ dy`. Elsewhere (f64, half types on the CPU)
//! [`layer_norm`] falls back to composite candle ops, which give every gradient.

use super::{contiguous_f32, written_f32};
use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Shape, Tensor, D};
use rayon::prelude::*;

/// Rows per parallel task of the CPU loops.
const ROWS_PER_TASK: usize = 64;

struct FrozenLayerNorm {
    gamma: Tensor,
    beta: Tensor,
    eps: f32,
}

/// The f32 values of a small frozen vector (gamma or beta) for the CPU loops.
fn host_f32(t: &Tensor) -> candle_core::Result<Vec<f32>> {
    t.to_dtype(candle_core::DType::F32)?.to_vec1()
}

/// Mean and reciprocal standard deviation of one row.
fn row_stats(row: &[f32], eps: f32) -> (f32, f32) {
    let n = row.len() as f32;
    let mean = row.iter().sum::<f32>() / n;
    let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / n;
    (mean, 1.0 / (var + eps).sqrt())
}

/// `(x − mean)·rstd·γ + β` for every row of `x`.
fn normalize_rows(
    x: &[f32],
    gamma: &[f32],
    beta: &[f32],
    eps: f32,
) -> candle_core::Result<Vec<f32>> {
    let h = gamma.len();
    if h == 0 || !x.len().is_multiple_of(h) || beta.len() != h {
        candle_core::bail!("layer norm: {h} features do not fit {} values", x.len())
    }
    // SAFETY: the blocks and rows of h tile the buffer exactly (checked above); each element
    // is written once, never read.
    Ok(unsafe {
        written_f32(x.len(), |out| {
            x.par_chunks(ROWS_PER_TASK * h)
                .zip(out.par_chunks_mut(ROWS_PER_TASK * h))
                .for_each(|(rows, outs)| {
                    for (row, o) in rows.chunks_exact(h).zip(outs.chunks_exact_mut(h)) {
                        let (mean, rstd) = row_stats(row, eps);
                        for i in 0..h {
                            o[i] = (row[i] - mean) * rstd * gamma[i] + beta[i];
                        }
                    }
                })
        })
    })
}

/// `dx = rstd · (g' − mean(g') − x̂ · mean(g'·x̂))` with `g' = dy·γ`, for every row.
fn input_grad_rows(x: &[f32], g: &[f32], gamma: &[f32], eps: f32) -> candle_core::Result<Vec<f32>> {
    let h = gamma.len();
    if h == 0 || !x.len().is_multiple_of(h) || g.len() != x.len() {
        candle_core::bail!(
            "layer norm backward: {h} features, {} inputs, {} gradients",
            x.len(),
            g.len()
        )
    }
    let fill = |dx: &mut [f32]| {
        x.par_chunks(ROWS_PER_TASK * h)
            .zip(g.par_chunks(ROWS_PER_TASK * h))
            .zip(dx.par_chunks_mut(ROWS_PER_TASK * h))
            .for_each(|((rows, grads), drows)| {
                let mut gg = vec![0f32; h];
                for ((row, grow), drow) in rows
                    .chunks_exact(h)
                    .zip(grads.chunks_exact(h))
                    .zip(drows.chunks_exact_mut(h))
                {
                    let (mean, rstd) = row_stats(row, eps);
                    let (mut sum_gg, mut sum_gg_xhat) = (0f32, 0f32);
                    for i in 0..h {
                        gg[i] = grow[i] * gamma[i];
                        sum_gg += gg[i];
                        sum_gg_xhat += gg[i] * (row[i] - mean) * rstd;
                    }
                    let (mean_gg, mean_gg_xhat) = (sum_gg / h as f32, sum_gg_xhat / h as f32);
                    for i in 0..h {
                        let xhat = (row[i] - mean) * rstd;
                        drow[i] = rstd * (gg[i] - mean_gg - xhat * mean_gg_xhat);
                    }
                }
            })
    };
    // SAFETY: x, g and dx have one length, a multiple of h (checked above), so the blocks and
    // rows tile dx exactly; each element is written once, never read.
    Ok(unsafe { written_f32(x.len(), fill) })
}

/// `(dγ, dβ) = (Σ dy·x̂, Σ dy)` over the rows, `h` features each.
fn affine_grads(x: &[f32], g: &[f32], h: usize, eps: f32) -> (Vec<f32>, Vec<f32>) {
    let zero = || (vec![0f32; h], vec![0f32; h]);
    x.par_chunks(ROWS_PER_TASK * h)
        .zip(g.par_chunks(ROWS_PER_TASK * h))
        .fold(zero, |(mut dgamma, mut dbeta), (rows, grads)| {
            for (row, grow) in rows.chunks_exact(h).zip(grads.chunks_exact(h)) {
                let (mean, rstd) = row_stats(row, eps);
                for i in 0..h {
                    dgamma[i] += grow[i] * (row[i] - mean) * rstd;
                    dbeta[i] += grow[i];
                }
            }
            (dgamma, dbeta)
        })
        .reduce(zero, |(mut ga, mut ba), (gb, bb)| {
            ga.iter_mut().zip(&gb).for_each(|(a, b)| *a += b);
            ba.iter_mut().zip(&bb).for_each(|(a, b)| *a += b);
            (ga, ba)
        })
}

impl CustomOp1 for FrozenLayerNorm {
    fn name(&self) -> &'static str {
        "frozen-layer-norm"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(s, l, self.name())?;
        let (gamma, beta) = (host_f32(&self.gamma)?, host_f32(&self.beta)?);
        let out = normalize_rows(x, &gamma, &beta, self.eps)?;
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        super::cuda_ops::layer_norm_fwd(s, l, &self.gamma, &self.beta, self.eps)
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let dx = x.apply_op2_no_bwd(
            &grad.contiguous()?,
            &FrozenLayerNormBackward {
                gamma: self.gamma.clone(),
                eps: self.eps,
            },
        )?;
        Ok(Some(dx))
    }
}

/// `dx = rstd · (g' − mean(g') − x̂ · mean(g'·x̂))` with `g' = dy·γ`.
struct FrozenLayerNormBackward {
    gamma: Tensor,
    eps: f32,
}

impl CustomOp2 for FrozenLayerNormBackward {
    fn name(&self) -> &'static str {
        "frozen-layer-norm-backward"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(xs, xl, self.name())?;
        let g = contiguous_f32(gs, gl, self.name())?;
        let gamma = host_f32(&self.gamma)?;
        let dx = input_grad_rows(x, g, &gamma, self.eps)?;
        Ok((CpuStorage::F32(dx), xl.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        xs: &candle_core::CudaStorage,
        xl: &Layout,
        gs: &candle_core::CudaStorage,
        gl: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        super::cuda_ops::layer_norm_bwd(xs, xl, gs, gl, &self.gamma, self.eps)
    }
}

/// LayerNorm with a trainable affine on the CPU (f32): arguments `(x, γ, β)`.
struct TrainableLayerNorm {
    eps: f32,
}

impl CustomOp3 for TrainableLayerNorm {
    fn name(&self) -> &'static str {
        "layer-norm"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(xs, xl, self.name())?;
        let gamma = contiguous_f32(gs, gl, self.name())?;
        let beta = contiguous_f32(bs, bl, self.name())?;
        let out = normalize_rows(x, gamma, beta, self.eps)?;
        Ok((CpuStorage::F32(out), xl.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        _beta: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let h = gamma.elem_count();
        let grad = grad.contiguous()?;
        let dx = x.apply_op2_no_bwd(
            &grad,
            &FrozenLayerNormBackward {
                gamma: gamma.detach(),
                eps: self.eps,
            },
        )?;
        let (dgamma, dbeta) = {
            let (x_storage, x_l) = x.storage_and_layout();
            let (g_storage, g_l) = grad.storage_and_layout();
            let xs = super::cpu_f32(&x_storage, x_l, self.name())?;
            let gs = super::cpu_f32(&g_storage, g_l, self.name())?;
            affine_grads(xs, gs, h, self.eps)
        };
        let dgamma = Tensor::from_vec(dgamma, gamma.shape(), x.device())?;
        let dbeta = Tensor::from_vec(dbeta, gamma.shape(), x.device())?;
        Ok((Some(dx), Some(dgamma), Some(dbeta)))
    }
}

/// Composite LayerNorm: differentiable in `x`, `gamma` and `beta`.
fn layer_norm_composite(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    eps: f64,
) -> candle_core::Result<Tensor> {
    let dtype = x.dtype();
    // Half types are normalised in f32; f32 and f64 in their own precision.
    let work = match dtype {
        candle_core::DType::F16 | candle_core::DType::BF16 => candle_core::DType::F32,
        d => d,
    };
    let x = x.to_dtype(work)?;
    let mean = x.mean_keepdim(D::Minus1)?;
    let centered = x.broadcast_sub(&mean)?;
    let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = centered
        .broadcast_div(&(var + eps)?.sqrt()?)?
        .to_dtype(dtype)?;
    normed
        .broadcast_mul(&gamma.to_dtype(dtype)?)?
        .broadcast_add(&beta.to_dtype(dtype)?)
}

/// LayerNorm over the last dimension. When neither `gamma` nor `beta` is trainable and the input
/// is f32 on the CPU, or f32/bf16 on CUDA, a fused op runs that computes no gradient for them
/// (statistics in f32 whatever the input dtype). With a trainable affine, a fused op gives all
/// three gradients for f32 on the CPU; elsewhere composite candle ops do.
pub fn layer_norm(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    eps: f64,
) -> candle_core::Result<Tensor> {
    let frozen = !gamma.is_variable() && !beta.is_variable();
    if frozen && super::fused_kernels(x) {
        let op = FrozenLayerNorm {
            gamma: gamma.to_dtype(x.dtype())?.contiguous()?.detach(),
            beta: beta.to_dtype(x.dtype())?.contiguous()?.detach(),
            eps: eps as f32,
        };
        x.contiguous()?.apply_op1(op)
    } else if x.device().is_cpu()
        && [x.dtype(), gamma.dtype(), beta.dtype()] == [candle_core::DType::F32; 3]
        && gamma.dims() == [*x.dims().last().unwrap_or(&0)]
        && beta.dims() == gamma.dims()
    {
        let op = TrainableLayerNorm { eps: eps as f32 };
        x.contiguous()?
            .apply_op3(&gamma.contiguous()?, &beta.contiguous()?, op)
    } else {
        layer_norm_composite(x, gamma, beta, eps)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn fused_matches_composite_forward_and_input_gradient() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let x = Var::randn(0.5f32, 2., (3, 4, 16), &dev)?;
        let gamma = Tensor::randn(1f32, 0.3, 16, &dev)?;
        let beta = Tensor::randn(0f32, 0.3, 16, &dev)?;
        let w = Tensor::randn(0f32, 1., (3, 4, 16), &dev)?;
        let fused = layer_norm(x.as_tensor(), &gamma, &beta, 1e-12)?;
        let reference = layer_norm_composite(x.as_tensor(), &gamma, &beta, 1e-12)?;
        let diff = (&fused - &reference)?
            .abs()?
            .max_all()?
            .to_scalar::<f32>()?;
        assert!(diff < 1e-5, "forward differs by {diff}");
        let g1 = (fused * &w)?.sum_all()?.backward()?;
        let g2 = (reference * &w)?.sum_all()?.backward()?;
        let d = (g1.get(x.as_tensor()).unwrap() - g2.get(x.as_tensor()).unwrap())?;
        let diff = d.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-4, "input gradient differs by {diff}");
        assert!(g1.get(&gamma).is_none() && g1.get(&beta).is_none());
        Ok(())
    }

    /// The trainable op's output and its gradients in `x`, `γ` and `β` against the composite.
    #[test]
    fn trainable_affine_matches_composite() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let x = Var::randn(0.5f32, 2., (3, 70, 24), &dev)?;
        let gamma = Var::randn(1f32, 0.3, 24, &dev)?;
        let beta = Var::randn(0f32, 0.3, 24, &dev)?;
        let w = Tensor::randn(0f32, 1., (3, 70, 24), &dev)?;
        let fused = layer_norm(x.as_tensor(), gamma.as_tensor(), beta.as_tensor(), 1e-12)?;
        let reference =
            layer_norm_composite(x.as_tensor(), gamma.as_tensor(), beta.as_tensor(), 1e-12)?;
        assert!(super::super::max_abs_diff(&fused, &reference) < 1e-5);
        let g1 = (fused * &w)?.sum_all()?.backward()?;
        let g2 = (reference * &w)?.sum_all()?.backward()?;
        for (v, bound) in [(&x, 1e-4), (&gamma, 1e-4), (&beta, 1e-4)] {
            let got = g1.get(v.as_tensor()).expect("a gradient from the fused op");
            let want = g2
                .get(v.as_tensor())
                .expect("a gradient from the composite");
            let diff = super::super::max_abs_diff(got, want);
            assert!(diff < bound, "gradient differs by {diff}");
        }
        Ok(())
    }

    #[test]
    fn composite_gradient_matches_finite_differences() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let x0: Vec<f64> = (0..10).map(|i| (i as f64 * 0.71).cos() * 2.0).collect();
        let gamma = Var::new(&[0.5f64, 1.5, -0.3, 0.8, 1.0], &dev)?;
        let beta = Tensor::new(&[0.1f64, 0.0, -0.2, 0.3, 0.0], &dev)?;
        let w = Tensor::new(
            &[[1.0f64, -2.0, 0.5, 0.3, 2.2], [0.7, 0.1, -1.1, 1.9, -0.4]],
            &dev,
        )?;
        let f = |x: &Tensor| {
            layer_norm(x, gamma.as_tensor(), &beta, 1e-5)?
                .mul(&w)?
                .sum_all()
        };
        let x = Var::from_tensor(&Tensor::from_vec(x0.clone(), (2, 5), &dev)?)?;
        let grads = f(x.as_tensor())?.backward()?;
        let analytic: Vec<f64> = grads.get(x.as_tensor()).unwrap().flatten_all()?.to_vec1()?;
        for i in 0..x0.len() {
            let (mut p, mut m) = (x0.clone(), x0.clone());
            p[i] += 1e-6;
            m[i] -= 1e-6;
            let fp = f(&Tensor::from_vec(p, (2, 5), &dev)?)?.to_scalar::<f64>()?;
            let fm = f(&Tensor::from_vec(m, (2, 5), &dev)?)?.to_scalar::<f64>()?;
            let numeric = (fp - fm) / 2e-6;
            assert!(
                (numeric - analytic[i]).abs() < 1e-6,
                "x[{i}]: {numeric} vs {}",
                analytic[i]
            );
        }
        assert!(
            grads.get(gamma.as_tensor()).is_some(),
            "trainable gamma gets a gradient"
        );
        Ok(())
    }
}
