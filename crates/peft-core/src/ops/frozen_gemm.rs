//! Products with a frozen weight on the CPU, `x·Wᵀ` (a linear's forward) and `g·W` (its input
//! gradient), at the process's frozen matmul precision: f32 through the `gemm` crate (candle's
//! CPU matmul), or bf16 operands with f32 sums on AMX tiles ([`super::amx`]) when asked for and
//! the CPU has them. Trainable weights (LoRA factors, fully fine-tuned layers) stay in f32.

use super::amx::{self, PackedB};
use super::contiguous_f32;
use super::gemm::{MatMut, MatRef};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, Layout, Storage, Tensor};
use std::sync::atomic::{AtomicU8, Ordering};

/// How the CPU multiplies by frozen weights.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MatmulPrecision {
    /// f32 throughout (the default).
    F32,
    /// Operands rounded to bf16 (8 significant bits), products summed in f32, on Intel AMX.
    /// Like PyTorch's `torch.set_float32_matmul_precision("medium")` on such CPUs. Without
    /// AMX the products stay f32.
    Bf16,
}

impl std::str::FromStr for MatmulPrecision {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim() {
            "f32" => Ok(Self::F32),
            "bf16" => Ok(Self::Bf16),
            other => Err(format!(
                "unknown matmul precision `{other}` (expected `f32` or `bf16`)"
            )),
        }
    }
}

static PRECISION: AtomicU8 = AtomicU8::new(0);

/// Sets how the CPU multiplies by frozen weights, for the whole process. Returns whether the
/// products will run as asked (`false` for bf16 on a CPU without AMX: they stay f32).
pub fn set_frozen_matmul_precision(precision: MatmulPrecision) -> bool {
    PRECISION.store(precision as u8, Ordering::Relaxed);
    precision == MatmulPrecision::F32 || amx::available()
}

/// The precision set by [`set_frozen_matmul_precision`].
pub fn frozen_matmul_precision() -> MatmulPrecision {
    match PRECISION.load(Ordering::Relaxed) {
        0 => MatmulPrecision::F32,
        _ => MatmulPrecision::Bf16,
    }
}

/// Whether products with `weight` go to AMX: bf16 precision asked for, AMX present, and the
/// weight a contiguous f32 CPU tensor.
fn on_amx(weight: &Tensor) -> bool {
    frozen_matmul_precision() == MatmulPrecision::Bf16
        && amx::available()
        && weight.dtype() == candle_core::DType::F32
        && weight.device().is_cpu()
        && weight.is_contiguous()
}

/// `row_init + lhs·B` for `lhs` (`m × k`, f32, contiguous) and B a view of a weight (frozen, or
/// trained: the trainable linear's forward), with `row_init` (the bias, `n` values) added to
/// every row, or nothing: on AMX when `amx`, else the f32 GEMM (MKL when loaded, else the `gemm`
/// crate). Starting from the bias and accumulating saves the zero-fill and the separate bias pass.
pub(super) fn product(
    lhs: &CpuStorage,
    lhs_l: &Layout,
    b: MatRef<'_>,
    row_init: Option<&[f32]>,
    amx: bool,
    op: &str,
) -> candle_core::Result<CpuStorage> {
    let (m, k) = lhs_l.shape().dims2()?;
    let x = MatRef::new(contiguous_f32(lhs, lhs_l, op)?, m, k);
    let n = b.cols;
    let accumulate = row_init.is_some();
    let run = |data: &mut [f32]| {
        let dst = MatMut {
            data,
            rows: m,
            cols: n,
            row_stride: n,
        };
        if amx {
            amx::gemm_bf16(dst, x, &PackedB::pack(b), accumulate)
        } else {
            super::gemm::gemm_into(dst, x, b, 1.0, accumulate, true)
        }
    };
    let out = match row_init {
        Some(init) if init.len() == n => {
            let mut out = init.repeat(m);
            run(&mut out)?;
            out
        }
        Some(init) => candle_core::bail!("{op}: {} bias values for {n} outputs", init.len()),
        // SAFETY: without `accumulate` the GEMM writes every element of the m × n dst (row
        // stride n: the whole buffer) and reads none: the gemm crate with read_dst false, MKL
        // with beta 0, AMX copying each block; a product with k = 0 is zero-filled.
        None => unsafe { super::try_written_f32(m * n, run)? },
    };
    Ok(CpuStorage::F32(out))
}

/// `x·Wᵀ` for `x` (`m × k`, the 2-D layout `x_l`) and `weight` (`n × k`): `m × n`.
pub(super) fn times_weight_t(
    x: &CpuStorage,
    x_l: &Layout,
    weight: &Tensor,
    op: &str,
) -> candle_core::Result<CpuStorage> {
    times(x, x_l, weight, true, None, op)
}

/// `b + x·Wᵀ` (`b` added to every row) for f32 `x` (`m × k`, the 2-D layout `x_l`), a weight
/// `n × k` and `n` bias values, or `None` where the fused path does not apply (other dtypes,
/// strided operands): the caller adds the bias itself then.
pub(super) fn bias_plus_times_weight_t(
    x: &CpuStorage,
    x_l: &Layout,
    weight: &Tensor,
    bias: &[f32],
    op: &str,
) -> candle_core::Result<Option<CpuStorage>> {
    let f32_operands = matches!(x, CpuStorage::F32(_))
        && x_l.is_contiguous()
        && weight.dtype() == candle_core::DType::F32
        && weight.device().is_cpu()
        && weight.is_contiguous();
    if !f32_operands {
        return Ok(None);
    }
    times(x, x_l, weight, true, Some(bias), op).map(Some)
}

/// `g·W` for `g` (`m × n`, the 2-D layout `g_l`) and `weight` (`n × k`): `m × k`.
pub(super) fn times_weight(
    g: &CpuStorage,
    g_l: &Layout,
    weight: &Tensor,
    op: &str,
) -> candle_core::Result<CpuStorage> {
    times(g, g_l, weight, false, None, op)
}

/// `row_init + lhs·Wᵀ` (`transpose`) or `row_init + lhs·W` for `lhs` (`m × inner`, the 2-D
/// layout `lhs_l`); `row_init` only where both operands are contiguous f32 on the CPU.
fn times(
    lhs: &CpuStorage,
    lhs_l: &Layout,
    weight: &Tensor,
    transpose: bool,
    row_init: Option<&[f32]>,
    op: &str,
) -> candle_core::Result<CpuStorage> {
    let (m, inner) = lhs_l.shape().dims2()?;
    let (rows, cols) = weight.dims2()?;
    let (w_storage, w_l) = weight.storage_and_layout();
    if let (CpuStorage::F32(_), Storage::Cpu(CpuStorage::F32(_))) = (lhs, &*w_storage) {
        if lhs_l.is_contiguous() && w_l.is_contiguous() {
            let w = MatRef::new(super::cpu_f32(&w_storage, w_l, op)?, rows, cols);
            let b = if transpose { w.t() } else { w };
            return product(lhs, lhs_l, b, row_init, on_amx(weight), op);
        }
    }
    if row_init.is_some() {
        candle_core::bail!("{op}: a bias start needs contiguous f32 operands")
    }
    let Storage::Cpu(w) = &*w_storage else {
        candle_core::bail!("{op}: weight is not on the CPU")
    };
    if transpose {
        lhs.matmul(w, (1, m, rows, inner), lhs_l, &w_l.transpose(0, 1)?)
    } else {
        lhs.matmul(w, (1, m, cols, inner), lhs_l, w_l)
    }
}
