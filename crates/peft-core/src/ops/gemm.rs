//! A checked f32 GEMM over strided views (`C = s·A·B` or `C += s·A·B`), over the `gemm` crate that
//! candle's CPU matmul uses. candle's `matmul` always writes a fresh contiguous buffer, so adding a
//! product to an existing one (a LoRA update onto the base output, the adapter's share of an input
//! gradient) would cost a full-size temporary and an extra pass, and one head's product inside a
//! `(seq, hidden)` activation would need split and merge copies.

use gemm::Parallelism;
use rayon::prelude::*;

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
    if super::mkl::takes(&lhs, &rhs) {
        mkl_rows(dst, lhs, rhs, scale, accumulate, parallel);
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

/// `scale · lhs · rhs` into a new contiguous `lhs.rows × rhs.cols` buffer, on all of rayon's
/// threads, without zero-filling the buffer first.
pub(crate) fn gemm_new(
    lhs: MatRef<'_>,
    rhs: MatRef<'_>,
    scale: f32,
) -> candle_core::Result<Vec<f32>> {
    let (rows, cols) = (lhs.rows, rhs.cols);
    let product = |data: &mut [f32]| {
        let dst = MatMut {
            data,
            rows,
            cols,
            row_stride: cols,
        };
        gemm_into(dst, lhs, rhs, scale, false, true)
    };
    // SAFETY: without `accumulate`, gemm_into writes every element of the contiguous rows × cols
    // dst (row stride = cols: the whole buffer) and reads none: the gemm crate with read_dst
    // false, MKL with beta 0, and a product with k = 0 zero-filled by settle_empty_product.
    unsafe { super::try_written_f32(rows * cols, product) }
}

/// The product on MKL, its rows split evenly over rayon's threads when `parallel` (MKL itself
/// runs sequentially). The views were checked to fit.
fn mkl_rows(
    dst: MatMut<'_>,
    lhs: MatRef<'_>,
    rhs: MatRef<'_>,
    scale: f32,
    accumulate: bool,
    parallel: bool,
) {
    let (m, n, row_stride) = (dst.rows, dst.cols, dst.row_stride);
    let threads = if parallel {
        rayon::current_num_threads()
    } else {
        1
    };
    if threads <= 1 || m < 64 {
        super::mkl::sgemm(dst, lhs, rhs, scale, accumulate);
        return;
    }
    let per = m.div_ceil(threads);
    dst.data
        .par_chunks_mut(per * row_stride)
        .enumerate()
        .for_each(|(i, chunk)| {
            let first = i * per;
            if first >= m {
                return;
            }
            let rows = per.min(m - first);
            let part = MatMut {
                data: chunk,
                rows,
                cols: n,
                row_stride,
            };
            let lhs_part = MatRef {
                data: &lhs.data[first * lhs.row_stride..],
                rows,
                ..lhs
            };
            super::mkl::sgemm(part, lhs_part, rhs, scale, accumulate);
        });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(len: usize, seed: u64) -> Vec<f32> {
        let mut s = seed | 1;
        (0..len)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5
            })
            .collect()
    }

    /// `scale·lhs·rhs (+ dst0)` in f64.
    fn reference(
        lhs: &MatRef<'_>,
        rhs: &MatRef<'_>,
        dst0: &[f32],
        row_stride: usize,
        scale: f32,
        acc: bool,
    ) -> Vec<f64> {
        let mut out = vec![0f64; lhs.rows * rhs.cols];
        for i in 0..lhs.rows {
            for j in 0..rhs.cols {
                let mut sum = 0f64;
                for p in 0..lhs.cols {
                    let a = lhs.data[i * lhs.row_stride + p * lhs.col_stride] as f64;
                    let b = rhs.data[p * rhs.row_stride + j * rhs.col_stride] as f64;
                    sum += a * b;
                }
                let base = if acc {
                    dst0[i * row_stride + j] as f64
                } else {
                    0.0
                };
                out[i * rhs.cols + j] = base + scale as f64 * sum;
            }
        }
        out
    }

    /// Every layout the products use (plain, transposed operands, a head's columns inside a
    /// wider row, accumulation), at ragged sizes that split unevenly over threads: against f64.
    /// With `PEFT_RS_MKL` set (CI sets it after scripts/install-mkl.sh) the large ones run on
    /// MKL, so this checks that path too; the backend in use is printed.
    #[test]
    fn products_match_f64_in_every_layout() {
        eprintln!("f32 GEMM: {}", super::super::mkl::f32_gemm_backend());
        for &(m, k, n) in &[(3, 5, 7), (130, 67, 45), (257, 96, 33), (64, 17, 300)] {
            for (t_lhs, t_rhs, acc) in [
                (false, false, false),
                (true, false, true),
                (false, true, false),
                (true, true, true),
            ] {
                let a = values(m * k, 1 + m as u64);
                let b = values(k * n, 2 + n as u64);
                let lhs = if t_lhs {
                    MatRef::new(&a, k, m).t()
                } else {
                    MatRef::new(&a, m, k)
                };
                let rhs = if t_rhs {
                    MatRef::new(&b, n, k).t()
                } else {
                    MatRef::new(&b, k, n)
                };
                // dst: n columns inside rows of n + 3 (the head-in-a-row layout).
                let row_stride = n + 3;
                let dst0 = values(m * row_stride, 3);
                let mut dst = dst0.clone();
                let view = MatMut {
                    data: &mut dst,
                    rows: m,
                    cols: n,
                    row_stride,
                };
                gemm_into(view, lhs, rhs, 0.5, acc, true).unwrap();
                let want = reference(&lhs, &rhs, &dst0, row_stride, 0.5, acc);
                for i in 0..m {
                    for j in 0..n {
                        let (got, want) = (dst[i * row_stride + j] as f64, want[i * n + j]);
                        assert!(
                            (got - want).abs() < 1e-5 * (1.0 + want.abs()),
                            "{m}x{k}x{n} {t_lhs} {t_rhs} {acc}: [{i},{j}] {got} vs {want}"
                        );
                    }
                    // The columns past n are not touched.
                    assert_eq!(
                        dst[i * row_stride + n..i * row_stride + row_stride],
                        dst0[i * row_stride + n..i * row_stride + row_stride]
                    );
                }
            }
        }
    }
}
