//! The AdamW update as in-place ops (no temporaries) on the CPU and, for f32, on CUDA; and the
//! same update with tensor ops for other devices.
//!
//! Both follow `torch.optim.AdamW` (single-tensor path) operation by operation:
//! `p *= 1 - lr*wd; m.lerp_(g, 1-b1); v = v*b2 + (1-b2)*g*g;`
//! `denom = sqrt(v) / sqrt(1-b2^t) + eps; p += -(lr / (1-b1^t)) * m / denom`.
//! Half-precision values are computed in f32 and rounded after each of those operations, where
//! PyTorch stores an intermediate.

use std::ops::{Add, Div, Mul, Sub};

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, InplaceOp2, InplaceOp3, Layout, Tensor, Var, WithDType};

/// The scalars of one AdamW update of one parameter.
#[derive(Clone, Copy, Debug)]
pub(super) struct Hyper {
    /// `1 - beta1`, the lerp weight of the first moment.
    pub lerp_w: f64,
    /// `beta2`.
    pub beta2: f64,
    /// `1 - beta2`.
    pub one_minus_beta2: f64,
    /// `1 - lr * weight_decay`, or `None` when the parameter is not decayed.
    pub decay: Option<f64>,
    /// `sqrt(1 - beta2^t)`.
    pub bc2_sqrt: f64,
    /// `eps`.
    pub eps: f64,
    /// `-lr / (1 - beta1^t)`.
    pub neg_step_size: f64,
    /// A factor applied to the gradient first, or `None` for 1.
    pub grad_scale: Option<f64>,
}

/// Arithmetic type the update is computed in.
trait Compute:
    Copy + Add<Output = Self> + Sub<Output = Self> + Mul<Output = Self> + Div<Output = Self>
{
    fn of(x: f64) -> Self;
    fn to64(self) -> f64;
    fn sqrt(self) -> Self;
    fn small_weight(self) -> bool;
}

macro_rules! compute {
    ($t:ty) => {
        impl Compute for $t {
            fn of(x: f64) -> Self {
                x as $t
            }
            fn to64(self) -> f64 {
                self as f64
            }
            fn sqrt(self) -> Self {
                <$t>::sqrt(self)
            }
            fn small_weight(self) -> bool {
                self.abs() < 0.5
            }
        }
    };
}
compute!(f32);
compute!(f64);

#[inline(always)]
fn up<T: WithDType, C: Compute>(x: T) -> C {
    C::of(x.to_f64())
}

#[inline(always)]
fn down<T: WithDType, C: Compute>(c: C) -> T {
    T::from_f64(c.to64())
}

/// Rounds through the storage type, as PyTorch does when it stores an intermediate.
#[inline(always)]
fn round<T: WithDType, C: Compute>(c: C) -> C {
    up::<T, C>(down::<T, C>(c))
}

/// The contiguous part of a storage slice that a layout covers.
fn view<'a, T>(data: &'a [T], l: &Layout) -> candle_core::Result<&'a [T]> {
    match l.contiguous_offsets() {
        Some((a, b)) if b <= data.len() => Ok(&data[a..b]),
        _ => bail!("adamw: expected a contiguous tensor"),
    }
}

fn view_mut<'a, T>(data: &'a mut [T], l: &Layout) -> candle_core::Result<&'a mut [T]> {
    match l.contiguous_offsets() {
        Some((a, b)) if b <= data.len() => Ok(&mut data[a..b]),
        _ => bail!("adamw: expected a contiguous tensor"),
    }
}

/// The gradient with `grad_scale` applied.
#[inline(always)]
fn grad<T: WithDType, C: Compute>(g: T, scale: Option<C>) -> C {
    match scale {
        Some(s) => round::<T, C>(up::<T, C>(g) * s),
        None => up(g),
    }
}

/// Which moment an [`MomentOp`] updates.
#[derive(Clone, Copy, Debug)]
enum Moment {
    First,
    Second,
}

/// `m.lerp_(g, 1 - beta1)` or `v = v*beta2 + (1-beta2)*g*g`, in place on the moment.
struct MomentOp(Moment, Hyper);

impl MomentOp {
    fn run<T: WithDType, C: Compute>(&self, dst: &mut [T], g: &[T]) -> candle_core::Result<()> {
        if dst.len() != g.len() {
            bail!(
                "adamw: moment has {} elements, gradient {}",
                dst.len(),
                g.len()
            )
        }
        let h = &self.1;
        let scale = h.grad_scale.map(C::of);
        match self.0 {
            Moment::First => {
                let w = C::of(h.lerp_w);
                let one_minus_w = C::of(1.0) - w;
                let small = w.small_weight();
                for (m, &g) in dst.iter_mut().zip(g) {
                    let (mc, gc) = (up::<T, C>(*m), grad::<T, C>(g, scale));
                    *m = down(if small {
                        mc + w * (gc - mc)
                    } else {
                        gc - (gc - mc) * one_minus_w
                    });
                }
            }
            Moment::Second => {
                let (b2, omb2) = (C::of(h.beta2), C::of(h.one_minus_beta2));
                for (v, &g) in dst.iter_mut().zip(g) {
                    let gc = grad::<T, C>(g, scale);
                    let scaled = round::<T, C>(up::<T, C>(*v) * b2);
                    *v = down(scaled + omb2 * gc * gc);
                }
            }
        }
        Ok(())
    }
}

impl InplaceOp2 for MomentOp {
    fn name(&self) -> &'static str {
        "adamw-moment"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<()> {
        use CpuStorage as S;
        match (s1, s2) {
            (S::F32(d), S::F32(g)) => self.run::<_, f32>(view_mut(d, l1)?, view(g, l2)?),
            (S::F64(d), S::F64(g)) => self.run::<_, f64>(view_mut(d, l1)?, view(g, l2)?),
            (S::BF16(d), S::BF16(g)) => self.run::<_, f32>(view_mut(d, l1)?, view(g, l2)?),
            (S::F16(d), S::F16(g)) => self.run::<_, f32>(view_mut(d, l1)?, view(g, l2)?),
            (d, g) => bail!("adamw: unsupported dtypes {:?}/{:?}", d.dtype(), g.dtype()),
        }
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &mut candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<()> {
        use peft_core::ops::cuda_adamw;
        let h = &self.1;
        let gscale = h.grad_scale.unwrap_or(1.0) as f32;
        match self.0 {
            Moment::First => cuda_adamw::first_moment(s1, l1, s2, l2, h.lerp_w as f32, gscale),
            Moment::Second => cuda_adamw::second_moment(
                s1,
                l1,
                s2,
                l2,
                (h.beta2 as f32, h.one_minus_beta2 as f32),
                gscale,
            ),
        }
    }
}

/// `p = p*(1 - lr*wd) - step_size * m / (sqrt(v)/bc2_sqrt + eps)`, in place on the parameter.
struct ParamOp(Hyper);

impl ParamOp {
    fn run<T: WithDType, C: Compute>(
        &self,
        p: &mut [T],
        m: &[T],
        v: &[T],
    ) -> candle_core::Result<()> {
        if p.len() != m.len() || p.len() != v.len() {
            bail!("adamw: parameter and moments differ in size")
        }
        let h = &self.0;
        let decay = h.decay.map(C::of);
        let (bc2s, eps, nss) = (C::of(h.bc2_sqrt), C::of(h.eps), C::of(h.neg_step_size));
        for ((p, &m), &v) in p.iter_mut().zip(m).zip(v) {
            let mut pc = up::<T, C>(*p);
            if let Some(d) = decay {
                pc = round::<T, C>(pc * d);
            }
            let denom = round::<T, C>(round::<T, C>(up::<T, C>(v).sqrt()) / bc2s);
            let denom = round::<T, C>(denom + eps);
            *p = down(pc + nss * up::<T, C>(m) / denom);
        }
        Ok(())
    }
}

impl InplaceOp3 for ParamOp {
    fn name(&self) -> &'static str {
        "adamw-param"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<()> {
        use CpuStorage as S;
        match (s1, s2, s3) {
            (S::F32(p), S::F32(m), S::F32(v)) => {
                self.run::<_, f32>(view_mut(p, l1)?, view(m, l2)?, view(v, l3)?)
            }
            (S::F64(p), S::F64(m), S::F64(v)) => {
                self.run::<_, f64>(view_mut(p, l1)?, view(m, l2)?, view(v, l3)?)
            }
            (S::BF16(p), S::BF16(m), S::BF16(v)) => {
                self.run::<_, f32>(view_mut(p, l1)?, view(m, l2)?, view(v, l3)?)
            }
            (S::F16(p), S::F16(m), S::F16(v)) => {
                self.run::<_, f32>(view_mut(p, l1)?, view(m, l2)?, view(v, l3)?)
            }
            (p, _, _) => bail!("adamw: unsupported dtype {:?}", p.dtype()),
        }
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &mut candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> candle_core::Result<()> {
        let h = &self.0;
        let scalars = (
            h.decay.unwrap_or(1.0) as f32,
            h.bc2_sqrt as f32,
            h.eps as f32,
            h.neg_step_size as f32,
        );
        peft_core::ops::cuda_adamw::param(s1, l1, s2, l2, s3, l3, scalars)
    }
}

/// Whether [`fused_step`] can update this parameter: a float tensor on the CPU, or an f32 one
/// on CUDA (kernels in kernels/peft_ops.cu).
pub(super) fn can_fuse(var: &Var) -> bool {
    use candle_core::DType;
    match var.device() {
        candle_core::Device::Cpu => matches!(
            var.dtype(),
            DType::F32 | DType::F64 | DType::BF16 | DType::F16
        ),
        candle_core::Device::Cuda(_) => cfg!(feature = "cuda") && var.dtype() == DType::F32,
        _ => false,
    }
}

/// Updates the moments and the parameter in place, three passes and no allocation.
/// `m`, `v` and `g` must be contiguous and have the parameter's shape and dtype.
pub(super) fn fused_step(
    var: &Var,
    m: &Tensor,
    v: &Tensor,
    g: &Tensor,
    h: Hyper,
) -> candle_core::Result<()> {
    m.inplace_op2(g, &MomentOp(Moment::First, h))?;
    v.inplace_op2(g, &MomentOp(Moment::Second, h))?;
    var.as_tensor().inplace_op3(m, v, &ParamOp(h))
}

/// The same update with tensor ops, for any device; returns the new moments.
pub(super) fn tensor_step(
    var: &Var,
    m: &Tensor,
    v: &Tensor,
    g: &Tensor,
    h: Hyper,
) -> candle_core::Result<(Tensor, Tensor)> {
    let g = match h.grad_scale {
        Some(s) => g.affine(s, 0.0)?,
        None => g.clone(),
    };
    let m = ((&g - m)?.affine(h.lerp_w, 0.0)? + m)?;
    let v = (v.affine(h.beta2, 0.0)? + (g.affine(h.one_minus_beta2, 0.0)? * &g)?)?;
    let denom = v.sqrt()?.affine(1.0 / h.bc2_sqrt, h.eps)?;
    let update = (m.affine(h.neg_step_size, 0.0)? / &denom)?;
    let p = match h.decay {
        Some(d) => (var.affine(d, 0.0)? + update)?,
        None => (var.as_tensor() + update)?,
    };
    var.set(&p)?;
    Ok((m, v))
}
