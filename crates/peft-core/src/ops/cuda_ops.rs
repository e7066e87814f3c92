//! CUDA forward passes of the custom ops in this module: each function here is the `cuda_fwd` of
//! one op, computing what that op's `cpu_fwd` computes (the CPU reference), in f32 or bf16.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaView, LaunchConfig};
use candle_core::cuda_backend::{CudaDevice, WrapErr};
use candle_core::{CudaStorage, DType, Layout, Result, Shape, Tensor};

use crate::cuda::{
    alloc, elementwise_cfg, gemm, launch, rows_cfg, storage, tensor_view, view, Elem, Op,
};

/// Calls `$f::<T>(..)` for the storage's dtype (f32 or bf16).
macro_rules! dispatch {
    ($dtype:expr, $op:expr, $f:ident ( $($arg:expr),* )) => {
        match $dtype {
            DType::F32 => $f::<f32>($($arg),*),
            DType::BF16 => $f::<half::bf16>($($arg),*),
            d => candle_core::bail!("{}: CUDA kernels support f32 and bf16, got {d:?}", $op),
        }
    };
}

/// `y (m×n) = x·Wᵀ (+ b)` into a fresh buffer.
fn linear_into<T: Elem>(
    dev: &CudaDevice,
    x: &CudaView<'_, T>,
    weight: &Tensor,
    bias: Option<&Tensor>,
    (m, n, k): (usize, usize, usize),
    op: &str,
) -> Result<CudaSlice<T>> {
    let (ws, wl) = weight.storage_and_layout();
    let w = tensor_view::<T>(&ws, wl, op)?;
    let mut y = alloc::<T>(dev, m * n)?;
    gemm::<T, _, _, _>(dev, (m, n, k), 1.0, x, Op::N, &w, Op::T, 0.0, &mut y)?;
    if let Some(bias) = bias {
        let (bs, bl) = bias.storage_and_layout();
        let b = tensor_view::<T>(&bs, bl, op)?;
        let (total, cols) = ((m * n) as i64, n as i32);
        launch!(
            dev,
            T,
            "add_bias_rows",
            elementwise_cfg(m * n),
            &mut y,
            &b,
            &total,
            &cols
        )?;
    }
    Ok(y)
}

fn frozen_linear_t<T: Elem>(
    x: &CudaStorage,
    xl: &Layout,
    weight: &Tensor,
    bias: Option<&Tensor>,
) -> Result<(CudaStorage, Shape)> {
    let (m, k, _) = super::as_rows(xl)?;
    let n = weight.dims()[0];
    let dev = x.device();
    let xv = view::<T>(x, xl, "frozen-linear")?;
    let y = linear_into::<T>(dev, &xv, weight, bias, (m, n, k), "frozen-linear")?;
    Ok((storage(y, dev), super::with_last(xl.shape(), n)))
}

/// `x·Wᵀ + b` (frozen-linear).
pub(crate) fn frozen_linear(
    x: &CudaStorage,
    xl: &Layout,
    weight: &Tensor,
    bias: Option<&Tensor>,
) -> Result<(CudaStorage, Shape)> {
    dispatch!(
        x.dtype(),
        "frozen-linear",
        frozen_linear_t(x, xl, weight, bias)
    )
}

/// The operands of the fused LoRA linear besides its three inputs.
pub(crate) struct LoraFrozen<'a> {
    pub weight: &'a Tensor,
    pub bias: Option<&'a Tensor>,
    pub mask: Option<&'a Tensor>,
    pub scale: f32,
}

#[allow(clippy::too_many_arguments)]
fn lora_linear_t<T: Elem>(
    x: &CudaStorage,
    xl: &Layout,
    a: &CudaStorage,
    al: &Layout,
    b: &CudaStorage,
    bl: &Layout,
    fz: &LoraFrozen<'_>,
) -> Result<(CudaStorage, Shape)> {
    const OP: &str = "lora-linear";
    let (m, k, _) = super::as_rows(xl)?;
    let (r, _) = al.shape().dims2()?;
    let n = fz.weight.dims()[0];
    let dev = x.device();
    let xv = view::<T>(x, xl, OP)?;
    let av = view::<T>(a, al, OP)?;
    let bv = view::<T>(b, bl, OP)?;
    let mut y = linear_into::<T>(dev, &xv, fz.weight, fz.bias, (m, n, k), OP)?;
    // u = (x ⊙ mask)·Aᵀ, the only adapter intermediate (m × r).
    let mut u = alloc::<T>(dev, m * r)?;
    match fz.mask {
        Some(mask) => {
            let (ms, ml) = mask.storage_and_layout();
            let mv = tensor_view::<T>(&ms, ml, OP)?;
            let mut xd = alloc::<T>(dev, m * k)?;
            let total = (m * k) as i64;
            launch!(
                dev,
                T,
                "mul",
                elementwise_cfg(m * k),
                &mut xd,
                &xv,
                &mv,
                &total
            )?;
            gemm::<T, _, _, _>(dev, (m, r, k), 1.0, &xd, Op::N, &av, Op::T, 0.0, &mut u)?;
        }
        None => gemm::<T, _, _, _>(dev, (m, r, k), 1.0, &xv, Op::N, &av, Op::T, 0.0, &mut u)?,
    }
    // y += s · u·Bᵀ, accumulated by the GEMM itself (beta = 1).
    gemm::<T, _, _, _>(dev, (m, n, r), fz.scale, &u, Op::N, &bv, Op::T, 1.0, &mut y)?;
    Ok((storage(y, dev), super::with_last(xl.shape(), n)))
}

/// `x·Wᵀ + b + s·((x ⊙ mask)·Aᵀ)·Bᵀ` (lora-linear).
pub(crate) fn lora_linear(
    x: &CudaStorage,
    xl: &Layout,
    a: &CudaStorage,
    al: &Layout,
    b: &CudaStorage,
    bl: &Layout,
    fz: &LoraFrozen<'_>,
) -> Result<(CudaStorage, Shape)> {
    dispatch!(
        x.dtype(),
        "lora-linear",
        lora_linear_t(x, xl, a, al, b, bl, fz)
    )
}

fn lora_input_grad_t<T: Elem>(
    g: &CudaStorage,
    gl: &Layout,
    du: &CudaStorage,
    dul: &Layout,
    weight: &Tensor,
    a: &Tensor,
    mask: Option<&Tensor>,
) -> Result<(CudaStorage, Shape)> {
    const OP: &str = "lora-linear-backward";
    let (m, n) = gl.shape().dims2()?;
    let (r, k) = a.dims2()?;
    let dev = g.device();
    let gv = view::<T>(g, gl, OP)?;
    let duv = view::<T>(du, dul, OP)?;
    let (ws, wl) = weight.storage_and_layout();
    let wv = tensor_view::<T>(&ws, wl, OP)?;
    let (as_, al) = a.storage_and_layout();
    let av = tensor_view::<T>(&as_, al, OP)?;
    let mut dx = alloc::<T>(dev, m * k)?;
    gemm::<T, _, _, _>(dev, (m, k, n), 1.0, &gv, Op::N, &wv, Op::N, 0.0, &mut dx)?;
    match mask {
        None => gemm::<T, _, _, _>(dev, (m, k, r), 1.0, &duv, Op::N, &av, Op::N, 1.0, &mut dx)?,
        Some(mask) => {
            let (ms, ml) = mask.storage_and_layout();
            let mv = tensor_view::<T>(&ms, ml, OP)?;
            let mut t = alloc::<T>(dev, m * k)?;
            gemm::<T, _, _, _>(dev, (m, k, r), 1.0, &duv, Op::N, &av, Op::N, 0.0, &mut t)?;
            let total = (m * k) as i64;
            launch!(
                dev,
                T,
                "add_mul",
                elementwise_cfg(m * k),
                &mut dx,
                &t,
                &mv,
                &total
            )?;
        }
    }
    Ok((storage(dx, dev), Shape::from((m, k))))
}

/// `dx = g·W + (du·A) ⊙ mask` (the input gradient of lora-linear).
pub(crate) fn lora_input_grad(
    g: &CudaStorage,
    gl: &Layout,
    du: &CudaStorage,
    dul: &Layout,
    weight: &Tensor,
    a: &Tensor,
    mask: Option<&Tensor>,
) -> Result<(CudaStorage, Shape)> {
    dispatch!(
        g.dtype(),
        "lora-linear-backward",
        lora_input_grad_t(g, gl, du, dul, weight, a, mask)
    )
}

fn unary_t<T: Elem>(name: &str, x: &CudaStorage, xl: &Layout) -> Result<(CudaStorage, Shape)> {
    let dev = x.device();
    let xv = view::<T>(x, xl, name)?;
    let n = xl.shape().elem_count();
    let mut y = alloc::<T>(dev, n)?;
    let total = n as i64;
    launch!(dev, T, name, elementwise_cfg(n), &xv, &mut y, &total)?;
    Ok((storage(y, dev), xl.shape().clone()))
}

/// Exact GELU.
pub(crate) fn gelu_fwd(x: &CudaStorage, xl: &Layout) -> Result<(CudaStorage, Shape)> {
    dispatch!(x.dtype(), "gelu", unary_t("gelu_fwd", x, xl))
}

fn binary_t<T: Elem>(
    name: &str,
    x: &CudaStorage,
    xl: &Layout,
    g: &CudaStorage,
    gl: &Layout,
) -> Result<(CudaStorage, Shape)> {
    let dev = x.device();
    let xv = view::<T>(x, xl, name)?;
    let gv = view::<T>(g, gl, name)?;
    let n = xl.shape().elem_count();
    let mut y = alloc::<T>(dev, n)?;
    let total = n as i64;
    launch!(dev, T, name, elementwise_cfg(n), &xv, &gv, &mut y, &total)?;
    Ok((storage(y, dev), xl.shape().clone()))
}

/// `dy · GELU'(x)`.
pub(crate) fn gelu_bwd(
    x: &CudaStorage,
    xl: &Layout,
    g: &CudaStorage,
    gl: &Layout,
) -> Result<(CudaStorage, Shape)> {
    dispatch!(
        x.dtype(),
        "gelu-backward",
        binary_t("gelu_bwd", x, xl, g, gl)
    )
}

fn layer_norm_fwd_t<T: Elem>(
    x: &CudaStorage,
    xl: &Layout,
    gamma: &Tensor,
    beta: &Tensor,
    eps: f32,
) -> Result<(CudaStorage, Shape)> {
    const OP: &str = "frozen-layer-norm";
    let dev = x.device();
    let h = gamma.elem_count();
    let rows = xl.shape().elem_count() / h;
    let xv = view::<T>(x, xl, OP)?;
    let (gs, gl) = gamma.storage_and_layout();
    let gv = tensor_view::<T>(&gs, gl, OP)?;
    let (bs, bl) = beta.storage_and_layout();
    let bv = tensor_view::<T>(&bs, bl, OP)?;
    let mut y = alloc::<T>(dev, rows * h)?;
    let hh = h as i32;
    launch!(
        dev,
        T,
        "layer_norm_fwd",
        rows_cfg(rows, h),
        &xv,
        &gv,
        &bv,
        &mut y,
        &hh,
        &eps
    )?;
    Ok((storage(y, dev), xl.shape().clone()))
}

/// LayerNorm with a frozen affine.
pub(crate) fn layer_norm_fwd(
    x: &CudaStorage,
    xl: &Layout,
    gamma: &Tensor,
    beta: &Tensor,
    eps: f32,
) -> Result<(CudaStorage, Shape)> {
    dispatch!(
        x.dtype(),
        "frozen-layer-norm",
        layer_norm_fwd_t(x, xl, gamma, beta, eps)
    )
}

fn layer_norm_bwd_t<T: Elem>(
    x: &CudaStorage,
    xl: &Layout,
    g: &CudaStorage,
    gl: &Layout,
    gamma: &Tensor,
    eps: f32,
) -> Result<(CudaStorage, Shape)> {
    const OP: &str = "frozen-layer-norm-backward";
    let dev = x.device();
    let h = gamma.elem_count();
    let rows = xl.shape().elem_count() / h;
    let xv = view::<T>(x, xl, OP)?;
    let gv = view::<T>(g, gl, OP)?;
    let (gs, gml) = gamma.storage_and_layout();
    let gamv = tensor_view::<T>(&gs, gml, OP)?;
    let mut dx = alloc::<T>(dev, rows * h)?;
    let hh = h as i32;
    launch!(
        dev,
        T,
        "layer_norm_bwd",
        rows_cfg(rows, h),
        &xv,
        &gv,
        &gamv,
        &mut dx,
        &hh,
        &eps
    )?;
    Ok((storage(dx, dev), xl.shape().clone()))
}

/// The input gradient of LayerNorm with a frozen affine.
pub(crate) fn layer_norm_bwd(
    x: &CudaStorage,
    xl: &Layout,
    g: &CudaStorage,
    gl: &Layout,
    gamma: &Tensor,
    eps: f32,
) -> Result<(CudaStorage, Shape)> {
    dispatch!(
        x.dtype(),
        "frozen-layer-norm-backward",
        layer_norm_bwd_t(x, xl, g, gl, gamma, eps)
    )
}

/// Launches `kernel` (`masked_softmax`, or `masked_softmax_from_f32` for f32 scores) over `rows`
/// rows of `keys` scores from `x` into `y`, adding the f32 `(batch, keys)` mask if there is one.
pub(super) fn launch_masked_softmax<T: Elem, TX: Elem>(
    dev: &CudaDevice,
    kernel: &str,
    x: &CudaView<'_, TX>,
    mask: Option<&Tensor>,
    y: &mut CudaSlice<T>,
    (rows, keys, rows_per_batch): (usize, usize, usize),
    scale: f32,
) -> Result<()> {
    let (kk, rpb) = (keys as i32, rows_per_batch as i32);
    let cfg = rows_cfg(rows, keys);
    match mask {
        Some(mask) => {
            let (ms, ml) = mask.storage_and_layout();
            let mv = tensor_view::<f32>(&ms, ml, kernel)?;
            launch!(dev, T, kernel, cfg, x, &mv, y, &kk, &rpb, &scale)
        }
        None => {
            let null: u64 = 0;
            launch!(dev, T, kernel, cfg, x, &null, y, &kk, &rpb, &scale)
        }
    }
}

/// Launches `dropout_apply` for element type `T`: `y = x ⊙ mask(seed)` over `n` elements.
pub(super) fn launch_dropout<T: Elem>(
    dev: &CudaDevice,
    x: &CudaView<'_, T>,
    y: &mut CudaSlice<T>,
    n: usize,
    (seed, keep): (u64, f32),
) -> Result<()> {
    let total = n as i64;
    launch!(
        dev,
        T,
        "dropout_apply",
        elementwise_cfg(n),
        x,
        y,
        &total,
        &seed,
        &keep
    )
}

fn masked_softmax_t<T: Elem>(
    x: &CudaStorage,
    xl: &Layout,
    mask: Option<&Tensor>,
    rows_per_batch: usize,
    scale: f32,
) -> Result<(CudaStorage, Shape)> {
    const OP: &str = "masked-softmax";
    let dev = x.device();
    let keys = *xl.dims().last().unwrap_or(&1);
    let rows = xl.shape().elem_count() / keys.max(1);
    let xv = view::<T>(x, xl, OP)?;
    let mut y = alloc::<T>(dev, rows * keys)?;
    launch_masked_softmax::<T, T>(
        dev,
        "masked_softmax",
        &xv,
        mask,
        &mut y,
        (rows, keys, rows_per_batch),
        scale,
    )?;
    Ok((storage(y, dev), xl.shape().clone()))
}

/// `softmax(scale·x + mask)` over the last dimension; the mask (f32, batch × keys) may be absent.
pub(crate) fn masked_softmax(
    x: &CudaStorage,
    xl: &Layout,
    mask: Option<&Tensor>,
    rows_per_batch: usize,
    scale: f32,
) -> Result<(CudaStorage, Shape)> {
    dispatch!(
        x.dtype(),
        "masked-softmax",
        masked_softmax_t(x, xl, mask, rows_per_batch, scale)
    )
}

fn softmax_bwd_t<T: Elem>(
    p: &CudaStorage,
    pl: &Layout,
    g: &CudaStorage,
    gl: &Layout,
    scale: f32,
) -> Result<(CudaStorage, Shape)> {
    const OP: &str = "softmax-backward";
    let dev = p.device();
    let keys = *pl.dims().last().unwrap_or(&1);
    let rows = pl.shape().elem_count() / keys.max(1);
    let pv = view::<T>(p, pl, OP)?;
    let gv = view::<T>(g, gl, OP)?;
    let mut dx = alloc::<T>(dev, rows * keys)?;
    let kk = keys as i32;
    launch!(
        dev,
        T,
        "softmax_bwd",
        rows_cfg(rows, keys),
        &pv,
        &gv,
        &mut dx,
        &kk,
        &scale
    )?;
    Ok((storage(dx, dev), pl.shape().clone()))
}

/// `scale · p ⊙ (g − Σ g⊙p)` over the last dimension.
pub(crate) fn softmax_bwd(
    p: &CudaStorage,
    pl: &Layout,
    g: &CudaStorage,
    gl: &Layout,
    scale: f32,
) -> Result<(CudaStorage, Shape)> {
    dispatch!(
        p.dtype(),
        "softmax-backward",
        softmax_bwd_t(p, pl, g, gl, scale)
    )
}

fn dropout_apply_t<T: Elem>(
    x: &CudaStorage,
    xl: &Layout,
    seed: u64,
    keep: f32,
) -> Result<(CudaStorage, Shape)> {
    let dev = x.device();
    let xv = view::<T>(x, xl, "dropout")?;
    let n = xl.shape().elem_count();
    let mut y = alloc::<T>(dev, n)?;
    launch_dropout::<T>(dev, &xv, &mut y, n, (seed, keep))?;
    Ok((storage(y, dev), xl.shape().clone()))
}

/// `x ⊙ mask(seed)` with the mask computed on the fly (dropout forward and backward).
pub(crate) fn dropout_apply(
    x: &CudaStorage,
    xl: &Layout,
    seed: u64,
    keep: f32,
) -> Result<(CudaStorage, Shape)> {
    dispatch!(x.dtype(), "dropout", dropout_apply_t(x, xl, seed, keep))
}

/// The in-place passes of the AdamW update on f32 CUDA tensors (see kernels/peft_ops.cu).
pub mod adamw {
    use super::*;

    fn f32_mut<'a>(
        s: &'a mut CudaStorage,
        l: &Layout,
    ) -> Result<candle_core::cuda_backend::cudarc::driver::CudaViewMut<'a, f32>> {
        let Some((a, b)) = l.contiguous_offsets() else {
            candle_core::bail!("adamw: state must be contiguous")
        };
        Ok(s.as_cuda_slice_mut::<f32>()?.slice_mut(a..b))
    }

    /// `m ← m + w·(g·gscale − m)` (torch's lerp).
    pub fn first_moment(
        m: &mut CudaStorage,
        ml: &Layout,
        g: &CudaStorage,
        gl: &Layout,
        w: f32,
        gscale: f32,
    ) -> Result<()> {
        let dev = m.device().clone();
        let gv = view::<f32>(g, gl, "adamw")?;
        let n = ml.shape().elem_count();
        let mut mv = f32_mut(m, ml)?;
        let total = n as i64;
        launch!(
            &dev,
            f32,
            "adamw_m",
            elementwise_cfg(n),
            &mut mv,
            &gv,
            &total,
            &w,
            &gscale
        )
    }

    /// `v ← v·b2 + (1−b2)·(g·gscale)²`.
    pub fn second_moment(
        v: &mut CudaStorage,
        vl: &Layout,
        g: &CudaStorage,
        gl: &Layout,
        (b2, one_minus_b2): (f32, f32),
        gscale: f32,
    ) -> Result<()> {
        let dev = v.device().clone();
        let gv = view::<f32>(g, gl, "adamw")?;
        let n = vl.shape().elem_count();
        let mut vv = f32_mut(v, vl)?;
        let total = n as i64;
        launch!(
            &dev,
            f32,
            "adamw_v",
            elementwise_cfg(n),
            &mut vv,
            &gv,
            &total,
            &b2,
            &one_minus_b2,
            &gscale
        )
    }

    /// `p ← p·decay + nss·m / (sqrt(v)/bc2s + eps)`.
    #[allow(clippy::too_many_arguments)]
    pub fn param(
        p: &mut CudaStorage,
        pl: &Layout,
        m: &CudaStorage,
        ml: &Layout,
        v: &CudaStorage,
        vl: &Layout,
        (decay, bc2s, eps, nss): (f32, f32, f32, f32),
    ) -> Result<()> {
        let dev = p.device().clone();
        let mv = view::<f32>(m, ml, "adamw")?;
        let vv = view::<f32>(v, vl, "adamw")?;
        let n = pl.shape().elem_count();
        let mut pv = f32_mut(p, pl)?;
        let total = n as i64;
        launch!(
            &dev,
            f32,
            "adamw_p",
            elementwise_cfg(n),
            &mut pv,
            &mv,
            &vv,
            &total,
            &decay,
            &bc2s,
            &eps,
            &nss
        )
    }
}

#[allow(clippy::too_many_arguments)]
fn multi_lora_linear_t<T: Elem>(
    x: &CudaStorage,
    xl: &Layout,
    idx: &CudaStorage,
    il: &Layout,
    weight: &Tensor,
    bias: Option<&Tensor>,
    stack: &super::multi_lora::LoraStack,
) -> Result<(CudaStorage, Shape)> {
    const OP: &str = "multi-lora-linear";
    let (m, k) = xl.shape().dims2()?;
    let (adapters, r, _) = stack.a.dims3()?;
    let n = weight.dims()[0];
    let dev = x.device();
    let xv = view::<T>(x, xl, OP)?;
    let iv = view::<u32>(idx, il, OP)?;
    let mut y = linear_into::<T>(dev, &xv, weight, bias, (m, n, k), OP)?;
    let (as_, al) = stack.a.storage_and_layout();
    let av = tensor_view::<T>(&as_, al, OP)?;
    let (bs, bl) = stack.b.storage_and_layout();
    let bv = tensor_view::<T>(&bs, bl, OP)?;
    let (ss, sl) = stack.scales.storage_and_layout();
    let sv = tensor_view::<f32>(&ss, sl, OP)?;
    let mut u = alloc::<f32>(dev, m * r)?;
    let (kk, rr, nn, na) = (k as i32, r as i32, n as i32, adapters as i32);
    let shrink = LaunchConfig {
        grid_dim: (m as u32, 1, 1),
        block_dim: (32 * r.clamp(1, 8) as u32, 1, 1),
        shared_mem_bytes: 0,
    };
    launch!(
        dev,
        T,
        "bgmv_shrink",
        shrink,
        &xv,
        &av,
        &iv,
        &mut u,
        &kk,
        &rr,
        &na
    )?;
    let expand = LaunchConfig {
        grid_dim: (n.div_ceil(128) as u32, m as u32, 1),
        block_dim: (128, 1, 1),
        shared_mem_bytes: 0,
    };
    launch!(
        dev,
        T,
        "bgmv_expand",
        expand,
        &u,
        &bv,
        &sv,
        &iv,
        &mut y,
        &nn,
        &rr,
        &na
    )?;
    Ok((storage(y, dev), Shape::from((m, n))))
}

/// Base linear plus each row's own adapter from the stack (BGMV).
pub(crate) fn multi_lora_linear(
    x: &CudaStorage,
    xl: &Layout,
    idx: &CudaStorage,
    il: &Layout,
    weight: &Tensor,
    bias: Option<&Tensor>,
    stack: &super::multi_lora::LoraStack,
) -> Result<(CudaStorage, Shape)> {
    dispatch!(
        x.dtype(),
        "multi-lora-linear",
        multi_lora_linear_t(x, xl, idx, il, weight, bias, stack)
    )
}
