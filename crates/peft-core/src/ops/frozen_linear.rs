//! `y = x·Wᵀ + b` for a frozen `W` and `b`, whose backward yields only `dx`.
//!
//! candle's matmul backward always computes the gradient of both operands, so a frozen weight
//! costs a weight-sized gradient buffer (and its GEMM) on every step, and a frozen bias added with
//! `broadcast_add` costs an activation-sized one. This op keeps `W` and `b` inside the op instead of
//! taking them as arguments: autograd sees a function of `x` alone.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Shape, Tensor};

struct FrozenLinear {
    weight: Tensor,
    bias: Option<Tensor>,
}

impl FrozenLinear {
    fn out_features(&self) -> usize {
        self.weight.dims()[0]
    }
}

fn add_bias_rows<T: Copy + std::ops::Add<Output = T>>(out: &mut [T], bias: &[T]) {
    for row in out.chunks_exact_mut(bias.len()) {
        for (o, b) in row.iter_mut().zip(bias) {
            *o = *o + *b;
        }
    }
}

/// `x·Wᵀ + b` on the CPU for `x` of shape `(..., in)` (contiguous), as a `rows × out` storage:
/// the base of every linear op's CPU implementation. `op` names the caller in errors.
pub(super) fn cpu_linear(
    x: &CpuStorage,
    x_l: &Layout,
    weight: &Tensor,
    bias: Option<&Tensor>,
    op: &str,
) -> candle_core::Result<CpuStorage> {
    let (_, _, x2_l) = super::as_rows(x_l)?;
    if let Some(b) = bias.filter(|b| b.dtype() == DType::F32) {
        let b = b.to_vec1::<f32>()?;
        if let Some(out) = super::frozen_gemm::bias_plus_times_weight_t(x, &x2_l, weight, &b, op)? {
            return Ok(out);
        }
    }
    let mut out = super::frozen_gemm::times_weight_t(x, &x2_l, weight, op)?;
    if let Some(bias) = bias {
        let bias = bias.to_dtype(out.dtype())?.to_vec1_any()?;
        match (&mut out, bias) {
            (CpuStorage::F32(o), BiasValues::F32(b)) => add_bias_rows(o, &b),
            (CpuStorage::F64(o), BiasValues::F64(b)) => add_bias_rows(o, &b),
            (CpuStorage::BF16(o), BiasValues::BF16(b)) => add_bias_rows(o, &b),
            (CpuStorage::F16(o), BiasValues::F16(b)) => add_bias_rows(o, &b),
            _ => candle_core::bail!("{op}: unsupported dtype {:?}", x.dtype()),
        }
    }
    Ok(out)
}

impl CustomOp1 for FrozenLinear {
    fn name(&self) -> &'static str {
        "frozen-linear"
    }

    fn cpu_fwd(&self, x: &CpuStorage, x_l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let out = cpu_linear(x, x_l, &self.weight, self.bias.as_ref(), self.name())?;
        Ok((out, super::with_last(x_l.shape(), self.out_features())))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        x_l: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        super::cuda_ops::frozen_linear(x, x_l, &self.weight, self.bias.as_ref())
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let n = self.out_features();
        let g = grad.reshape((grad.elem_count() / n, n))?;
        let dx = if g.device().is_cpu() {
            let op = FrozenInputGrad {
                weight: self.weight.clone(),
            };
            g.contiguous()?.apply_op1_no_bwd(&op)?
        } else {
            g.matmul(&self.weight)?
        };
        dx.reshape(x.shape()).map(Some)
    }
}

/// `g·W` on the CPU: the input gradient of a frozen linear, at the frozen matmul precision.
struct FrozenInputGrad {
    weight: Tensor,
}

impl CustomOp1 for FrozenInputGrad {
    fn name(&self) -> &'static str {
        "frozen-linear-backward"
    }

    fn cpu_fwd(&self, g: &CpuStorage, g_l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let dx = super::frozen_gemm::times_weight(g, g_l, &self.weight, self.name())?;
        let (m, _) = g_l.shape().dims2()?;
        Ok((dx, Shape::from((m, self.weight.dims()[1]))))
    }
}

enum BiasValues {
    F32(Vec<f32>),
    F64(Vec<f64>),
    BF16(Vec<half::bf16>),
    F16(Vec<half::f16>),
}

trait ToVecAny {
    fn to_vec1_any(&self) -> candle_core::Result<BiasValues>;
}

impl ToVecAny for Tensor {
    fn to_vec1_any(&self) -> candle_core::Result<BiasValues> {
        Ok(match self.dtype() {
            DType::F32 => BiasValues::F32(self.to_vec1()?),
            DType::F64 => BiasValues::F64(self.to_vec1()?),
            DType::BF16 => BiasValues::BF16(self.to_vec1()?),
            DType::F16 => BiasValues::F16(self.to_vec1()?),
            dt => candle_core::bail!("frozen-linear: unsupported bias dtype {dt:?}"),
        })
    }
}

/// Applies a frozen linear layer to `x` of shape `(..., in)`: no gradient is ever computed for
/// `weight` (shape `(out, in)`) or `bias` (shape `(out,)`).
///
/// A custom op on the CPU and on CUDA (cuBLAS plus a bias kernel); on other devices it falls back
/// to candle's matmul with the weight detached (correct, but candle still computes the unused
/// weight gradient there).
pub fn frozen_linear(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
) -> candle_core::Result<Tensor> {
    let dims = x.dims();
    let in_features = *dims.last().unwrap_or(&0);
    let (out_features, w_in) = weight.dims2()?;
    if in_features != w_in {
        candle_core::bail!(
            "frozen-linear: input has {in_features} features, weight expects {w_in} ({:?})",
            weight.shape()
        )
    }
    if x.device().is_cpu() || x.device().is_cuda() {
        // The op takes `(..., in)` as it is: no reshape nodes in the autograd graph.
        return x
            .contiguous()?
            .apply_op1_arc(std::sync::Arc::new(Box::new(FrozenLinear {
                weight: weight.to_dtype(x.dtype())?.detach(),
                bias: match bias {
                    Some(b) => Some(b.to_dtype(x.dtype())?.detach()),
                    None => None,
                },
            })));
    }
    let rows = x.elem_count() / in_features.max(1);
    let mut out_dims = dims.to_vec();
    *out_dims.last_mut().expect("rank >= 1 checked by reshape") = out_features;
    let y = x
        .reshape((rows, in_features))?
        .matmul(&weight.detach().t()?)?;
    let y = match bias {
        Some(b) => y.broadcast_add(&b.detach())?,
        None => y,
    };
    y.reshape(out_dims)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn matches_candle_linear_and_its_input_gradient() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let x = Var::randn(0f32, 1., (2, 5, 7), &dev)?;
        let w = Tensor::randn(0f32, 1., (3, 7), &dev)?;
        let b = Tensor::randn(0f32, 1., 3, &dev)?;
        let ours = frozen_linear(x.as_tensor(), &w, Some(&b))?;
        let reference = x.broadcast_matmul(&w.t()?)?.broadcast_add(&b)?;
        let diff = (&ours - &reference)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-5, "forward differs by {diff}");

        let g_ours = ours.sqr()?.sum_all()?.backward()?;
        let g_ref = reference.sqr()?.sum_all()?.backward()?;
        let dx_ours = g_ours.get(x.as_tensor()).expect("dx");
        let dx_ref = g_ref.get(x.as_tensor()).expect("dx");
        let diff = (dx_ours - dx_ref)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-4, "input gradient differs by {diff}");
        Ok(())
    }

    #[test]
    fn no_gradient_buffer_exists_for_the_frozen_weight() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let x = Var::randn(0f32, 1., (4, 8), &dev)?;
        let w = Tensor::randn(0f32, 1., (6, 8), &dev)?;
        let b = Tensor::randn(0f32, 1., 6, &dev)?;
        let grads = frozen_linear(x.as_tensor(), &w, Some(&b))?
            .sum_all()?
            .backward()?;
        assert!(grads.get(&w).is_none() && grads.get(&b).is_none());
        // Every tensor in the gradient store is the size of x: none is weight-sized.
        for id in grads.get_ids() {
            let g = grads.get_id(*id).expect("listed id");
            assert_ne!(g.dims(), w.dims(), "a weight-sized gradient was computed");
        }
        // candle's own matmul, by contrast, does compute a gradient for the frozen weight.
        let grads = x.matmul(&w.t()?)?.sum_all()?.backward()?;
        assert!(grads
            .get_ids()
            .any(|id| grads.get_id(*id).unwrap().dims() == [8, 6]));
        Ok(())
    }

    #[test]
    fn finite_differences_agree_with_the_input_gradient() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let x0: Vec<f64> = (0..12).map(|i| (i as f64 * 0.37).sin()).collect();
        let w = Tensor::new(
            &[
                [0.3f64, -1.2, 0.5, 2.0],
                [1.1, 0.4, -0.7, 0.2],
                [0.0, 0.9, 1.3, -0.5],
            ],
            &dev,
        )?;
        let loss = |x: &Tensor| -> candle_core::Result<Tensor> {
            frozen_linear(x, &w, None)?.tanh()?.sum_all()
        };
        let x = Var::from_tensor(&Tensor::from_vec(x0.clone(), (3, 4), &dev)?)?;
        let grad = loss(x.as_tensor())?.backward()?;
        let analytic: Vec<f64> = grad.get(x.as_tensor()).unwrap().flatten_all()?.to_vec1()?;
        let eps = 1e-6;
        for i in 0..x0.len() {
            let mut plus = x0.clone();
            plus[i] += eps;
            let mut minus = x0.clone();
            minus[i] -= eps;
            let f = |v: Vec<f64>| -> candle_core::Result<f64> {
                loss(&Tensor::from_vec(v, (3, 4), &dev)?)?.to_scalar::<f64>()
            };
            let numeric = (f(plus)? - f(minus)?) / (2. * eps);
            assert!(
                (numeric - analytic[i]).abs() < 1e-7,
                "d/dx[{i}]: {numeric} vs {}",
                analytic[i]
            );
        }
        Ok(())
    }
}
