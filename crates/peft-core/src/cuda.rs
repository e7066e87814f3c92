//! The CUDA side of peft-core's custom ops: the project's kernels (`kernels/peft_ops.cu`, compiled
//! to PTX by build.rs) and row-major cuBLAS GEMMs that can accumulate into their output, all on
//! candle's own stream, so they order with candle's kernels without extra synchronisation.

use candle_core::cuda_backend::cudarc::cublas::sys::{
    cublasComputeType_t, cublasGemmAlgo_t, cublasOperation_t, cudaDataType,
};
use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, CudaView, DevicePtr, DevicePtrMut, DeviceRepr, LaunchConfig,
};
use candle_core::cuda_backend::{CudaDType, CudaDevice, WrapErr};
use candle_core::{CudaStorage, Layout, Result};

pub(crate) const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/peft_ops.ptx"));

/// An element type the kernels are instantiated for: f32 or bf16.
pub(crate) trait Elem: CudaDType + DeviceRepr + Copy + Send + Sync + 'static {
    /// The kernel-name suffix.
    const SUFFIX: &'static str;
    /// cuBLAS's name for the type.
    const CUDA_TYPE: cudaDataType;
}

impl Elem for f32 {
    const SUFFIX: &'static str = "f32";
    const CUDA_TYPE: cudaDataType = cudaDataType::CUDA_R_32F;
}

impl Elem for u32 {
    const SUFFIX: &'static str = "u32";
    const CUDA_TYPE: cudaDataType = cudaDataType::CUDA_R_32U;
}

impl Elem for half::bf16 {
    const SUFFIX: &'static str = "bf16";
    const CUDA_TYPE: cudaDataType = cudaDataType::CUDA_R_16BF;
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

/// The contiguous device elements of a tensor held by a storage guard
/// (`tensor.storage_and_layout()`), or an error naming `op`.
pub(crate) fn tensor_view<'a, T: Elem>(
    s: &'a candle_core::Storage,
    l: &Layout,
    op: &str,
) -> Result<CudaView<'a, T>> {
    match s {
        candle_core::Storage::Cuda(c) => view::<T>(c, l, op),
        _ => candle_core::bail!("{op}: an operand is not on the CUDA device"),
    }
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
    A: DevicePtr<T>,
    B: DevicePtr<T>,
    C: DevicePtrMut<T>,
{
    let ld = |op: Op, rows: usize, cols: usize| match op {
        Op::N => cols,
        Op::T => rows,
    };
    let sa = Strided {
        op: op_a,
        ld: ld(op_a, m, k),
        stride: 0,
    };
    let sb = Strided {
        op: op_b,
        ld: ld(op_b, k, n),
        stride: 0,
    };
    gemm_batched::<T, T, _, _, _>(dev, (1, m, n, k), alpha, (a, sa), (b, sb), beta, (c, n, 0))
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
/// where each matrix may be a column block of a wider row-major buffer (row stride `ld`). Inputs
/// are `T`, the output `TC` (e.g. bf16 inputs with f32 scores), accumulation in f32; `alpha` and
/// `beta` are applied in f32 (exact LoRA scales in bf16).
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm_batched<T: Elem, TC: Elem, A, B, C>(
    dev: &CudaDevice,
    (batch, m, n, k): (usize, usize, usize, usize),
    alpha: f32,
    (a, sa): (&A, Strided),
    (b, sb): (&B, Strided),
    beta: f32,
    (c, ldc, stride_c): (&mut C, usize, usize),
) -> Result<()>
where
    A: DevicePtr<T>,
    B: DevicePtr<T>,
    C: DevicePtrMut<TC>,
{
    let op = |o: Op| match o {
        Op::N => cublasOperation_t::CUBLAS_OP_N,
        Op::T => cublasOperation_t::CUBLAS_OP_T,
    };
    let blas = dev.cublas_handle();
    let stream = dev.cuda_stream();
    let (a_ptr, _a_sync) = a.device_ptr(&stream);
    let (b_ptr, _b_sync) = b.device_ptr(&stream);
    let (c_ptr, _c_sync) = c.device_ptr_mut(&stream);
    // cuBLAS is column-major: compute Cᵀ = op(B)ᵀ·op(A)ᵀ. A row-major r×c buffer is a
    // column-major c×r matrix, i.e. the transpose, so an operand used as stored needs no cuBLAS
    // transpose and a transposed one needs one; a row stride is a leading dimension.
    // Safety: callers size the buffers from the same dims, strides and leading dimensions, and
    // the handle runs on candle's stream, which the pointers were taken for.
    unsafe {
        candle_core::cuda_backend::cudarc::cublas::result::gemm_strided_batched_ex(
            *blas.handle(),
            op(sb.op),
            op(sa.op),
            n as i32,
            m as i32,
            k as i32,
            (&alpha) as *const f32 as *const _,
            b_ptr as *const _,
            T::CUDA_TYPE,
            sb.ld as i32,
            sb.stride as i64,
            a_ptr as *const _,
            T::CUDA_TYPE,
            sa.ld as i32,
            sa.stride as i64,
            (&beta) as *const f32 as *const _,
            c_ptr as *mut _,
            TC::CUDA_TYPE,
            ldc as i32,
            stride_c as i64,
            batch as i32,
            cublasComputeType_t::CUBLAS_COMPUTE_32F,
            cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
        )
    }
    .w()
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
