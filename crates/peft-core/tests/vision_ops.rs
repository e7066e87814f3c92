//! The channels-last vision ops against plain candle references: depthwise convolution and
//! training-mode BatchNorm, values and gradients (input, and kernel/gain/shift when trainable),
//! and the BatchNorm layer's running statistics against PyTorch's update rule.

use candle_core::{Device, Tensor, Var};
use peft_core::ops::{
    affine_act, batch_norm_train, batch_norm_train_reference, depthwise_conv2d,
    depthwise_conv2d_reference, ClampAct,
};
use peft_core::test_utils::max_abs_diff as max_diff;
use peft_core::{BatchNorm2d, BatchNormMode};

fn seeded(shape: &[usize], seed: u64) -> Tensor {
    let n: usize = shape.iter().product();
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let v: Vec<f32> = (0..n)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            ((state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

#[test]
fn depthwise_matches_grouped_conv_values_and_gradients() {
    // 3×3 stride 1 and 2 with padding 1 (MobileNetV2), and an odd size with a 5×5 window.
    for (h, w, c, k, stride, pad) in [(8, 8, 6, 3, 1, 1), (9, 7, 5, 3, 2, 1), (7, 6, 4, 5, 2, 2)] {
        let x = Var::from_tensor(&seeded(&[2, h, w, c], 1)).unwrap();
        let kernel = Var::from_tensor(&seeded(&[c, 1, k, k], 2)).unwrap();
        let probe = seeded(
            &[
                2,
                (h + 2 * pad - k) / stride + 1,
                (w + 2 * pad - k) / stride + 1,
                c,
            ],
            3,
        );
        let y = depthwise_conv2d(x.as_tensor(), kernel.as_tensor(), stride, pad).unwrap();
        let y_ref =
            depthwise_conv2d_reference(x.as_tensor(), kernel.as_tensor(), stride, pad).unwrap();
        assert_eq!(y.dims(), y_ref.dims());
        assert!(max_diff(&y, &y_ref) < 1e-5, "values {h}×{w} k{k} s{stride}");
        // The loss is linear in x and in the kernel separately, so central differences are
        // exact up to rounding (candle's own grouped-conv backward fails on odd sizes with
        // stride 2, so it cannot serve as the gradient reference here).
        let g = (y * &probe).unwrap().sum_all().unwrap().backward().unwrap();
        let loss = |x: &Tensor, k: &Tensor| -> f64 {
            let y = depthwise_conv2d_reference(x, k, stride, pad).unwrap();
            let l: f32 = (y * &probe)
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar()
                .unwrap();
            l as f64
        };
        for (which, v) in [("x", &x), ("kernel", &kernel)] {
            let grad = g
                .get(v)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let base = v
                .as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            for i in [0, base.len() / 3, base.len() - 1] {
                let bump = |d: f32| {
                    let mut b = base.clone();
                    b[i] += d;
                    Tensor::from_vec(b, v.dims(), &Device::Cpu).unwrap()
                };
                let (plus, minus) = (bump(0.5), bump(-0.5));
                let fd = if which == "x" {
                    loss(&plus, kernel.as_tensor()) - loss(&minus, kernel.as_tensor())
                } else {
                    loss(x.as_tensor(), &plus) - loss(x.as_tensor(), &minus)
                };
                assert!(
                    (fd - grad[i] as f64).abs() < 1e-3,
                    "{which}[{i}] {h}×{w} k{k} s{stride}: autograd {} vs differences {fd}",
                    grad[i]
                );
            }
        }
    }
}

#[test]
fn depthwise_frozen_kernel_gets_no_gradient() {
    let x = Var::from_tensor(&seeded(&[1, 5, 5, 3], 4)).unwrap();
    let kernel = seeded(&[3, 1, 3, 3], 5);
    let y = depthwise_conv2d(x.as_tensor(), &kernel, 1, 1).unwrap();
    let g = y.sum_all().unwrap().backward().unwrap();
    assert!(g.get(&kernel).is_none());
    assert!(g.get(x.as_tensor()).is_some());
}

#[test]
fn batch_norm_matches_reference_values_and_gradients() {
    let (rows, c) = (2 * 5 * 3, 7);
    // Values spread so that ReLU6 clips on both sides.
    let x = Var::from_tensor(&seeded(&[2, 5, 3, c], 6).affine(3.0, 0.5).unwrap()).unwrap();
    let w = Var::from_tensor(&seeded(&[c], 7).affine(4.0, 0.0).unwrap()).unwrap();
    let b = Var::from_tensor(&seeded(&[c], 8).affine(3.0, 1.0).unwrap()).unwrap();
    let probe = seeded(&[2, 5, 3, c], 9);
    for act in [
        ClampAct::Identity,
        ClampAct::Clamp(6.0),
        ClampAct::Clamp(f32::INFINITY),
    ] {
        let (y, s) =
            batch_norm_train(x.as_tensor(), w.as_tensor(), b.as_tensor(), 1e-5, act).unwrap();
        let (y_ref, s_ref) =
            batch_norm_train_reference(x.as_tensor(), w.as_tensor(), b.as_tensor(), 1e-5, act)
                .unwrap();
        assert_eq!(s.rows, rows);
        assert!(max_diff(&y, &y_ref) < 1e-5, "{act:?}");
        for (a, b) in s
            .mean
            .iter()
            .zip(&s_ref.mean)
            .chain(s.var.iter().zip(&s_ref.var))
        {
            assert!((a - b).abs() < 1e-5);
        }
        let g = (y * &probe).unwrap().sum_all().unwrap().backward().unwrap();
        let g_ref = (y_ref * &probe)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        for v in [&x, &w, &b] {
            let (a, r) = (g.get(v).unwrap(), g_ref.get(v).unwrap());
            assert!(
                max_diff(a, r) < 1e-4,
                "{act:?} gradient {:?}: {}",
                v.dims(),
                max_diff(a, r)
            );
        }
    }
    // Frozen gain and shift: only the input's gradient.
    let (y, _) = batch_norm_train(
        x.as_tensor(),
        &w.as_tensor().detach(),
        &b.as_tensor().detach(),
        1e-5,
        ClampAct::Clamp(6.0),
    )
    .unwrap();
    let g = y.sum_all().unwrap().backward().unwrap();
    assert!(g.get(x.as_tensor()).is_some());
}

#[test]
fn affine_activation_matches_candle_ops() {
    let x = Var::from_tensor(&seeded(&[3, 4, 5], 11).affine(8.0, 1.0).unwrap()).unwrap();
    let scale = seeded(&[5], 12).affine(2.0, 0.5).unwrap();
    let shift = seeded(&[5], 13);
    let probe = seeded(&[3, 4, 5], 14);
    let y = affine_act(x.as_tensor(), &scale, &shift, ClampAct::Clamp(6.0)).unwrap();
    let y_ref = x
        .as_tensor()
        .broadcast_mul(&scale)
        .unwrap()
        .broadcast_add(&shift)
        .unwrap()
        .clamp(0f32, 6f32)
        .unwrap();
    assert!(max_diff(&y, &y_ref) < 1e-6);
    let g = (y * &probe).unwrap().sum_all().unwrap().backward().unwrap();
    let g_ref = (y_ref * &probe)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let d = max_diff(g.get(&x).unwrap(), g_ref.get(&x).unwrap());
    assert!(d < 1e-6, "{d}");
}

#[test]
fn batch_norm_layer_updates_running_stats_as_pytorch() {
    let c = 3;
    let x = (seeded(&[4, 2, 2, c], 10) * 2.0).unwrap();
    let mean0 = Tensor::new(&[0.1f32, -0.2, 0.0], &Device::Cpu).unwrap();
    let var0 = Tensor::new(&[1.0f32, 0.5, 2.0], &Device::Cpu).unwrap();
    let ones = Tensor::ones(c, candle_core::DType::F32, &Device::Cpu).unwrap();
    let zeros = ones.zeros_like().unwrap();
    let bn = BatchNorm2d::new(
        "bn".into(),
        ones,
        zeros,
        mean0.clone(),
        var0.clone(),
        1e-5,
        0.1,
        BatchNormMode::Update,
    );
    bn.forward(&x, true).unwrap();
    let (m, v) = bn.running_stats();
    // PyTorch: running = (1 − m)·running + m·batch, the variance unbiased (n / (n − 1)).
    let x2 = x.reshape((16, c)).unwrap();
    let bm = x2.mean_keepdim(0).unwrap().squeeze(0).unwrap();
    let bv = (x2
        .broadcast_sub(&bm)
        .unwrap()
        .sqr()
        .unwrap()
        .sum_keepdim(0)
        .unwrap()
        .squeeze(0)
        .unwrap()
        / 15.0)
        .unwrap();
    let want_m = ((mean0 * 0.9).unwrap() + (bm * 0.1).unwrap()).unwrap();
    let want_v = ((var0.clone() * 0.9).unwrap() + (bv * 0.1).unwrap()).unwrap();
    assert!(max_diff(&m, &want_m) < 1e-6);
    assert!(max_diff(&v, &want_v) < 1e-6);
    // Evaluation and frozen mode use the running statistics and leave them alone.
    let frozen = BatchNorm2d::new(
        "f".into(),
        Tensor::ones(c, candle_core::DType::F32, &Device::Cpu).unwrap(),
        Tensor::zeros(c, candle_core::DType::F32, &Device::Cpu).unwrap(),
        m.clone(),
        v.clone(),
        1e-5,
        0.1,
        BatchNormMode::Frozen,
    );
    let y = frozen.forward(&x, true).unwrap();
    let want = x
        .broadcast_sub(&m)
        .unwrap()
        .broadcast_div(&(v.clone() + 1e-5).unwrap().sqrt().unwrap())
        .unwrap();
    assert!(max_diff(&y, &want) < 1e-5);
    assert!(max_diff(&frozen.running_stats().1, &v) == 0.0);
}
