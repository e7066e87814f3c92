//! The workspace's candle-core stores the first gradient reaching a tensor instead of adding it
//! into zeros (crates/vendor/candle-core/PEFT_RS_PATCH.md). These tests pin what that must not
//! change: sums over several consumers, broadcast and strided first gradients, and errors for a
//! gradient of the wrong shape. Values are checked against closed forms and central differences
//! in f64 (relative 1e-7).

use candle_core::{CpuStorage, CustomOp1, DType, Device, Layout, Shape, Tensor, Var};

fn var(values: &[f64], dims: &[usize]) -> Var {
    Var::from_tensor(&Tensor::from_slice(values, dims, &Device::Cpu).unwrap()).unwrap()
}

fn values(t: &Tensor) -> Vec<f64> {
    t.flatten_all().unwrap().to_vec1::<f64>().unwrap()
}

fn assert_close(got: &[f64], want: &[f64], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let tol = 1e-7 * w.abs().max(1.0);
        assert!((g - w).abs() <= tol, "{what}[{i}]: {g} against {w}");
    }
}

#[test]
fn a_tensor_used_twice_gets_both_contributions() {
    let xs = [0.5, -1.25, 2.0, 0.75, -0.1, 3.0];
    let x = var(&xs, &[2, 3]);
    // y = sum(exp(x) + x² + 3x): the gradient is exp(x) + 2x + 3, three terms into one slot.
    let y = ((x.exp().unwrap() + x.sqr().unwrap()).unwrap() + (x.as_tensor() * 3.0).unwrap())
        .unwrap()
        .sum_all()
        .unwrap();
    let grads = y.backward().unwrap();
    let want: Vec<f64> = xs.iter().map(|v| v.exp() + 2.0 * v + 3.0).collect();
    assert_close(&values(grads.get(&x).unwrap()), &want, "dy/dx");
}

#[test]
fn broadcast_and_strided_first_gradients_are_summed_and_contiguous() {
    let b = var(&[1.0, -2.0, 0.5, 4.0], &[4]);
    let m = var(
        &(0..12).map(|i| i as f64 * 0.1).collect::<Vec<_>>(),
        &[3, 4],
    );
    // z = sum((mᵀ)ᵀ + b broadcast over 3 rows) ⊙ w: b's gradient sums over rows, m's first
    // gradient arrives through a transpose (a strided view).
    let w = Tensor::from_slice(
        &(0..12).map(|i| 1.0 + i as f64).collect::<Vec<_>>(),
        &[3, 4],
        &Device::Cpu,
    )
    .unwrap();
    let mt = m.as_tensor().t().unwrap();
    let s = mt.t().unwrap().broadcast_add(b.as_tensor()).unwrap();
    let z = (s * &w).unwrap().sum_all().unwrap();
    let grads = z.backward().unwrap();
    let gm = grads.get(&m).unwrap();
    assert!(gm.is_contiguous(), "stored gradients are contiguous");
    assert_close(&values(gm), &values(&w), "dz/dm");
    let want_b: Vec<f64> = (0..4)
        .map(|c| (0..3).map(|r| 1.0 + (r * 4 + c) as f64).sum())
        .collect();
    assert_close(&values(grads.get(&b).unwrap()), &want_b, "dz/db");
}

#[test]
fn gradients_match_central_differences() {
    let xs: Vec<f64> = (0..6).map(|i| (i as f64 * 0.37).sin()).collect();
    let ws: Vec<f64> = (0..12).map(|i| (i as f64 * 0.91).cos() * 0.5).collect();
    let w = Tensor::from_slice(&ws, &[3, 4], &Device::Cpu).unwrap();
    let f = |x: &Tensor| -> Tensor {
        // h = tanh(x·W); f = sum(h ⊙ h + h) with x used again through a residual-like branch.
        let h = x.matmul(&w).unwrap().tanh().unwrap();
        let r = x.sum_keepdim(1).unwrap().broadcast_mul(&h).unwrap();
        ((&h * &h).unwrap() + h + r).unwrap().sum_all().unwrap()
    };
    let x = var(&xs, &[2, 3]);
    let grads = f(x.as_tensor()).backward().unwrap();
    let got = values(grads.get(&x).unwrap());
    let eps = 1e-6;
    let numeric: Vec<f64> = (0..xs.len())
        .map(|i| {
            let at = |d: f64| {
                let mut v = xs.clone();
                v[i] += d;
                let t = Tensor::from_slice(&v, &[2, 3], &Device::Cpu).unwrap();
                f(&t).to_scalar::<f64>().unwrap()
            };
            (at(eps) - at(-eps)) / (2.0 * eps)
        })
        .collect();
    for (i, (g, n)) in got.iter().zip(&numeric).enumerate() {
        assert!(
            (g - n).abs() <= 1e-7 * n.abs().max(1.0),
            "dx[{i}]: {g} against {n}"
        );
    }
}

/// The identity forward, whose backward returns a gradient of the wrong shape.
struct WrongShapeGrad;

impl CustomOp1 for WrongShapeGrad {
    fn name(&self) -> &'static str {
        "wrong-shape-grad"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        Ok((s.clone(), l.shape().clone()))
    }

    fn bwd(
        &self,
        _arg: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(grad.flatten_all()?.narrow(0, 0, 1)?))
    }
}

#[test]
fn a_gradient_of_the_wrong_shape_is_an_error() {
    let x = var(&[1.0, 2.0, 3.0], &[3]);
    let y = x
        .as_tensor()
        .apply_op1(WrongShapeGrad)
        .unwrap()
        .sum_all()
        .unwrap();
    let err = y.backward().expect_err("a [1] gradient for a [3] tensor");
    assert!(err.to_string().contains("shape mismatch"), "{err}");
    assert_eq!(x.dtype(), DType::F64);
}
