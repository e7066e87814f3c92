//! A checked f32 GEMM over strided views (`C = s·A·B` or `C += s·A·B`), over the `gemm` crate that
//! candle's CPU matmul uses. candle's `matmul` always writes a fresh contiguous buffer, so adding a
//! product to an existing one (a LoRA update onto the base output, the adapter's share of an input
//! gradient) would cost a full-size temporary and an extra pass, and one head's product inside a
//! `(seq, hidden)` activation would need split and merge copies.

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

    pub(super) fn fits(&self) -> bool {
        self.rows == 0
            || self.cols == 0
            || (self.rows - 1) * self.row_stride + (self.cols - 1) * self.col_stride
                < self.data.len()
    }
}

/// A row-major mutable `rows × cols` matrix inside a slice: contiguous columns, rows `row_stride`
/// apart (a head's columns of a `(seq, hidden)` activation).
pub(crate) struct MatMut<'a> {
    pub data: &'a mut [f32],
    pub rows: usize,
    pub cols: usize,
    pub row_stride: usize,
}

impl MatMut<'_> {
    /// Settles a product with nothing to write (`rows` or `cols` 0) or nothing to sum (`k` 0,
    /// so `dst = 0` unless accumulating). Returns whether it was such a product.
    pub(super) fn settle_empty_product(&mut self, k: usize, accumulate: bool) -> bool {
        if self.rows == 0 || self.cols == 0 {
            return true;
        }
        if k > 0 {
            return false;
        }
        if !accumulate {
            for row in self.data.chunks_mut(self.row_stride).take(self.rows) {
                row[..self.cols].fill(0.0);
            }
        }
        true
    }

    pub(super) fn fits(&self) -> bool {
        self.rows == 0
            || self.cols == 0
            || (self.cols <= self.row_stride
                && (self.rows - 1) * self.row_stride + self.cols <= self.data.len())
    }
}

/// `dst += scale · lhs · rhs` for a contiguous row-major `dst` of `lhs.rows × rhs.cols`, on all
/// of rayon's threads when the product is large enough.
pub(crate) fn gemm_accumulate(
    dst: &mut [f32],
    lhs: MatRef<'_>,
    rhs: MatRef<'_>,
    scale: f32,
) -> candle_core::Result<()> {
    let (rows, cols) = (lhs.rows, rhs.cols);
    let parallel = rows * cols * lhs.cols >= 1 << 16;
    let dst = MatMut {
        data: dst,
        rows,
        cols,
        row_stride: cols,
    };
    gemm_into(dst, lhs, rhs, scale, true, parallel)
}

/// `dst = scale · lhs · rhs`, or `dst += …` when `accumulate`, on the calling thread alone
/// (`parallel = false`, for callers that run independent products in parallel themselves) or
/// on all of rayon's threads.
pub(crate) fn gemm_into(
    mut dst: MatMut<'_>,
    lhs: MatRef<'_>,
    rhs: MatRef<'_>,
    scale: f32,
    accumulate: bool,
    parallel: bool,
) -> candle_core::Result<()> {
    let (m, k, n) = (lhs.rows, lhs.cols, rhs.cols);
    if rhs.rows != k || dst.rows != m || dst.cols != n || !dst.fits() || !lhs.fits() || !rhs.fits()
    {
        candle_core::bail!(
            "gemm: {}×{} · {}×{} into {}×{} (row stride {}, {} values) does not fit",
            lhs.rows,
            lhs.cols,
            rhs.rows,
            rhs.cols,
            dst.rows,
            dst.cols,
            dst.row_stride,
            dst.data.len()
        )
    }
    if dst.settle_empty_product(k, accumulate) {
        return Ok(());
    }
    let parallelism = if parallel {
        Parallelism::Rayon(rayon::current_num_threads())
    } else {
        Parallelism::None
    };
    // SAFETY: every index the kernel reads or writes is inside the slices, as checked above
    // (`fits`: the last row's last column is within each slice). With `accumulate` false the
    // kernel does not read dst (alpha is ignored when read_dst is false).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.data.as_mut_ptr(),
            1,
            dst.row_stride as isize,
            accumulate,
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
