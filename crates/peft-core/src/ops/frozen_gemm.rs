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

/// `lhs · B` on AMX, `lhs` (`m × k`, f32, contiguous) and B a view of the weight.
fn amx_product(
    lhs: &CpuStorage,
    lhs_l: &Layout,
    b: MatRef<'_>,
    op: &str,
) -> candle_core::Result<CpuStorage> {
    let (m, k) = lhs_l.shape().dims2()?;
    let x = contiguous_f32(lhs, lhs_l, op)?;
    let n = b.cols;
    let mut out = vec![0f32; m * n];
    let dst = MatMut {
        data: &mut out,
        rows: m,
        cols: n,
        row_stride: n,
    };
    amx::gemm_bf16(dst, MatRef::new(x, m, k), &PackedB::pack(b), false)?;
    Ok(CpuStorage::F32(out))
}

/// `x·Wᵀ` for `x` (`m × k`, the 2-D layout `x_l`) and `weight` (`n × k`): `m × n`.
pub(super) fn times_weight_t(
    x: &CpuStorage,
    x_l: &Layout,
    weight: &Tensor,
    op: &str,
) -> candle_core::Result<CpuStorage> {
    times(x, x_l, weight, true, op)
}

/// `g·W` for `g` (`m × n`, the 2-D layout `g_l`) and `weight` (`n × k`): `m × k`.
pub(super) fn times_weight(
    g: &CpuStorage,
    g_l: &Layout,
    weight: &Tensor,
    op: &str,
) -> candle_core::Result<CpuStorage> {
    times(g, g_l, weight, false, op)
}

/// `lhs·Wᵀ` (`transpose`) or `lhs·W` for `lhs` (`m × inner`, the 2-D layout `lhs_l`).
fn times(
    lhs: &CpuStorage,
    lhs_l: &Layout,
    weight: &Tensor,
    transpose: bool,
    op: &str,
) -> candle_core::Result<CpuStorage> {
    let (m, inner) = lhs_l.shape().dims2()?;
    let (rows, cols) = weight.dims2()?;
    let (w_storage, w_l) = weight.storage_and_layout();
    if matches!(lhs, CpuStorage::F32(_)) && lhs_l.is_contiguous() && on_amx(weight) {
        let w = MatRef::new(super::cpu_f32(&w_storage, w_l, op)?, rows, cols);
        return amx_product(lhs, lhs_l, if transpose { w.t() } else { w }, op);
    }
    if let (CpuStorage::F32(_), Storage::Cpu(CpuStorage::F32(_))) = (lhs, &*w_storage) {
        if lhs_l.is_contiguous() && w_l.is_contiguous() {
            // The f32 GEMM (MKL when loaded, else the `gemm` crate).
            let w = MatRef::new(super::cpu_f32(&w_storage, w_l, op)?, rows, cols);
            let b = if transpose { w.t() } else { w };
            let x = MatRef::new(contiguous_f32(lhs, lhs_l, op)?, m, inner);
            let mut out = vec![0f32; m * b.cols];
            let dst = MatMut {
                data: &mut out,
                rows: m,
                cols: b.cols,
                row_stride: b.cols,
            };
            super::gemm::gemm_into(dst, x, b, 1.0, false, true)?;
            return Ok(CpuStorage::F32(out));
        }
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
