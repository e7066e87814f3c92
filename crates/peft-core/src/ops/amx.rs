//! `C = A·B` with A and B rounded to bf16 and products summed in f32, on Intel AMX tiles: the
//! frozen-weight products when the matmul precision is [`MatmulPrecision::Bf16`]. One `tdpbf16ps`
//! is 16×16×32 multiply-adds; on this project's Sapphire Rapids CPU that is several times the f32
//! AVX-512 rate. Written with inline assembly (Rust's AMX intrinsics are unstable); the tile
//! registers are used only between `ldtilecfg` and `tilerelease` inside [`gemm_bf16`]'s tasks.
//!
//! Layout: B is packed once per call into 1 KiB VNNI blocks (16 pairs of k × 16 columns × 2),
//! column tiles padded to pairs and k to 32; each task converts 128 rows of A to bf16 and sweeps
//! all column tiles, two at a time, over its four 32-row panels with four accumulator tiles
//! (32×32 of C).

// Off x86-64 only the portable half (checks, packing) is compiled, and nothing calls into it.
#![cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]

use super::gemm::{MatMut, MatRef};
use super::vmath::simd_kernel;
use rayon::prelude::*;
#[cfg(target_arch = "x86_64")]
use std::arch::asm;
use std::sync::OnceLock;

/// Rows and columns of one tile of C; k values per tile row of A.
const TILE: usize = 16;
const TILE_K: usize = 32;
/// Rows of A (and C) per task: two tiles.
const PANEL: usize = 2 * TILE;
/// Rows of A one task converts to bf16 and multiplies (its panels share each B tile load).
const TASK_ROWS: usize = 4 * PANEL;

/// f32 → bf16 with round-to-nearest-even (NaN stays NaN).
#[inline(always)]
fn to_bf16(x: f32) -> u16 {
    let bits = x.to_bits();
    let rounded = (bits.wrapping_add(0x7fff + ((bits >> 16) & 1)) >> 16) as u16;
    let quiet_nan = ((bits >> 16) | 0x40) as u16;
    if x.is_nan() {
        quiet_nan
    } else {
        rounded
    }
}

simd_kernel! {
    /// `out[i] = bf16(x[i])`.
    fn round_row(out: &mut [u16], x: &[f32]) {
        for (o, &x) in out.iter_mut().zip(x) {
            *o = to_bf16(x);
        }
    }
}

/// Whether this CPU has AMX with bf16 and the kernel lets this process use the tile data
/// (Linux grants it on request, once per process).
pub(crate) fn available() -> bool {
    static AVAILABLE: OnceLock<bool> = OnceLock::new();
    *AVAILABLE.get_or_init(|| {
        #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
        {
            let leaf7 = std::arch::x86_64::__cpuid_count(7, 0);
            let amx_bf16 = leaf7.edx & (1 << 22) != 0;
            let amx_tile = leaf7.edx & (1 << 24) != 0;
            if !(amx_bf16 && amx_tile) {
                return false;
            }
            const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
            const XFEATURE_XTILEDATA: libc::c_long = 18;
            // SAFETY: a plain system call asking for the AMX state permission.
            let granted = unsafe {
                libc::syscall(
                    libc::SYS_arch_prctl,
                    ARCH_REQ_XCOMP_PERM,
                    XFEATURE_XTILEDATA,
                )
            };
            granted == 0
        }
        #[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
        {
            false
        }
    })
}

/// B (`k × n`) in bf16 VNNI blocks of 16 k-pairs × 16 columns: block `(j, kb)` starts at
/// `(j·k_blocks + kb)·256` and holds, at `p·16 + c`, the pair `B[kb·32 + 2p][j·16 + c]` (low
/// half) and `B[kb·32 + 2p + 1][j·16 + c]` (high half); zero outside B.
pub(crate) struct PackedB {
    k: usize,
    n: usize,
    k_blocks: usize,
    col_tiles: usize,
    pairs: Vec<u32>,
}

/// k-pairs × columns in one block.
const BLOCK_PAIRS: usize = TILE * TILE;

/// Where k-pair `p` of column `c` (within its tile column) lies in a packed tile column.
#[inline(always)]
fn pair_index(p: usize, c: usize) -> usize {
    (p / TILE) * BLOCK_PAIRS + (p % TILE) * TILE + c
}

/// Two bf16 values in one u32, `lo` in the low half (VNNI order).
#[inline(always)]
fn pair(lo: f32, hi: f32) -> u32 {
    to_bf16(lo) as u32 | (to_bf16(hi) as u32) << 16
}

simd_kernel! {
    /// One tile column of a `k × n` B whose rows are contiguous (`B[kk][c]` at
    /// `kk·row_stride + c`): pairs of rows side by side.
    fn pack_rows(out: &mut [u32], b: &[f32], row_stride: usize, k: usize, cols: usize) {
        for p in 0..k.div_ceil(2) {
            let lo = &b[2 * p * row_stride..][..cols];
            let dst = &mut out[pair_index(p, 0)..][..cols];
            if 2 * p + 1 < k {
                let hi = &b[(2 * p + 1) * row_stride..][..cols];
                for ((d, &l), &h) in dst.iter_mut().zip(lo).zip(hi) {
                    *d = pair(l, h);
                }
            } else {
                for (d, &l) in dst.iter_mut().zip(lo) {
                    *d = pair(l, 0.0);
                }
            }
        }
    }
}

simd_kernel! {
    /// One tile column of a `k × n` B whose columns are contiguous (a weight `n × k` seen
    /// transposed: `B[kk][c]` at `c·col_stride + kk`): consecutive values pair up.
    fn pack_columns(out: &mut [u32], b: &[f32], col_stride: usize, k: usize, cols: usize) {
        for c in 0..cols {
            let col = &b[c * col_stride..][..k];
            let (even, tail) = col.split_at(k - k % 2);
            for (p, two) in even.chunks_exact(2).enumerate() {
                out[pair_index(p, c)] = pair(two[0], two[1]);
            }
            if let Some(&last) = tail.first() {
                out[pair_index(k / 2, c)] = pair(last, 0.0);
            }
        }
    }
}

impl PackedB {
    /// Packs a strided `k × n` view with unit stride along one dimension (a weight or its
    /// transpose); any other view is read element by element.
    pub fn pack(b: MatRef<'_>) -> Self {
        let (k, n) = (b.rows, b.cols);
        let k_blocks = k.div_ceil(TILE_K);
        let col_tiles = n.div_ceil(2 * TILE) * 2;
        let mut pairs = vec![0u32; col_tiles * k_blocks * BLOCK_PAIRS];
        pairs
            .par_chunks_mut((k_blocks * BLOCK_PAIRS).max(1))
            .enumerate()
            .for_each(|(j, out)| {
                let first = j * TILE;
                let cols = TILE.min(n.saturating_sub(first));
                if cols == 0 || k == 0 {
                    return;
                }
                let at = first * b.col_stride;
                if b.col_stride == 1 {
                    pack_rows(out, &b.data[at..], b.row_stride, k, cols);
                } else if b.row_stride == 1 {
                    pack_columns(out, &b.data[at..], b.col_stride, k, cols);
                } else {
                    for c in 0..cols {
                        for p in 0..k.div_ceil(2) {
                            let at = |kk: usize| {
                                if kk < k {
                                    b.data[kk * b.row_stride + (first + c) * b.col_stride]
                                } else {
                                    0.0
                                }
                            };
                            out[pair_index(p, c)] = pair(at(2 * p), at(2 * p + 1));
                        }
                    }
                }
            });
        Self {
            k,
            n,
            k_blocks,
            col_tiles,
            pairs,
        }
    }

    fn block(&self, col_tile: usize, kb: usize) -> *const u32 {
        self.pairs[(col_tile * self.k_blocks + kb) * BLOCK_PAIRS..].as_ptr()
    }
}

/// The tile configuration: palette 1, eight tiles of 16 rows × 64 bytes.
#[cfg(target_arch = "x86_64")]
#[repr(C, align(64))]
struct TileConfig {
    palette: u8,
    start_row: u8,
    reserved: [u8; 14],
    bytes_per_row: [u16; 16],
    rows: [u8; 16],
}

#[cfg(target_arch = "x86_64")]
impl TileConfig {
    fn all_full() -> Self {
        let mut cfg = Self {
            palette: 1,
            start_row: 0,
            reserved: [0; 14],
            bytes_per_row: [0; 16],
            rows: [0; 16],
        };
        for t in 0..8 {
            cfg.bytes_per_row[t] = 64;
            cfg.rows[t] = TILE as u8;
        }
        cfg
    }
}

/// The 32×32 block of C at column tiles `(j, j+1)` for one panel: tiles 0..3 accumulate,
/// 4 and 5 hold the panel's two A tiles, 6 and 7 the two B blocks.
///
/// # Safety
/// The tile configuration must be loaded on this thread; `panel` must hold `PANEL` rows of
/// `b.k_blocks·32` bf16 values; `out` 32×32 f32.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn panel_block(panel: &[u16], b: &PackedB, j: usize, out: &mut [f32; PANEL * PANEL]) {
    let a_stride = b.k_blocks * TILE_K * 2;
    let a0 = panel.as_ptr();
    let a1 = panel[TILE * b.k_blocks * TILE_K..].as_ptr();
    unsafe {
        asm!(
            "tilezero tmm0",
            "tilezero tmm1",
            "tilezero tmm2",
            "tilezero tmm3"
        );
        for kb in 0..b.k_blocks {
            let off = kb * TILE_K;
            asm!(
                "tileloadd tmm4, [{a0} + {sa}*1]",
                "tileloadd tmm5, [{a1} + {sa}*1]",
                "tileloadd tmm6, [{b0} + {sb}*1]",
                "tileloadd tmm7, [{b1} + {sb}*1]",
                "tdpbf16ps tmm0, tmm4, tmm6",
                "tdpbf16ps tmm1, tmm4, tmm7",
                "tdpbf16ps tmm2, tmm5, tmm6",
                "tdpbf16ps tmm3, tmm5, tmm7",
                a0 = in(reg) a0.add(off),
                a1 = in(reg) a1.add(off),
                b0 = in(reg) b.block(j, kb),
                b1 = in(reg) b.block(j + 1, kb),
                sa = in(reg) a_stride,
                sb = in(reg) 64usize,
                options(nostack, readonly),
            );
        }
        let c = out.as_mut_ptr();
        asm!(
            "tilestored [{c0} + {s}*1], tmm0",
            "tilestored [{c1} + {s}*1], tmm1",
            "tilestored [{c2} + {s}*1], tmm2",
            "tilestored [{c3} + {s}*1], tmm3",
            c0 = in(reg) c,
            c1 = in(reg) c.add(TILE),
            c2 = in(reg) c.add(TILE * PANEL),
            c3 = in(reg) c.add(TILE * PANEL + TILE),
            s = in(reg) PANEL * 4,
            options(nostack),
        );
    }
}

/// `dst = lhs·B` (or `dst += …` when `accumulate`) with `lhs` (`m × k`, any strides) and B
/// rounded to bf16, summed in f32, in parallel over tasks of 128 rows. Call only when
/// [`available`].
pub(crate) fn gemm_bf16(
    mut dst: MatMut<'_>,
    lhs: MatRef<'_>,
    b: &PackedB,
    accumulate: bool,
) -> candle_core::Result<()> {
    let (m, k, n) = (lhs.rows, lhs.cols, b.n);
    if b.k != k || dst.rows != m || dst.cols != n || !dst.fits() || !lhs.fits() {
        candle_core::bail!(
            "amx gemm: {m}×{k} · {}×{n} into {}×{} does not fit",
            b.k,
            dst.rows,
            dst.cols
        )
    }
    if !available() {
        candle_core::bail!("amx gemm: this CPU or kernel does not offer AMX bf16")
    }
    if dst.settle_empty_product(k, accumulate) {
        return Ok(());
    }
    multiply_panels(dst, lhs, b, accumulate);
    Ok(())
}

/// Tiles have no meaning off x86-64, where [`available`] is false and this is never reached.
#[cfg(not(target_arch = "x86_64"))]
fn multiply_panels(_: MatMut<'_>, _: MatRef<'_>, _: &PackedB, _: bool) {
    unreachable!("AMX is x86-64 only")
}

/// The body of [`gemm_bf16`] for a checked, non-empty product on a CPU with AMX.
#[cfg(target_arch = "x86_64")]
fn multiply_panels(dst: MatMut<'_>, lhs: MatRef<'_>, b: &PackedB, accumulate: bool) {
    let (m, k, n) = (lhs.rows, lhs.cols, b.n);
    let kp = b.k_blocks * TILE_K;
    let row_stride = dst.row_stride;
    dst.data
        .par_chunks_mut(row_stride * TASK_ROWS)
        .take(m.div_ceil(TASK_ROWS))
        .enumerate()
        .for_each(|(task, rows_out)| {
            let first = task * TASK_ROWS;
            let rows = TASK_ROWS.min(m - first);
            let mut panels = vec![0u16; rows.div_ceil(PANEL) * PANEL * kp];
            for r in 0..rows {
                let src = (first + r) * lhs.row_stride;
                let row = &mut panels[r * kp..r * kp + k];
                if lhs.col_stride == 1 {
                    round_row(row, &lhs.data[src..src + k]);
                } else {
                    for (c, v) in row.iter_mut().enumerate() {
                        *v = to_bf16(lhs.data[src + c * lhs.col_stride]);
                    }
                }
            }
            let cfg = TileConfig::all_full();
            let mut block = [0f32; PANEL * PANEL];
            // SAFETY: AMX is available (checked above) and configured here for this thread.
            unsafe {
                asm!("ldtilecfg [{}]", in(reg) &cfg as *const TileConfig, options(nostack, readonly));
            }
            // Each pair of B's column tiles is loaded once per task and used by all its panels.
            for j in (0..b.col_tiles).step_by(2) {
                let c0 = j * TILE;
                let cols = PANEL.min(n - c0);
                for (p, panel) in panels.chunks_exact(PANEL * kp).enumerate() {
                    // SAFETY: tiles configured above; `panel` holds PANEL rows of kp values.
                    unsafe { panel_block(panel, b, j, &mut block) };
                    for r in 0..PANEL.min(rows - p * PANEL) {
                        let out = &mut rows_out[(p * PANEL + r) * row_stride + c0..][..cols];
                        let got = &block[r * PANEL..][..cols];
                        if accumulate {
                            out.iter_mut().zip(got).for_each(|(o, g)| *o += g);
                        } else {
                            out.copy_from_slice(got);
                        }
                    }
                }
            }
            // SAFETY: releases this thread's tile state configured above.
            unsafe { asm!("tilerelease", options(nostack, nomem)) };
        });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bf16_value(x: f32) -> f64 {
        f32::from_bits((to_bf16(x) as u32) << 16) as f64
    }

    /// f64 products of the bf16-rounded operands: what the tiles compute, up to f32 summation.
    fn reference(a: &[f32], b: &[f32], m: usize, k: usize, n: usize) -> Vec<f64> {
        let mut c = vec![0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                c[i * n + j] = (0..k)
                    .map(|l| bf16_value(a[i * k + l]) * bf16_value(b[l * n + j]))
                    .sum();
            }
        }
        c
    }

    fn values(len: usize, seed: u32) -> Vec<f32> {
        (0..len)
            .map(|i| ((i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed) >> 8) as f32)
            .map(|v| v / (1u32 << 24) as f32 - 0.5)
            .collect()
    }

    #[test]
    fn rounding_is_to_nearest_even() {
        assert_eq!(to_bf16(1.0), 0x3f80);
        // 1 + 2⁻⁸ is halfway between two bf16 values: ties go to the even one (1.0).
        assert_eq!(to_bf16(1.0 + 1.0 / 256.0), 0x3f80);
        assert_eq!(to_bf16(1.0 + 3.0 / 256.0), 0x3f82);
        assert_eq!(to_bf16(-2.0), 0xc000);
        assert!(f32::from_bits((to_bf16(f32::NAN) as u32) << 16).is_nan());
    }

    #[test]
    fn products_match_the_rounded_reference_at_ragged_shapes() {
        if !available() {
            eprintln!("skipped: no AMX bf16 on this CPU");
            return;
        }
        // Neither m, k nor n a multiple of the tiles, an empty k, more rows than one task; a
        // transposed B; accumulation.
        for &(m, k, n) in &[
            (1, 1, 1),
            (33, 47, 17),
            (70, 96, 64),
            (32, 32, 33),
            (3, 0, 5),
            (130, 64, 40),
        ] {
            let a = values(m * k, 1);
            let bt = values(n * k, 2); // B stored transposed, as a weight (n × k)
            let b: Vec<f32> = (0..k * n).map(|i| bt[(i % n) * k + i / n]).collect();
            let want = reference(&a, &b, m, k, n);
            let at: Vec<f32> = (0..k * m).map(|i| a[(i % m) * k + i / m]).collect();
            // B read along k (a weight seen transposed) and along n (a row-major B); A
            // contiguous and transposed (the strided conversion).
            let cases = [
                (
                    PackedB::pack(MatRef::new(&bt, n, k).t()),
                    MatRef::new(&a, m, k),
                ),
                (
                    PackedB::pack(MatRef::new(&b, k, n)),
                    MatRef::new(&at, k, m).t(),
                ),
            ];
            for (packed, lhs) in &cases {
                let mut got = vec![1f32; m * n];
                let dst = MatMut {
                    data: &mut got,
                    rows: m,
                    cols: n,
                    row_stride: n,
                };
                gemm_bf16(dst, *lhs, packed, true).unwrap();
                for (g, w) in got.iter().zip(&want) {
                    // f32 summation of k exact products of magnitude ≤ 0.25.
                    assert!(
                        (*g as f64 - (w + 1.0)).abs() < 1e-5,
                        "{m}×{k}×{n}: {g} vs {}",
                        w + 1.0
                    );
                }
            }
        }
    }
}
