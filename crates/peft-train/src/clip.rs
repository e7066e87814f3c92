//! Global-norm gradient clipping, like `torch.nn.utils.clip_grad_norm_`.
//!
//! The norm is the L2 norm over all gradients of the given variables together. When it exceeds
//! `max_norm`, every gradient is multiplied by `max_norm / (norm + 1e-6)`. Instead of rescaling
//! the gradients, a trainer may pass [`clip_coef`] to [`crate::optim::AdamW::step_scaled`].

use std::collections::HashSet;

use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};

use crate::error::{CandleContext, Result, TrainError};

/// The L2 norm over the gradients of `vars` (variables without a gradient count as zero;
/// a variable listed twice counts once). Half-precision gradients are squared in f32.
pub fn grad_norm<'a>(grads: &GradStore, vars: impl IntoIterator<Item = &'a Var>) -> Result<f64> {
    let mut seen = HashSet::new();
    let mut sums: Vec<Tensor> = Vec::new();
    for var in vars {
        if !seen.insert(var.id()) {
            continue;
        }
        let Some(g) = grads.get(var) else { continue };
        let sum = square_sum(g).ctx(|| "gradient norm".to_string())?;
        sums.push(sum);
    }
    let Some(first) = sums.first() else {
        return Ok(0.0);
    };
    let total = if sums.iter().all(|s| s.device().same_device(first.device())) {
        // One device synchronisation instead of one per gradient.
        Tensor::stack(&sums, 0)
            .and_then(|t| t.sum_all())
            .and_then(|t| t.to_scalar::<f64>())
            .ctx(|| "gradient norm".to_string())?
    } else {
        let mut total = 0.0;
        for s in &sums {
            total += s.to_scalar::<f64>().ctx(|| "gradient norm".to_string())?;
        }
        total
    };
    Ok(total.sqrt())
}

/// The sum of squares of one gradient, as a rank-0 f64 tensor on its device.
fn square_sum(g: &Tensor) -> candle_core::Result<Tensor> {
    let g = match g.dtype() {
        DType::F16 | DType::BF16 => g.to_dtype(DType::F32)?,
        _ => g.clone(),
    };
    g.sqr()?.sum_all()?.to_dtype(DType::F64)
}

/// The factor `max_norm / (norm + 1e-6)` when it is below 1 (the gradients must shrink), else
/// `None`. A non-finite norm gives `None`: the caller should skip the step.
pub fn clip_coef(norm: f64, max_norm: f64) -> Option<f64> {
    if !norm.is_finite() {
        return None;
    }
    let coef = max_norm / (norm + 1e-6);
    (coef < 1.0).then_some(coef)
}

/// Clips the gradients of `vars` in `grads` to a global L2 norm of `max_norm` and returns the
/// norm before clipping.
///
/// As in PyTorch the gradients are scaled by `max_norm / (norm + 1e-6)` whenever that factor is
/// below one. Unlike PyTorch, a non-finite norm leaves the gradients untouched (PyTorch would turn them
/// into NaN or zeros); check the returned norm and skip the step.
pub fn clip_grad_norm<'a>(
    grads: &mut GradStore,
    vars: impl IntoIterator<Item = &'a Var>,
    max_norm: f64,
) -> Result<f64> {
    if !(max_norm.is_finite() && max_norm > 0.0) {
        let msg = format!("expected a finite value > 0, found {max_norm}");
        return Err(TrainError::config("max_grad_norm", msg));
    }
    let vars: Vec<&Var> = vars.into_iter().collect();
    let norm = grad_norm(grads, vars.iter().copied())?;
    if let Some(coef) = clip_coef(norm, max_norm) {
        let mut seen = HashSet::new();
        for var in vars {
            if !seen.insert(var.id()) {
                continue;
            }
            if let Some(g) = grads.get(var) {
                let scaled = g
                    .affine(coef, 0.0)
                    .ctx(|| "clipping gradients".to_string())?;
                grads.insert(var, scaled);
            }
        }
    }
    Ok(norm)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn setup(dtype: DType) -> (Var, Var, Var, GradStore) {
        let dev = Device::Cpu;
        let a = Var::zeros(2, dtype, &dev).unwrap();
        let b = Var::zeros((1, 2), dtype, &dev).unwrap();
        let c = Var::zeros(1, dtype, &dev).unwrap();
        let mut g = GradStore::default();
        let ga = Tensor::new(&[3.0f64, 0.0], &dev)
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
        let gb = Tensor::new(&[[0.0f64, 4.0]], &dev)
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
        g.insert(&a, ga);
        g.insert(&b, gb);
        (a, b, c, g)
    }

    fn values(t: &Tensor) -> Vec<f64> {
        t.to_dtype(DType::F64)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    }

    #[test]
    fn clips_to_max_norm_and_returns_pre_clip_norm() {
        let (a, b, c, mut g) = setup(DType::F32);
        let norm = clip_grad_norm(&mut g, [&a, &b, &c, &a], 1.0).unwrap();
        assert_eq!(norm, 5.0);
        let coef = 1.0 / (5.0 + 1e-6);
        let ga = values(g.get(&a).unwrap());
        let gb = values(g.get(&b).unwrap());
        assert!((ga[0] - 3.0 * coef).abs() < 1e-6 && ga[1] == 0.0, "{ga:?}");
        assert!((gb[1] - 4.0 * coef).abs() < 1e-6, "{gb:?}");
        assert!(g.get(&c).is_none());
        let after = grad_norm(&g, [&a, &b]).unwrap();
        assert!((after - 1.0).abs() < 1e-5, "{after}");
    }

    #[test]
    fn leaves_small_gradients_alone() {
        let (a, b, _, mut g) = setup(DType::BF16);
        let norm = clip_grad_norm(&mut g, [&a, &b], 10.0).unwrap();
        assert_eq!(norm, 5.0);
        assert_eq!(values(g.get(&a).unwrap()), [3.0, 0.0]);
        assert_eq!(clip_coef(5.0, 10.0), None);
        assert_eq!(clip_coef(f64::NAN, 1.0), None);
        assert_eq!(clip_coef(4.0, 2.0), Some(2.0 / (4.0 + 1e-6)));
    }

    #[test]
    fn no_gradients_and_bad_max_norm() {
        let (a, _, c, mut g) = setup(DType::F64);
        assert_eq!(grad_norm(&g, [&c]).unwrap(), 0.0);
        assert_eq!(grad_norm(&g, []).unwrap(), 0.0);
        assert!(clip_grad_norm(&mut g, [&a], 0.0).is_err());
        assert!(clip_grad_norm(&mut g, [&a], f64::INFINITY).is_err());
    }

    #[test]
    fn non_finite_norm_leaves_gradients() {
        let (a, _, _, mut g) = setup(DType::F32);
        let inf = Tensor::new(&[f32::INFINITY, 1.0], &Device::Cpu).unwrap();
        g.insert(&a, inf);
        let norm = clip_grad_norm(&mut g, [&a], 1.0).unwrap();
        assert!(norm.is_infinite());
        assert_eq!(values(g.get(&a).unwrap())[1], 1.0);
    }
}
