//! `y = x·Wᵀ + b` with `W` (and `b`) trained: one autograd node whose backward gives `dx`, `dW`
//! and `db` straight from the output gradient.
//!
//! Built from candle's ops the same layer is a reshape, a transpose, a matmul and a broadcast
//! add, and its backward pays for each: the bias gradient through candle's strided `sum` over
//! rows, the weight gradient as a transposed `xᵀ·g` that is then added into the gradient store
//! through a strided (non-contiguous) binary op, and an activation-sized gradient for the
//! matmul's output on the way. Here `dW = gᵀ·x` is written contiguous by the GEMM (the
//! transpose is a stride, not a copy) and `db` is a row sum in one pass.

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::gemm::{gemm_new, MatRef};

/// Rows per task of the bias-gradient sum.
const BIAS_ROWS_PER_TASK: usize = 256;

/// The op without a bias: arguments `(x, W)`.
struct TrainableLinear;

/// The op with a bias: arguments `(x, W, b)`.
struct TrainableLinearBias;

/// `x·Wᵀ (+ b)` for `x` (`rows × in`, contiguous) on the CPU.
fn cpu_forward(
    x: &CpuStorage,
    x_l: &Layout,
    w: &CpuStorage,
    w_l: &Layout,
    bias: Option<(&CpuStorage, &Layout)>,
    op: &str,
) -> candle_core::Result<(CpuStorage, Shape)> {
    let (_, in_features, x2_l) = super::as_rows(x_l)?;
    let (out_features, w_in) = w_l.shape().dims2()?;
    if w_in != in_features {
        candle_core::bail!("{op}: input has {in_features} features, the weight {w_in}")
    }
    let w = MatRef::new(
        super::contiguous_f32(w, w_l, op)?,
        out_features,
        in_features,
    );
    let bias = bias
        .map(|(b, b_l)| super::contiguous_f32(b, b_l, op))
        .transpose()?;
    // Trained weights stay in f32 whatever the frozen products' precision.
    let out = super::frozen_gemm::product(x, &x2_l, w.t(), bias, false, op)?;
    Ok((out, super::with_last(x_l.shape(), out_features)))
}

/// The column sums of `g` (`rows × cols`): the bias gradient.
fn column_sums(g: &[f32], cols: usize) -> Vec<f32> {
    let add = |mut acc: Vec<f32>, rows: &[f32]| {
        for row in rows.chunks_exact(cols) {
            for (a, v) in acc.iter_mut().zip(row) {
                *a += *v;
            }
        }
        acc
    };
    g.par_chunks(BIAS_ROWS_PER_TASK * cols)
        .fold(|| vec![0f32; cols], add)
        .reduce(
            || vec![0f32; cols],
            |mut a, b| {
                a.iter_mut().zip(&b).for_each(|(a, b)| *a += b);
                a
            },
        )
}

/// `(dx, dW, db)` for the output gradient `grad` of `x·Wᵀ + b`; `db` only `with_bias`, and `dx`
/// only where `x` depends on a trainable tensor (not under a trained head alone, for example).
fn backward(
    x: &Tensor,
    w: &Tensor,
    grad: &Tensor,
    with_bias: bool,
) -> candle_core::Result<(Option<Tensor>, Tensor, Option<Tensor>)> {
    let want_dx = x.track_op();
    let (out_features, in_features) = w.dims2()?;
    let rows = x.elem_count() / in_features.max(1);
    let g = grad.contiguous()?.reshape((rows, out_features))?;
    if !g.device().is_cpu() {
        let x2 = x.reshape((rows, in_features))?;
        let dx = want_dx
            .then(|| g.matmul(w)?.reshape(x.shape()))
            .transpose()?;
        let dw = g.t()?.matmul(&x2)?;
        let db = with_bias.then(|| g.sum(0)).transpose()?;
        return Ok((dx, dw, db));
    }
    let x = x.contiguous()?;
    let w = w.contiguous()?;
    let (g_storage, g_l) = g.storage_and_layout();
    let (x_storage, x_l) = x.storage_and_layout();
    let (w_storage, w_l) = w.storage_and_layout();
    let op = "trainable-linear-backward";
    let gs = super::cpu_f32(&g_storage, g_l, op)?;
    let g2 = MatRef::new(gs, rows, out_features);
    let x2 = MatRef::new(super::cpu_f32(&x_storage, x_l, op)?, rows, in_features);
    let w2 = MatRef::new(
        super::cpu_f32(&w_storage, w_l, op)?,
        out_features,
        in_features,
    );
    let dx = want_dx.then(|| gemm_new(g2, w2, 1.0)).transpose()?;
    let dw = gemm_new(g2.t(), x2, 1.0)?;
    let db = with_bias.then(|| column_sums(gs, out_features));
    let device = x.device();
    let dx = dx
        .map(|dx| Tensor::from_vec(dx, x.shape(), device))
        .transpose()?;
    let dw = Tensor::from_vec(dw, (out_features, in_features), device)?;
    let db = db
        .map(|db| Tensor::from_vec(db, out_features, device))
        .transpose()?;
    Ok((dx, dw, db))
}

impl CustomOp2 for TrainableLinear {
    fn name(&self) -> &'static str {
        "trainable-linear"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_l: &Layout,
        w: &CpuStorage,
        w_l: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        cpu_forward(x, x_l, w, w_l, None, self.name())
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (dx, dw, _) = backward(x, w, grad, false)?;
        Ok((dx, Some(dw)))
    }
}

impl CustomOp3 for TrainableLinearBias {
    fn name(&self) -> &'static str {
        "trainable-linear"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_l: &Layout,
        w: &CpuStorage,
        w_l: &Layout,
        b: &CpuStorage,
        b_l: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        cpu_forward(x, x_l, w, w_l, Some((b, b_l)), self.name())
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dx, dw, db) = backward(x, w, grad, true)?;
        Ok((dx, Some(dw), db))
    }
}

/// `x·Wᵀ + b` for `x` of shape `(..., in)`, `weight` `(out, in)` and `bias` `(out,)`, with the
/// gradients of all three; the reference is [`trainable_linear_reference`].
///
/// One custom op for f32 on the CPU; elsewhere (other dtypes, CUDA) candle's ops.
pub fn trainable_linear(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
) -> candle_core::Result<Tensor> {
    let same_dtype = weight.dtype() == x.dtype() && bias.is_none_or(|b| b.dtype() == x.dtype());
    if !(x.device().is_cpu() && x.dtype() == candle_core::DType::F32 && same_dtype) {
        return trainable_linear_reference(x, weight, bias);
    }
    let x = x.contiguous()?;
    match bias {
        Some(b) => x.apply_op3(weight, b, TrainableLinearBias),
        None => x.apply_op2(weight, TrainableLinear),
    }
}

/// [`trainable_linear`] from candle's ops (matmul and broadcast add), casting the weight and
/// bias to `x`'s dtype (f32 master weights under mixed precision).
pub fn trainable_linear_reference(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
) -> candle_core::Result<Tensor> {
    let dims = x.dims().to_vec();
    let in_features = *dims.last().unwrap_or(&0);
    let x2 = x.reshape((x.elem_count() / in_features.max(1), in_features))?;
    let dtype = x2.dtype();
    let mut y = x2.matmul(&weight.to_dtype(dtype)?.t()?)?;
    if let Some(b) = bias {
        y = y.broadcast_add(&b.to_dtype(dtype)?)?;
    }
    y.reshape(super::with_last(x.shape(), weight.dim(0)?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// Output and all three gradients of the op against candle's ops, on ragged shapes.
    #[test]
    fn matches_candle_ops_with_and_without_bias() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        for &(batch, seq, k, n, with_bias) in &[
            (2, 7, 13, 5, true),
            (1, 1, 1, 1, true),
            (3, 65, 96, 33, false),
            (4, 300, 40, 70, true),
        ] {
            let x = Var::from_tensor(&Tensor::randn(0f32, 1., (batch, seq, k), &dev)?)?;
            let w = Var::from_tensor(&Tensor::randn(0f32, 0.3, (n, k), &dev)?)?;
            let b = Var::from_tensor(&Tensor::randn(0f32, 0.3, n, &dev)?)?;
            let probe = Tensor::randn(0f32, 1., (batch, seq, n), &dev)?;
            let bias = with_bias.then_some(b.as_tensor());
            let run = |f: fn(&Tensor, &Tensor, Option<&Tensor>) -> candle_core::Result<Tensor>| {
                let y = f(x.as_tensor(), w.as_tensor(), bias)?;
                let grads = (&y * &probe)?.sum_all()?.backward()?;
                let grad = |v: &Var| grads.get(v.as_tensor()).cloned();
                candle_core::Result::Ok((y, grad(&x), grad(&w), grad(&b)))
            };
            let (y, dx, dw, db) = run(trainable_linear)?;
            let (y_ref, dx_ref, dw_ref, db_ref) = run(trainable_linear_reference)?;
            // Relative to the largest reference value: the sums run in different orders. dW and
            // db sum over all rows (up to 1200 here), so their rounding bound is looser.
            let close = |got: &Tensor, want: &Tensor| -> candle_core::Result<f32> {
                let scale = want.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
                Ok(super::super::max_abs_diff(got, want) / scale.max(1.0))
            };
            assert!(close(&y, &y_ref)? < 1e-6, "output");
            let pairs = [("dx", dx, dx_ref, 1e-6), ("dW", dw, dw_ref, 1e-5)];
            for (name, got, want, bound) in pairs {
                let (got, want) = (got.expect("gradient"), want.expect("gradient"));
                let err = close(&got, &want)?;
                assert!(err < bound, "{name}: relative error {err}");
            }
            match (db, db_ref) {
                (Some(got), Some(want)) => {
                    let err = close(&got, &want)?;
                    assert!(err < 1e-5, "db: relative error {err}");
                }
                (None, None) => assert!(!with_bias),
                _ => panic!("bias gradient present on one side only"),
            }
        }
        Ok(())
    }

    /// An input that depends on nothing trainable gets no gradient; W and b still do.
    #[test]
    fn untracked_input_gets_no_gradient() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1., (5, 12), &dev)?;
        let w = Var::from_tensor(&Tensor::randn(0f32, 0.3, (7, 12), &dev)?)?;
        let b = Var::from_tensor(&Tensor::randn(0f32, 0.3, 7, &dev)?)?;
        let grads = trainable_linear(&x, w.as_tensor(), Some(b.as_tensor()))?
            .sqr()?
            .sum_all()?
            .backward()?;
        let reference = trainable_linear_reference(&x, w.as_tensor(), Some(b.as_tensor()))?
            .sqr()?
            .sum_all()?
            .backward()?;
        assert!(grads.get(&x).is_none());
        for v in [&w, &b] {
            let (got, want) = (grads.get(v.as_tensor()), reference.get(v.as_tensor()));
            let (got, want) = (got.expect("a gradient"), want.expect("a gradient"));
            assert!(super::super::max_abs_diff(got, want) < 1e-5);
        }
        Ok(())
    }
}
