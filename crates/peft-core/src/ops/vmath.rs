//! Vectorised f32 math for the CPU ops. The functions are branch-free and `#[inline(always)]`,
//! so loops over them compile to SIMD inside a [`simd_kernel!`], which builds its body for AVX-512
//! and for AVX2+FMA besides the baseline and picks one at run time. Calling libm's `expf` once per
//! element was a tenth of a BERT forward on the CPU (softmax and GELU).

/// Defines `fn name(args) -> ret { body }` compiled three times (AVX-512, AVX2+FMA, baseline
/// x86-64) with the best one the CPU supports chosen on each call (the detection is cached by std).
/// Everything the body calls must be `#[inline(always)]` to be compiled for the chosen set.
macro_rules! simd_kernel {
    ($(#[$meta:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$meta])*
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn kernel($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512vl,avx512bw,avx512dq,avx2,fma")]
                fn avx512($($arg: $ty),*) $(-> $ret)? {
                    kernel($($arg),*)
                }
                #[target_feature(enable = "avx2,fma")]
                fn avx2($($arg: $ty),*) $(-> $ret)? {
                    kernel($($arg),*)
                }
                if std::arch::is_x86_feature_detected!("avx512f") {
                    // SAFETY: the CPU has the features `avx512` is compiled for.
                    return unsafe { avx512($($arg),*) };
                }
                if std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
                {
                    // SAFETY: as above, for `avx2`.
                    return unsafe { avx2($($arg),*) };
                }
            }
            kernel($($arg),*)
        }
    };
}
pub(crate) use simd_kernel;

const LOG2E: f32 = std::f32::consts::LOG2_E;
/// ln 2 split in a part exact in few bits and the rest (Cody–Waite), so `x - n·ln2` loses nothing.
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
/// 1.5·2²³: adding and subtracting it rounds an f32 of magnitude < 2²² to the nearest integer.
const ROUND: f32 = 12_582_912.0;
/// Below this, e^x is returned as 0 (e^-87 ≈ 1.6e-38 is the smallest normal-range result kept).
const EXP_LO: f32 = -87.0;
const EXP_HI: f32 = 88.0;

/// e^x with a relative error below 3e-7 on [-87, 88]; 0 below -87 (so −∞ gives 0), e^88 above 88,
/// NaN for NaN. Cephes' `expf` polynomial after a Cody–Waite range reduction.
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    let xc = x.clamp(EXP_LO, EXP_HI);
    // `shifted` holds n in its low mantissa bits: bits(ROUND + n) = bits(ROUND) + n for |n| < 2²².
    // Reading n from there keeps the loop in vector integer ops; `n as i32` is a saturating cast
    // that LLVM compiles to scalar conversions with NaN checks, element by element.
    let shifted = xc * LOG2E + ROUND;
    let n = shifted - ROUND;
    let r = (xc - n * LN2_HI) - n * LN2_LO;
    let z = r * r;
    let p = (((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2)
        * r
        + 1.666_666_5e-1)
        * r
        + 0.5)
        * z
        + r
        + 1.0;
    let n_int = shifted.to_bits().wrapping_sub(ROUND.to_bits());
    let two_n = f32::from_bits(n_int.wrapping_add(127) << 23);
    let y = p * two_n;
    let y = if x < EXP_LO { 0.0 } else { y };
    if x.is_nan() {
        x
    } else {
        y
    }
}

/// erf(x) = x·Σ c_k·x^(2k) for |x| < 1 (its Maclaurin series, c_k = 2/√π·(−1)^k / (k!·(2k+1)),
/// truncated where the next term is below 1e-10).
const ERF_SERIES: [f32; 12] = [
    std::f32::consts::FRAC_2_SQRT_PI,
    -3.761_263_9e-1,
    1.128_379_2e-1,
    -2.686_617e-2,
    5.223_977_6e-3,
    -8.548_327e-4,
    1.205_533_3e-4,
    -1.492_565e-5,
    1.646_211_4e-6,
    -1.636_584_5e-7,
    1.480_719_3e-8,
    -1.229_055_5e-9,
];

/// erf with |error| ≤ 2e-7 in f32: the Maclaurin series below 1 (where Abramowitz & Stegun's
/// 7.1.26 loses digits to cancellation near 0), A&S 7.1.26 over [`exp`] above. Both are evaluated
/// and one selected, which keeps the function branch-free.
#[inline(always)]
pub(crate) fn erf(x: f32) -> f32 {
    let a = x.abs();
    let x2 = x * x;
    let mut series = ERF_SERIES[ERF_SERIES.len() - 1];
    for &c in ERF_SERIES[..ERF_SERIES.len() - 1].iter().rev() {
        series = series * x2 + c;
    }
    let small = x * series;
    let t = 1.0 / (1.0 + 0.327_591_1 * a);
    let poly = t
        * (0.254_829_6
            + t * (-0.284_496_74 + t * (1.421_413_7 + t * (-1.453_152_1 + t * 1.061_405_4))));
    let large = (1.0 - poly * exp(-a * a)).copysign(x);
    if a < 1.0 {
        small
    } else {
        large
    }
}

/// Lanes of the partial reductions: enough independent accumulators for LLVM to vectorise a
/// max or a sum without reassociating (which it may not do on floats by itself).
const LANES: usize = 16;

/// The maximum of `v` (−∞ when empty).
#[inline(always)]
pub(crate) fn max(v: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let chunks = v.chunks_exact(LANES);
    let tail = chunks.remainder();
    for c in chunks {
        for i in 0..LANES {
            acc[i] = acc[i].max(c[i]);
        }
    }
    let m = tail.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
    acc.iter().fold(m, |m, &x| m.max(x))
}

/// Σ a⊙b.
#[inline(always)]
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0f32; LANES];
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..LANES {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// `v[i] = e^(v[i] − shift)` in place; returns Σ of the results.
#[inline(always)]
pub(crate) fn exp_shifted_sum(v: &mut [f32], shift: f32) -> f32 {
    let mut acc = [0f32; LANES];
    let mut chunks = v.chunks_exact_mut(LANES);
    for c in &mut chunks {
        for i in 0..LANES {
            c[i] = exp(c[i] - shift);
            acc[i] += c[i];
        }
    }
    let mut tail = 0f32;
    for x in chunks.into_remainder() {
        *x = exp(*x - shift);
        tail += *x;
    }
    acc.iter().sum::<f32>() + tail
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_matches_std_within_2e7_relative() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x <= 88.0 {
            let want = (x as f64).exp();
            let got = exp(x) as f64;
            worst = worst.max(((got - want) / want).abs());
            x += 0.001_7;
        }
        assert!(worst < 3e-7, "worst relative error {worst}");
    }

    #[test]
    fn exp_edges() {
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(-100.0), 0.0);
        assert_eq!(exp(0.0), 1.0);
        assert!(exp(f32::NAN).is_nan());
        assert!(exp(1000.0).is_finite());
    }

    #[test]
    fn erf_matches_a_reference_within_2e7() {
        // erf by its Maclaurin series in f64 (converges fast on |x| ≤ 3).
        let series = |x: f64| {
            let (mut term, mut sum, mut k) = (x, x, 0.0);
            while term.abs() > 1e-17 {
                k += 1.0;
                term *= -x * x / k;
                sum += term / (2.0 * k + 1.0);
            }
            sum * 2.0 / std::f64::consts::PI.sqrt()
        };
        let mut x = -3.0f32;
        while x <= 3.0 {
            let err = (erf(x) as f64 - series(x as f64)).abs();
            assert!(err < 2e-7, "erf({x}) off by {err}");
            x += 0.003_1;
        }
    }

    #[test]
    fn reductions_cover_the_tail() {
        let v: Vec<f32> = (0..37).map(|i| ((i * 7) % 11) as f32 - 3.0).collect();
        assert_eq!(max(&v), 7.0);
        assert_eq!(max(&[]), f32::NEG_INFINITY);
        let w: Vec<f32> = (0..37).map(|i| i as f32 * 0.5).collect();
        let want: f32 = v.iter().zip(&w).map(|(a, b)| a * b).sum();
        assert!((dot(&v, &w) - want).abs() < 1e-3);
        let mut e = v.clone();
        let s = exp_shifted_sum(&mut e, 7.0);
        let want: f64 = v.iter().map(|&x| ((x - 7.0) as f64).exp()).sum();
        assert!(((s as f64) - want).abs() / want < 1e-6);
    }
}
