//! The CUDA side of peft-core's custom ops: the project's kernels (`kernels/peft_ops.cu`, compiled
//! to PTX by build.rs) and row-major cuBLAS GEMMs that can accumulate into their output, all on
//! candle's own stream, so they order with candle's kernels without extra synchronisation.

use candle_core::cuda_backend::cudarc::cublas::{sys::cublasOperation_t, Gemm, GemmConfig};
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaView, DeviceRepr, LaunchConfig};
use candle_core::cuda_backend::{CudaDType, CudaDevice, WrapErr};
use candle_core::{CudaStorage, Layout, Result};

pub(crate) const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/peft_ops.ptx"));

/// An element type the kernels are instantiated for: f32 or bf16.
pub(crate) trait Elem: CudaDType + DeviceRepr + Copy + Send + Sync + 'static {
    /// The kernel-name suffix.
    const SUFFIX: &'static str;
    /// `v` in this type.
    fn from_f32(v: f32) -> Self;
}

impl Elem for f32 {
    const SUFFIX: &'static str = "f32";
    fn from_f32(v: f32) -> Self {
        v
    }
}

impl Elem for u32 {
    const SUFFIX: &'static str = "u32";
    fn from_f32(v: f32) -> Self {
        v as u32
    }
}

impl Elem for half::bf16 {
    const SUFFIX: &'static str = "bf16";
    fn from_f32(v: f32) -> Self {
        half::bf16::from_f32(v)
    }
}

/// The name of kernel `name` for element type `T` in the PTX module.
pub(crate) fn kernel_name<T: Elem>(name: &str) -> String {
    format!("{name}_{}", T::SUFFIX)
}

/// Grid-stride launch over `n` elements.
pub(crate) fn elementwise_cfg(n: usize) -> LaunchConfig {
    let blocks = n.div_ceil(256).clamp(1, 132 * 32) as u32;
    LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// One block per row of `width` elements.
pub(crate) fn rows_cfg(rows: usize, width: usize) -> LaunchConfig {
    let threads = width.div_ceil(32).clamp(1, 32) * 32;
    let threads = threads.min(if width >= 2048 { 1024 } else { 256 });
    LaunchConfig {
        grid_dim: (rows as u32, 1, 1),
        block_dim: (threads as u32, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// The contiguous elements of `s` under layout `l`.
pub(crate) fn view<'a, T: Elem>(
    s: &'a CudaStorage,
    l: &Layout,
    op: &str,
) -> Result<CudaView<'a, T>> {
    let Some((start, end)) = l.contiguous_offsets() else {
        candle_core::bail!("{op}: input must be contiguous")
    };
    Ok(s.as_cuda_slice::<T>()?.slice(start..end))
}

/// An uninitialised device buffer of `n` elements.
pub(crate) fn alloc<T: Elem>(dev: &CudaDevice, n: usize) -> Result<CudaSlice<T>> {
    // Safety: every caller writes all `n` elements (a kernel or a GEMM with beta = 0) first.
    unsafe { dev.alloc::<T>(n) }
}

/// Which operand is stored transposed, in row-major terms.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Op {
    /// Used as stored.
    N,
    /// Used transposed.
    T,
}

/// Row-major `C (m×n) = alpha · op(A) · op(B) + beta · C`, with `op(A)` of shape `m×k` and
/// `op(B)` of shape `k×n`; `A` is stored `m×k` (`Op::N`) or `k×m` (`Op::T`), likewise `B`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm<T: Elem, A, B, C>(
    dev: &CudaDevice,
    (m, n, k): (usize, usize, usize),
    alpha: f32,
    a: &A,
    op_a: Op,
    b: &B,
    op_b: Op,
    beta: f32,
    c: &mut C,
) -> Result<()>
where
    candle_core::cuda_backend::cudarc::cublas::CudaBlas: Gemm<T>,
    A: candle_core::cuda_backend::cudarc::driver::DevicePtr<T>,
    B: candle_core::cuda_backend::cudarc::driver::DevicePtr<T>,
    C: candle_core::cuda_backend::cudarc::driver::DevicePtrMut<T>,
{
    // cuBLAS is column-major: compute Cᵀ (n×m) = op(B)ᵀ · op(A)ᵀ. A row-major r×c buffer is a
    // column-major c×r matrix, i.e. the transpose, so the row-major "as stored" operand needs no
    // cuBLAS transpose and the row-major transposed one needs one.
    let (tb, ldb) = match op_b {
        Op::N => (cublasOperation_t::CUBLAS_OP_N, n),
        Op::T => (cublasOperation_t::CUBLAS_OP_T, k),
    };
    let (ta, lda) = match op_a {
        Op::N => (cublasOperation_t::CUBLAS_OP_N, k),
        Op::T => (cublasOperation_t::CUBLAS_OP_T, m),
    };
    let cfg = GemmConfig {
        transa: tb,
        transb: ta,
        m: n as i32,
        n: m as i32,
        k: k as i32,
        alpha: T::from_f32(alpha),
        lda: ldb as i32,
        ldb: lda as i32,
        beta: T::from_f32(beta),
        ldc: n as i32,
    };
    // Safety: the shapes above describe the buffers, which callers size from the same dims.
    unsafe { dev.cublas_handle().gemm(cfg, b, a, c) }.w()
}

/// One operand of [`gemm_batched`]: a row-major matrix (row stride `ld`) per batch item, items
/// `stride` elements apart, used as stored or transposed.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Strided {
    pub op: Op,
    pub ld: usize,
    pub stride: usize,
}

/// Row-major, strided-batched `C_i (m×n) = alpha · op(A_i)·op(B_i) + beta · C_i`, `i < batch`,
/// where each matrix may be a column block of a wider row-major buffer (row stride `ld`).
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm_batched<T: Elem, A, B, C>(
    dev: &CudaDevice,
    (batch, m, n, k): (usize, usize, usize, usize),
    alpha: f32,
    (a, sa): (&A, Strided),
    (b, sb): (&B, Strided),
    beta: f32,
    (c, ldc, stride_c): (&mut C, usize, usize),
) -> Result<()>
where
    candle_core::cuda_backend::cudarc::cublas::CudaBlas: Gemm<T>,
    A: candle_core::cuda_backend::cudarc::driver::DevicePtr<T>,
    B: candle_core::cuda_backend::cudarc::driver::DevicePtr<T>,
    C: candle_core::cuda_backend::cudarc::driver::DevicePtrMut<T>,
{
    use candle_core::cuda_backend::cudarc::cublas::StridedBatchedConfig;
    let op = |o: Op| match o {
        Op::N => cublasOperation_t::CUBLAS_OP_N,
        Op::T => cublasOperation_t::CUBLAS_OP_T,
    };
    // As in `gemm`: Cᵀ = op(B)ᵀ·op(A)ᵀ in column-major terms; a row stride is a leading dimension.
    let cfg = StridedBatchedConfig {
        gemm: GemmConfig {
            transa: op(sb.op),
            transb: op(sa.op),
            m: n as i32,
            n: m as i32,
            k: k as i32,
            alpha: T::from_f32(alpha),
            lda: sb.ld as i32,
            ldb: sa.ld as i32,
            beta: T::from_f32(beta),
            ldc: ldc as i32,
        },
        batch_size: batch as i32,
        stride_a: sb.stride as i64,
        stride_b: sa.stride as i64,
        stride_c: stride_c as i64,
    };
    // Safety: callers size the buffers from the same dims, strides and leading dimensions.
    unsafe { dev.cublas_handle().gemm_strided_batched(cfg, b, a, c) }.w()
}

/// Launches kernel `$name` for element type `$T` on `$dev`'s stream with the given arguments.
macro_rules! launch {
    ($dev:expr, $T:ty, $name:expr, $cfg:expr, $($arg:expr),+ $(,)?) => {{
        use candle_core::cuda_backend::cudarc::driver::PushKernelArg as _;
        let func = $dev.get_or_load_custom_func(
            &$crate::cuda::kernel_name::<$T>($name),
            "peft_ops",
            $crate::cuda::PTX,
        )?;
        let mut builder = func.builder();
        $( builder.arg($arg); )+
        // Safety: the argument list matches the kernel's signature in kernels/peft_ops.cu.
        unsafe { builder.launch($cfg) }.map(|_| ()).w()
    }};
}
pub(crate) use launch;

/// Wraps `slice` as candle storage on `dev`.
pub(crate) fn storage<T: Elem>(slice: CudaSlice<T>, dev: &CudaDevice) -> CudaStorage {
    CudaStorage::wrap_cuda_slice(slice, dev.clone())
}
