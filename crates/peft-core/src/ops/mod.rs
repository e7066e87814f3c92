//! Custom ops whose backward computes no gradient for frozen operands, with CPU fast paths.

mod amx;
mod attention;
mod batch_norm;
mod clamp_act;
mod cpu_attention;
#[cfg(feature = "cuda")]
mod cuda_attention;
#[cfg(feature = "cuda")]
mod cuda_ops;
mod depthwise;
mod dropout;
mod frozen_gemm;
mod frozen_linear;
mod gelu;
mod gemm;
mod layer_norm;
mod lora_linear;
mod mkl;
mod multi_lora;
mod softmax;
mod trainable_linear;
mod vmath;

pub use attention::{attention, attention_reference, AttentionSpec};
pub use batch_norm::{
    affine_act, batch_norm_train, batch_norm_train_reference, BatchStats, ClampAct,
};
pub use clamp_act::clamp_activation;
#[cfg(feature = "cuda")]
pub use cuda_ops::adamw as cuda_adamw;
pub use depthwise::{depthwise_conv2d, depthwise_conv2d_reference};
pub use dropout::{apply_seeded_dropout, dropout_mask, Dropout, DropoutRng};
pub use frozen_gemm::{frozen_matmul_precision, set_frozen_matmul_precision, MatmulPrecision};
pub use frozen_linear::frozen_linear;
pub use gelu::gelu;
pub use layer_norm::layer_norm;
pub use lora_linear::{lora_linear, lora_linear_reference, LoraBranch};
pub use mkl::{f32_gemm_backend, MKL_ENV};
pub use multi_lora::{multi_lora_linear, multi_lora_linear_reference, LoraStack, NO_ADAPTER};
pub use softmax::masked_softmax;
pub use trainable_linear::{trainable_linear, trainable_linear_reference};

/// The largest absolute difference between two tensors of the same shape (the ops' tests).
#[cfg(test)]
fn max_abs_diff(a: &candle_core::Tensor, b: &candle_core::Tensor) -> f32 {
    (a - b)
        .and_then(|d| d.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>())
        .expect("same shapes")
}

/// The f32 values of a contiguous CPU tensor, or an error naming `op`.
fn contiguous_f32<'a>(
    s: &'a candle_core::CpuStorage,
    l: &candle_core::Layout,
    op: &str,
) -> candle_core::Result<&'a [f32]> {
    let candle_core::CpuStorage::F32(v) = s else {
        candle_core::bail!("{op}: only f32 is supported on the CPU path")
    };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&v[a..b]),
        None => candle_core::bail!("{op}: input must be contiguous"),
    }
}

/// The f32 values of a contiguous tensor's storage, or an error naming `op` when it is not on
/// the CPU.
fn cpu_f32<'a>(
    storage: &'a candle_core::Storage,
    layout: &candle_core::Layout,
    op: &str,
) -> candle_core::Result<&'a [f32]> {
    match storage {
        candle_core::Storage::Cpu(c) => contiguous_f32(c, layout, op),
        _ => candle_core::bail!("{op}: a tensor is not on the CPU"),
    }
}

/// Runs `f` on the f32 values of a CPU tensor, in place when it is contiguous (a copy otherwise).
fn with_f32<R>(t: &candle_core::Tensor, f: impl FnOnce(&[f32]) -> R) -> candle_core::Result<R> {
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    match &*storage {
        candle_core::Storage::Cpu(cpu) => Ok(f(contiguous_f32(cpu, layout, "cpu op")?)),
        _ => candle_core::bail!("a CPU op got a tensor on another device"),
    }
}

/// An output buffer of `len` f32 that `fill` writes in full, allocated without the zero-fill of
/// `vec![0.0; len]`: that memset was 9% of a MobileNetV2 training step, every activation-sized
/// output paying for a pass that its kernel overwrites at once.
///
/// # Safety
/// `fill` must write every one of the `len` elements, and read none before writing it. (A
/// `&mut [f32]` over uninitialised memory is only a problem if it is read: f32 has no invalid
/// bit patterns and nothing else may observe the buffer before it is returned.)
unsafe fn written_f32(len: usize, fill: impl FnOnce(&mut [f32])) -> Vec<f32> {
    // SAFETY: the caller's guarantee, for a fill that cannot fail.
    let fill = |slots: &mut [f32]| {
        fill(slots);
        Ok::<(), std::convert::Infallible>(())
    };
    let written = unsafe { try_written_f32(len, fill) };
    match written {
        Ok(out) => out,
        Err(never) => match never {},
    }
}

/// [`written_f32`] for a fill that can fail (a GEMM checking its operands): on an error the
/// buffer is freed without ever being read.
///
/// # Safety
/// Where `fill` returns `Ok`, it must have written every one of the `len` elements, reading
/// none before writing it.
unsafe fn try_written_f32<E>(
    len: usize,
    fill: impl FnOnce(&mut [f32]) -> Result<(), E>,
) -> Result<Vec<f32>, E> {
    let mut out = Vec::<f32>::with_capacity(len);
    // SAFETY: the capacity holds `len` properly aligned f32 slots owned by `out`.
    let slots = unsafe { std::slice::from_raw_parts_mut(out.as_mut_ptr(), len) };
    fill(slots)?;
    // SAFETY: `fill` succeeded, so by the caller's guarantee all `len` elements are written.
    unsafe { out.set_len(len) };
    Ok(out)
}

/// Whether the fused kernels handle `x`: f32 on the CPU, f32 or bf16 on CUDA.
fn fused_kernels(x: &candle_core::Tensor) -> bool {
    fused_for(x.dtype(), x.device())
}

/// Whether the fused kernels handle tensors of `dtype` on `device`.
fn fused_for(dtype: candle_core::DType, device: &candle_core::Device) -> bool {
    match dtype {
        candle_core::DType::F32 => device.is_cpu() || device.is_cuda(),
        candle_core::DType::BF16 => device.is_cuda(),
        _ => false,
    }
}

/// `(rows, last)` of a contiguous layout of any rank, and the same memory as a 2-D layout: the
/// linear ops take `(..., in)` inputs without reshape nodes in the autograd graph.
fn as_rows(l: &candle_core::Layout) -> candle_core::Result<(usize, usize, candle_core::Layout)> {
    let last = *l.dims().last().unwrap_or(&1);
    let rows = l.shape().elem_count() / last.max(1);
    if !l.is_contiguous() {
        candle_core::bail!("linear op: input must be contiguous")
    }
    Ok((
        rows,
        last,
        candle_core::Layout::contiguous_with_offset((rows, last), l.start_offset()),
    ))
}

/// `shape` with its last dimension replaced by `n`.
fn with_last(shape: &candle_core::Shape, n: usize) -> candle_core::Shape {
    let mut dims = shape.dims().to_vec();
    if let Some(last) = dims.last_mut() {
        *last = n;
    }
    candle_core::Shape::from(dims)
}
