//! The LoRA linear as one op: `y = x·Wᵀ + b + s·((x ⊙ m)·Aᵀ)·Bᵀ` with `W`, `b` frozen and `m`
//! the adapter's dropout mask (absent at evaluation or with `lora_dropout = 0`).
//!
//! Autograd sees a function of `x`, `A` and `B` alone: no gradient for `W` or `b`, and the only
//! adapter intermediate is the `rows × r` product `u = (x ⊙ m)·Aᵀ`. The adapter's up-projection
//! is accumulated into `y` by the GEMM itself (beta = 1), and in the backward `dx = g·W + (du·A) ⊙ m`
//! likewise, so no `rows × out` delta tensor exists. On CUDA the GEMMs are cuBLAS on candle's
//! stream; on the CPU candle's GEMM. [`lora_linear_reference`] computes the same function from
//! plain candle ops and is what the tests compare against.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Shape, Storage, Tensor};

use super::frozen_linear::cpu_linear;
use super::gemm::{gemm_accumulate, MatRef};
use super::{contiguous_f32, fused_kernels};

/// The adapter branch of a LoRA linear: `s·((x ⊙ mask)·Aᵀ)·Bᵀ`.
#[derive(Clone, Copy, Debug)]
pub struct LoraBranch<'a> {
    /// Down-projection `A`, `r × in`.
    pub a: &'a Tensor,
    /// Up-projection `B`, `out × r`.
    pub b: &'a Tensor,
    /// The scale `s` (`alpha / r`, or `alpha / √r` with rsLoRA).
    pub scale: f64,
    /// The scaled dropout keep-mask on the adapter's input (shape of `x`), if any.
    pub mask: Option<&'a Tensor>,
}

struct LoraLinear {
    weight: Tensor,
    bias: Option<Tensor>,
    mask: Option<Tensor>,
    scale: f32,
}

fn cpu_tensor_f32<'a>(s: &'a Storage, l: &Layout, op: &str) -> candle_core::Result<&'a [f32]> {
    match s {
        Storage::Cpu(c) => contiguous_f32(c, l, op),
        _ => candle_core::bail!("{op}: an operand is not on the CPU"),
    }
}

/// `x ⊙ m` as a fresh contiguous storage.
fn masked(x: &[f32], mask: &[f32]) -> CpuStorage {
    CpuStorage::F32(x.iter().zip(mask).map(|(x, m)| x * m).collect())
}

impl CustomOp3 for LoraLinear {
    fn name(&self) -> &'static str {
        "lora-linear"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        xl: &Layout,
        a: &CpuStorage,
        al: &Layout,
        b: &CpuStorage,
        bl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (m, k, x2l) = super::as_rows(xl)?;
        let (r, _) = al.shape().dims2()?;
        let n = self.weight.dims()[0];
        let mut y = cpu_linear(x, xl, &self.weight, self.bias.as_ref(), self.name())?;
        let u = match &self.mask {
            Some(mask) => {
                let guard = mask.storage_and_layout();
                let xd = masked(
                    contiguous_f32(x, xl, self.name())?,
                    cpu_tensor_f32(&guard.0, guard.1, self.name())?,
                );
                xd.matmul(
                    a,
                    (1, m, r, k),
                    &Layout::contiguous((m, k)),
                    &al.transpose(0, 1)?,
                )?
            }
            None => x.matmul(a, (1, m, r, k), &x2l, &al.transpose(0, 1)?)?,
        };
        // y += s · u · Bᵀ, accumulated by the GEMM into y (no rows × out temporary).
        let bv = contiguous_f32(b, bl, self.name())?;
        let (CpuStorage::F32(yv), CpuStorage::F32(uv)) = (&mut y, &u) else {
            candle_core::bail!("lora-linear: only f32 is supported on the CPU path")
        };
        gemm_accumulate(
            yv,
            MatRef::new(uv, m, r),
            MatRef::new(bv, n, r).t(),
            self.scale,
        )?;
        Ok((y, super::with_last(xl.shape(), n)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        xl: &Layout,
        a: &candle_core::CudaStorage,
        al: &Layout,
        b: &candle_core::CudaStorage,
        bl: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let frozen = super::cuda_ops::LoraFrozen {
            weight: &self.weight,
            bias: self.bias.as_ref(),
            mask: self.mask.as_ref(),
            scale: self.scale,
        };
        super::cuda_ops::lora_linear(x, xl, a, al, b, bl, &frozen)
    }

    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        // Everything as `rows × features` (views; no graph is built in the backward).
        let n = g.dim(candle_core::D::Minus1)?;
        let k = x.dim(candle_core::D::Minus1)?;
        let g = g.contiguous()?.reshape(((), n))?;
        let x2 = x.reshape(((), k))?;
        let s = self.scale as f64;
        let xd = match &self.mask {
            Some(mask) => x2.mul(&mask.reshape(((), k))?)?,
            None => x2.clone(),
        };
        let u = xd.matmul(&a.t()?)?; // rows × r, recomputed rather than kept
        let du = (g.matmul(b)? * s)?; // rows × r
        let da = du.t()?.matmul(&xd)?; // r × in
        let db = (g.t()?.matmul(&u)? * s)?; // out × r
                                            // No input gradient where the input depends on no trainable tensor (a first layer's
                                            // input under LoRA): it would cost the layer's largest GEMM for nothing.
        let dx = if x.track_op() {
            let op = LoraInputGrad {
                weight: self.weight.clone(),
                a: a.detach(),
                mask: self.mask.clone(),
            };
            Some(g.apply_op2_no_bwd(&du, &op)?.reshape(x.shape())?)
        } else {
            None
        };
        Ok((dx, Some(da), Some(db)))
    }
}

/// `dx = g·W + (du·A) ⊙ m`: the input gradient, accumulated in one buffer.
struct LoraInputGrad {
    weight: Tensor,
    a: Tensor,
    mask: Option<Tensor>,
}

impl CustomOp2 for LoraInputGrad {
    fn name(&self) -> &'static str {
        "lora-linear-backward"
    }

    fn cpu_fwd(
        &self,
        g: &CpuStorage,
        gl: &Layout,
        du: &CpuStorage,
        dul: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (m, _) = gl.shape().dims2()?;
        let (r, k) = self.a.dims2()?;
        let (as_, al) = self.a.storage_and_layout();
        let Storage::Cpu(a) = &*as_ else {
            candle_core::bail!("lora-linear-backward: an operand is not on the CPU")
        };
        let mut dx = super::frozen_gemm::times_weight(g, gl, &self.weight, self.name())?;
        let CpuStorage::F32(dxv) = &mut dx else {
            candle_core::bail!("lora-linear-backward: only f32 is supported on the CPU")
        };
        match &self.mask {
            // dx += du · A, accumulated by the GEMM (no rows × in temporary).
            None => {
                let (CpuStorage::F32(duv), CpuStorage::F32(av)) = (du, a) else {
                    candle_core::bail!("lora-linear-backward: only f32 is supported on the CPU")
                };
                let (Some((d0, d1)), Some((a0, a1))) =
                    (dul.contiguous_offsets(), al.contiguous_offsets())
                else {
                    candle_core::bail!("lora-linear-backward: operands must be contiguous")
                };
                gemm_accumulate(
                    dxv,
                    MatRef::new(&duv[d0..d1], m, r),
                    MatRef::new(&av[a0..a1], r, k),
                    1.0,
                )?;
            }
            // dx += (du · A) ⊙ m: the mask needs the product on its own.
            Some(mask) => {
                let t = du.matmul(a, (1, m, k, r), dul, al)?;
                let guard = mask.storage_and_layout();
                let mv = cpu_tensor_f32(&guard.0, guard.1, self.name())?;
                let CpuStorage::F32(tv) = &t else {
                    candle_core::bail!("lora-linear-backward: only f32 is supported on the CPU")
                };
                for ((d, t), m) in dxv.iter_mut().zip(tv).zip(mv) {
                    *d += t * m;
                }
            }
        }
        Ok((dx, Shape::from((m, k))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        g: &candle_core::CudaStorage,
        gl: &Layout,
        du: &candle_core::CudaStorage,
        dul: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        super::cuda_ops::lora_input_grad(g, gl, du, dul, &self.weight, &self.a, self.mask.as_ref())
    }
}

/// `x·Wᵀ + b + s·((x ⊙ m)·Aᵀ)·Bᵀ` for `x` of shape `(..., in)`, differentiable in `x`, `A` and
/// `B` only. `A` and `B` are cast to `x`'s dtype (their gradients flow back in their own). Runs
/// the fused op where the kernels exist (f32 CPU; f32/bf16 CUDA), else the reference.
pub fn lora_linear(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    branch: &LoraBranch<'_>,
) -> candle_core::Result<Tensor> {
    let in_features = x.dim(candle_core::D::Minus1)?;
    let (out_features, w_in) = weight.dims2()?;
    let (r, a_in) = branch.a.dims2()?;
    let (b_out, b_r) = branch.b.dims2()?;
    if in_features != w_in || a_in != w_in || b_out != out_features || b_r != r {
        candle_core::bail!(
            "lora-linear: shapes do not fit: x {:?}, W {:?}, A {:?}, B {:?}",
            x.shape(),
            weight.shape(),
            branch.a.shape(),
            branch.b.shape()
        )
    }
    if let Some(mask) = branch.mask {
        if mask.dims() != x.dims() {
            candle_core::bail!("lora-linear: mask {:?} is not shaped like x", mask.shape())
        }
    }
    if !fused_kernels(x) {
        return lora_linear_reference(x, weight, bias, branch);
    }
    let dtype = x.dtype();
    let a = branch.a.to_dtype(dtype)?.contiguous()?;
    let b = branch.b.to_dtype(dtype)?.contiguous()?;
    let op = LoraLinear {
        weight: weight.to_dtype(dtype)?.contiguous()?.detach(),
        bias: match bias {
            Some(b) => Some(b.to_dtype(dtype)?.contiguous()?.detach()),
            None => None,
        },
        mask: match branch.mask {
            Some(m) => Some(m.to_dtype(dtype)?.contiguous()?.detach()),
            None => None,
        },
        scale: branch.scale as f32,
    };
    x.contiguous()?
        .apply_op3_arc(&a, &b, std::sync::Arc::new(Box::new(op)))
}

/// The same function as [`lora_linear`] from plain candle ops (the weight and bias detached).
pub fn lora_linear_reference(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    branch: &LoraBranch<'_>,
) -> candle_core::Result<Tensor> {
    let dtype = x.dtype();
    let mut y = x.broadcast_matmul(&weight.detach().to_dtype(dtype)?.t()?)?;
    if let Some(b) = bias {
        y = y.broadcast_add(&b.detach().to_dtype(dtype)?)?;
    }
    let xd = match branch.mask {
        Some(m) => x.mul(&m.detach().to_dtype(dtype)?)?,
        None => x.clone(),
    };
    let u = xd.broadcast_matmul(&branch.a.to_dtype(dtype)?.t()?)?;
    let d = u.broadcast_matmul(&branch.b.to_dtype(dtype)?.t()?)?;
    y + (d * branch.scale)?
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::{dropout_mask, max_abs_diff};
    use candle_core::{DType, Device, Var};

    /// Values and all three gradients of the fused op against the reference, with and without a
    /// dropout mask and a bias, at odd sizes.
    #[test]
    fn fused_matches_reference_values_and_gradients() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        for (rows, k, n, r, with_mask, with_bias) in [
            (7, 13, 11, 3, false, true),
            (5, 16, 9, 4, true, false),
            (33, 24, 40, 8, true, true),
        ] {
            let x = Var::randn(0f32, 1., (rows, k), &dev)?;
            let a = Var::randn(0f32, 0.3, (r, k), &dev)?;
            let b = Var::randn(0f32, 0.3, (n, r), &dev)?;
            let w = Tensor::randn(0f32, 0.5, (n, k), &dev)?;
            let bias = Tensor::randn(0f32, 1., n, &dev)?;
            let mask = dropout_mask(11, 0.8, x.shape(), DType::F32, &dev)?;
            let branch = LoraBranch {
                a: a.as_tensor(),
                b: b.as_tensor(),
                scale: 2.0,
                mask: with_mask.then_some(&mask),
            };
            let bias = with_bias.then_some(&bias);
            let ours = lora_linear(x.as_tensor(), &w, bias, &branch)?;
            let reference = lora_linear_reference(x.as_tensor(), &w, bias, &branch)?;
            assert!(
                max_abs_diff(&ours, &reference) < 1e-4,
                "forward ({rows},{k},{n},{r})"
            );
            // A loss that weights every output differently, so every gradient entry is exercised.
            let weights = Tensor::randn(0f32, 1., (rows, n), &dev)?;
            let g_ours = (&ours * &weights)?.sum_all()?.backward()?;
            let g_ref = (&reference * &weights)?.sum_all()?.backward()?;
            for (name, v) in [
                ("x", x.as_tensor()),
                ("A", a.as_tensor()),
                ("B", b.as_tensor()),
            ] {
                let d = max_abs_diff(g_ours.get(v).expect("grad"), g_ref.get(v).expect("grad"));
                assert!(d < 1e-4, "d{name} differs by {d} at ({rows},{k},{n},{r})");
            }
            assert!(
                g_ours.get(&w).is_none(),
                "no gradient for the frozen weight"
            );
            for id in g_ours.get_ids() {
                let t = g_ours.get_id(*id).expect("listed");
                assert_ne!(t.dims(), w.dims(), "a weight-sized gradient exists");
            }
        }
        Ok(())
    }

    #[test]
    fn batched_input_is_the_same_as_rows() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let x = Var::randn(0f32, 1., (2, 3, 6), &dev)?;
        let w = Tensor::randn(0f32, 0.5, (5, 6), &dev)?;
        let a = Var::randn(0f32, 0.5, (2, 6), &dev)?;
        let b = Var::randn(0f32, 0.5, (5, 2), &dev)?;
        let mask = dropout_mask(3, 0.7, x.shape(), DType::F32, &dev)?;
        let branch = LoraBranch {
            a: a.as_tensor(),
            b: b.as_tensor(),
            scale: 0.5,
            mask: Some(&mask),
        };
        let y = lora_linear(x.as_tensor(), &w, None, &branch)?;
        assert_eq!(y.dims(), [2, 3, 5]);
        let reference = lora_linear_reference(x.as_tensor(), &w, None, &branch)?;
        assert!(max_abs_diff(&y, &reference) < 1e-5);
        let g = y.sqr()?.sum_all()?.backward()?;
        let r = reference.sqr()?.sum_all()?.backward()?;
        for v in [x.as_tensor(), a.as_tensor(), b.as_tensor()] {
            assert!(max_abs_diff(g.get(v).expect("grad"), r.get(v).expect("grad")) < 1e-4);
        }
        Ok(())
    }

    #[test]
    fn input_gradient_matches_finite_differences() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let (rows, k, n, r) = (3, 4, 5, 2);
        let w = Tensor::randn(0f32, 0.5, (n, k), &dev)?;
        let a = Tensor::randn(0f32, 0.5, (r, k), &dev)?;
        let b = Tensor::randn(0f32, 0.5, (n, r), &dev)?;
        let branch = LoraBranch {
            a: &a,
            b: &b,
            scale: 1.5,
            mask: None,
        };
        let loss = |x: &Tensor| lora_linear(x, &w, None, &branch)?.tanh()?.sum_all();
        let x0: Vec<f32> = (0..rows * k).map(|i| (i as f32 * 0.37).sin()).collect();
        let x = Var::from_tensor(&Tensor::from_vec(x0.clone(), (rows, k), &dev)?)?;
        let grads = loss(x.as_tensor())?.backward()?;
        let analytic: Vec<f32> = grads
            .get(x.as_tensor())
            .expect("dx")
            .flatten_all()?
            .to_vec1()?;
        let eps = 1e-2f32;
        for i in 0..x0.len() {
            let f = |delta: f32| -> candle_core::Result<f32> {
                let mut v = x0.clone();
                v[i] += delta;
                loss(&Tensor::from_vec(v, (rows, k), &dev)?)?.to_scalar::<f32>()
            };
            let numeric = (f(eps)? - f(-eps)?) / (2.0 * eps);
            assert!(
                (numeric - analytic[i]).abs() < 2e-3,
                "d/dx[{i}]: {numeric} vs {}",
                analytic[i]
            );
        }
        Ok(())
    }
}
