//! A checked f32 GEMM that accumulates into its output (`C += s·A·B`), over the `gemm` crate that
//! candle's CPU matmul uses. candle's `matmul` always writes a fresh buffer, so adding a product to
//! an existing one (a LoRA update onto the base output, the adapter's share of an input gradient)
//! would cost a full-size temporary and an extra pass.

use gemm::Parallelism;

/// A row-major view of an `rows × cols` matrix inside a slice, with explicit strides (a
/// transpose is the same data with the strides swapped).
#[derive(Clone, Copy, Debug)]
pub(crate) struct MatRef<'a> {
    pub data: &'a [f32],
    pub rows: usize,
    pub cols: usize,
    pub row_stride: usize,
    pub col_stride: usize,
}

impl<'a> MatRef<'a> {
    /// A contiguous row-major matrix.
    pub fn new(data: &'a [f32], rows: usize, cols: usize) -> Self {
        Self {
            data,
            rows,
            cols,
            row_stride: cols,
            col_stride: 1,
        }
    }

    /// The transpose (no copy).
    pub fn t(self) -> Self {
        Self {
            data: self.data,
            rows: self.cols,
            cols: self.rows,
            row_stride: self.col_stride,
            col_stride: self.row_stride,
        }
    }

    fn fits(&self) -> bool {
        self.rows == 0
            || self.cols == 0
            || (self.rows - 1) * self.row_stride + (self.cols - 1) * self.col_stride
                < self.data.len()
    }
}

/// `dst += scale · lhs · rhs` for a contiguous row-major `dst` of `lhs.rows × rhs.cols`.
pub(crate) fn gemm_accumulate(
    dst: &mut [f32],
    lhs: MatRef<'_>,
    rhs: MatRef<'_>,
    scale: f32,
) -> candle_core::Result<()> {
    let (m, k, n) = (lhs.rows, lhs.cols, rhs.cols);
    if rhs.rows != k || dst.len() != m * n || !lhs.fits() || !rhs.fits() {
        candle_core::bail!(
            "gemm: {}×{} · {}×{} into {} values does not fit",
            lhs.rows,
            lhs.cols,
            rhs.rows,
            rhs.cols,
            dst.len()
        )
    }
    if m == 0 || n == 0 || k == 0 {
        return Ok(());
    }
    let parallelism = if m * n * k >= 1 << 16 {
        Parallelism::Rayon(rayon::current_num_threads())
    } else {
        Parallelism::None
    };
    // SAFETY: every index the kernel reads or writes is inside the slices: checked above for
    // lhs/rhs (`fits`) and dst (`m·n` contiguous values, row stride n, column stride 1).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            true,
            lhs.data.as_ptr(),
            lhs.col_stride as isize,
            lhs.row_stride as isize,
            rhs.data.as_ptr(),
            rhs.col_stride as isize,
            rhs.row_stride as isize,
            1.0,
            scale,
            false,
            false,
            false,
            parallelism,
        );
    }
    Ok(())
}
