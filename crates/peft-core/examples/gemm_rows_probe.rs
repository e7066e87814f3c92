// Throwaway probe: one parallel gemm call vs row blocks on rayon, each serial.
use rayon::prelude::*;
use std::time::Instant;
fn call(
    m: usize,
    n: usize,
    k: usize,
    ldc: usize,
    dst: *mut f32,
    a: *const f32,
    b: *const f32,
    par: gemm::Parallelism,
) {
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            1,
            ldc as isize,
            false,
            a,
            1,
            k as isize,
            b,
            k as isize,
            1,
            1.0,
            1.0,
            false,
            false,
            false,
            par,
        )
    }
}
fn main() {
    let t = rayon::current_num_threads();
    for &(m, k, n) in &[
        (2048, 384, 1536),
        (2048, 1536, 384),
        (2048, 384, 384),
        (2048, 768, 3072),
        (2048, 3072, 768),
        (2048, 768, 768),
    ] {
        let a: Vec<f32> = (0..m * k).map(|i| (i % 7) as f32 * 0.1).collect();
        let b: Vec<f32> = (0..k * n).map(|i| (i % 5) as f32 * 0.1).collect(); // W as (n, k) row-major => B = W^T with col stride k
        let mut c = vec![0f32; m * n];
        let flops = 2.0 * (m * n * k) as f64;
        let run = |f: &mut dyn FnMut()| {
            f();
            let mut best = 0f64;
            for _ in 0..7 {
                let t0 = Instant::now();
                f();
                best = best.max(flops / t0.elapsed().as_secs_f64() / 1e9);
            }
            best
        };
        let one = run(&mut || {
            call(
                m,
                n,
                k,
                n,
                c.as_mut_ptr(),
                a.as_ptr(),
                b.as_ptr(),
                gemm::Parallelism::Rayon(t),
            )
        });
        let mut res = vec![];
        for &rb in &[256usize, 512, 1024] {
            let g = run(&mut || {
                c.par_chunks_mut(rb * n)
                    .zip(a.par_chunks(rb * k))
                    .for_each(|(c, a)| {
                        call(
                            c.len() / n,
                            n,
                            k,
                            n,
                            c.as_mut_ptr(),
                            a.as_ptr(),
                            b.as_ptr(),
                            gemm::Parallelism::None,
                        )
                    })
            });
            res.push(format!("rows{rb} {g:.0}"));
        }
        // columns: each thread takes n/t columns of W (rows of the (n,k) weight) serially
        let nb = n / t;
        let g = run(&mut || {
            let cp = c.as_mut_ptr() as usize;
            (0..t).into_par_iter().for_each(|i| {
                call(
                    m,
                    nb,
                    k,
                    n,
                    (cp as *mut f32).wrapping_add(i * nb),
                    a.as_ptr(),
                    b.as_ptr().wrapping_add(i * nb * k),
                    gemm::Parallelism::None,
                )
            })
        });
        res.push(format!("cols {g:.0}"));
        println!("{m}x{k}x{n}: one call {one:.0} GFLOP/s; {}", res.join(", "));
    }
}
