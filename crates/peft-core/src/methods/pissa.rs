//! PiSSA initialisation (Meng et al. 2024) as peft's `init_lora_weights="pissa_niter_k"` does
//! it: `A`, `B` from the base weight's top-`r` singular triplets, `A = √(S/s)·Vᵀ`,
//! `B = U·√(S/s)`, and the base replaced by the residual `W − s·B·A`, so the model's output is
//! unchanged at initialisation. The singular triplets come from a randomized subspace iteration
//! (Halko et al. 2011) in f64 with `ITERATIONS` power steps and `OVERSAMPLE` extra columns.
//!
//! A PiSSA adapter only fits the residual base, so at save it is converted to a plain LoRA of
//! rank `2r` on the original base, as peft's `path_initial_model_for_weight_conversion` does:
//! `A' = [A; A₀]`, `B' = [B, −B₀]`, `lora_alpha` doubled (`√2`× with rsLoRA), since
//! `W_res + s·B·A = W + s·(B·A − B₀·A₀)`.

use candle_core::{DType, Tensor};
use rand::Rng;

use crate::error::Result;

const ITERATIONS: usize = 4;
const OVERSAMPLE: usize = 8;

/// `(A, B, residual)` for a base weight `w` (`out × in`), rank `r` and scaling `s`, in f32.
pub fn pissa_init(
    w: &Tensor,
    r: usize,
    scaling: f64,
    rng: &mut impl Rng,
) -> Result<(Tensor, Tensor, Tensor)> {
    let (m, n) = w.dims2()?;
    let data: Vec<f64> = w.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
    let (u, s, vt) = top_singular(&data, m, n, r.min(m).min(n), rng);
    let k = s.len();
    let root: Vec<f64> = s.iter().map(|v| (v / scaling).max(0.0).sqrt()).collect();
    let a: Vec<f32> = (0..k)
        .flat_map(|i| (0..n).map(move |j| (i, j)))
        .map(|(i, j)| (root[i] * vt[i * n + j]) as f32)
        .collect();
    let b: Vec<f32> = (0..m)
        .flat_map(|i| (0..k).map(move |j| (i, j)))
        .map(|(i, j)| (u[i * k + j] * root[j]) as f32)
        .collect();
    let device = w.device();
    let mut a = Tensor::from_vec(a, (k, n), device)?;
    let mut b = Tensor::from_vec(b, (m, k), device)?;
    if k < r {
        // A rank above the matrix's: the extra directions start at zero.
        a = Tensor::cat(&[&a, &Tensor::zeros((r - k, n), DType::F32, device)?], 0)?;
        b = Tensor::cat(&[&b, &Tensor::zeros((m, r - k), DType::F32, device)?], 1)?;
    }
    let residual = (w.to_dtype(DType::F32)? - (b.matmul(&a)? * scaling)?)?.to_dtype(w.dtype())?;
    Ok((a, b, residual))
}

/// Orthonormalises the `cols` columns of the row-major `rows × cols` matrix `q` in place
/// (modified Gram-Schmidt, twice for stability); a column that vanishes stays zero.
fn orthonormalise(q: &mut [f64], rows: usize, cols: usize) {
    for _ in 0..2 {
        for j in 0..cols {
            for p in 0..j {
                let dot: f64 = (0..rows).map(|i| q[i * cols + j] * q[i * cols + p]).sum();
                for i in 0..rows {
                    q[i * cols + j] -= dot * q[i * cols + p];
                }
            }
            let norm: f64 = (0..rows)
                .map(|i| q[i * cols + j].powi(2))
                .sum::<f64>()
                .sqrt();
            for i in 0..rows {
                q[i * cols + j] = if norm > 1e-300 {
                    q[i * cols + j] / norm
                } else {
                    0.0
                };
            }
        }
    }
}

/// `a (p × q) · b (q × t)`, row-major.
fn matmul(a: &[f64], b: &[f64], p: usize, q: usize, t: usize) -> Vec<f64> {
    let mut c = vec![0.0; p * t];
    for i in 0..p {
        for k in 0..q {
            let x = a[i * q + k];
            if x != 0.0 {
                for j in 0..t {
                    c[i * t + j] += x * b[k * t + j];
                }
            }
        }
    }
    c
}

fn transpose(a: &[f64], rows: usize, cols: usize) -> Vec<f64> {
    let mut t = vec![0.0; rows * cols];
    for i in 0..rows {
        for j in 0..cols {
            t[j * rows + i] = a[i * cols + j];
        }
    }
    t
}

/// Eigen-decomposition of the symmetric `n × n` matrix `a` by cyclic Jacobi rotations:
/// `(eigenvalues, eigenvectors as columns)`, sorted by decreasing eigenvalue.
fn symmetric_eigen(mut a: Vec<f64>, n: usize) -> (Vec<f64>, Vec<f64>) {
    let mut v = vec![0.0; n * n];
    for i in 0..n {
        v[i * n + i] = 1.0;
    }
    for _sweep in 0..100 {
        let off: f64 = (0..n)
            .flat_map(|i| (0..n).map(move |j| (i, j)))
            .filter(|(i, j)| i != j)
            .map(|(i, j)| a[i * n + j].powi(2))
            .sum();
        if off < 1e-30 {
            break;
        }
        for p in 0..n {
            for q in p + 1..n {
                let apq = a[p * n + q];
                if apq.abs() < 1e-300 {
                    continue;
                }
                let theta = (a[q * n + q] - a[p * n + p]) / (2.0 * apq);
                let t = theta.signum() / (theta.abs() + (theta * theta + 1.0).sqrt());
                let t = if theta == 0.0 { 1.0 } else { t };
                let c = 1.0 / (t * t + 1.0).sqrt();
                let s = t * c;
                for k in 0..n {
                    let (akp, akq) = (a[k * n + p], a[k * n + q]);
                    a[k * n + p] = c * akp - s * akq;
                    a[k * n + q] = s * akp + c * akq;
                }
                for k in 0..n {
                    let (apk, aqk) = (a[p * n + k], a[q * n + k]);
                    a[p * n + k] = c * apk - s * aqk;
                    a[q * n + k] = s * apk + c * aqk;
                }
                for k in 0..n {
                    let (vkp, vkq) = (v[k * n + p], v[k * n + q]);
                    v[k * n + p] = c * vkp - s * vkq;
                    v[k * n + q] = s * vkp + c * vkq;
                }
            }
        }
    }
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&i, &j| a[j * n + j].total_cmp(&a[i * n + i]));
    let values = order.iter().map(|&i| a[i * n + i]).collect();
    let mut vectors = vec![0.0; n * n];
    for (col, &i) in order.iter().enumerate() {
        for k in 0..n {
            vectors[k * n + col] = v[k * n + i];
        }
    }
    (values, vectors)
}

/// The top `k` singular triplets of the row-major `m × n` matrix `w`: `U` (`m × k`), `S`
/// (`k`, decreasing) and `Vᵀ` (`k × n`), by randomized subspace iteration.
pub(crate) fn top_singular(
    w: &[f64],
    m: usize,
    n: usize,
    k: usize,
    rng: &mut impl Rng,
) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let l = (k + OVERSAMPLE).min(m).min(n);
    let wt = transpose(w, m, n);
    let omega: Vec<f64> = (0..n * l)
        .map(|_| crate::weights::standard_normal(rng))
        .collect();
    let mut q = matmul(w, &omega, m, n, l);
    orthonormalise(&mut q, m, l);
    for _ in 0..ITERATIONS {
        let mut z = matmul(&wt, &q, n, m, l);
        orthonormalise(&mut z, n, l);
        q = matmul(w, &z, m, n, l);
        orthonormalise(&mut q, m, l);
    }
    // B = Qᵀ·W (l × n); B·Bᵀ = U_b·S²·U_bᵀ; Vᵀ = S⁻¹·U_bᵀ·B.
    let b = matmul(&transpose(&q, m, l), w, l, m, n);
    let bbt = matmul(&b, &transpose(&b, l, n), l, n, l);
    let (eig, ub) = symmetric_eigen(bbt, l);
    let s: Vec<f64> = eig.iter().take(k).map(|e| e.max(0.0).sqrt()).collect();
    let ub_k: Vec<f64> = (0..l)
        .flat_map(|i| (0..k).map(move |j| (i, j)))
        .map(|(i, j)| ub[i * l + j])
        .collect();
    let u = matmul(&q, &ub_k, m, l, k);
    let mut vt = matmul(&transpose(&ub_k, l, k), &b, k, l, n);
    for (i, sv) in s.iter().enumerate() {
        for j in 0..n {
            vt[i * n + j] = if *sv > 1e-300 {
                vt[i * n + j] / sv
            } else {
                0.0
            };
        }
    }
    (u, s, vt)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    /// On a matrix with a known spectrum, the top triplets come out with the right values
    /// (relative error ≤ 1e-6) and reconstruct the rank-k part (max abs ≤ 1e-6).
    #[test]
    fn recovers_a_known_spectrum() {
        let (m, n, k) = (40, 30, 4);
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let mut orth = |rows: usize, cols: usize| {
            let mut q: Vec<f64> = (0..rows * cols)
                .map(|_| crate::weights::standard_normal(&mut rng))
                .collect();
            orthonormalise(&mut q, rows, cols);
            q
        };
        let (u0, v0) = (orth(m, n), orth(n, n));
        let sigma: Vec<f64> = (0..n).map(|i| 10.0 * 0.5f64.powi(i as i32)).collect();
        let us: Vec<f64> = (0..m * n).map(|x| u0[x] * sigma[x % n]).collect();
        let w = matmul(&us, &transpose(&v0, n, n), m, n, n);
        let (u, s, vt) = top_singular(&w, m, n, k, &mut rand::rngs::StdRng::seed_from_u64(2));
        for i in 0..k {
            assert!(
                (s[i] - sigma[i]).abs() / sigma[i] < 1e-6,
                "{i}: {} vs {}",
                s[i],
                sigma[i]
            );
        }
        let us: Vec<f64> = (0..m * k).map(|x| u[x] * s[x % k]).collect();
        let low = matmul(&us, &vt, m, k, n);
        let us0: Vec<f64> = (0..m * n)
            .map(|x| if x % n < k { u0[x] * sigma[x % n] } else { 0.0 })
            .collect();
        let want = matmul(&us0, &transpose(&v0, n, n), m, n, n);
        let err = low
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f64::max);
        assert!(err < 1e-6, "rank-{k} part off by {err}");
    }
}
