//! AdamW against values of the `torch.optim.AdamW` formula computed in f64.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor, Var};

use super::*;

const A: &str = "enc.query.lora_A.weight";
const B: &str = "enc.LayerNorm.weight";
const C: &str = "enc.unused.weight";

fn var(values: &[f64], dtype: DType) -> Var {
    let t = Tensor::new(values, &Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap();
    Var::from_tensor(&t).unwrap()
}

fn grads(pairs: &[(&Var, &[f64])], dtype: DType) -> GradStore {
    let mut g = GradStore::default();
    for (v, values) in pairs {
        let t = Tensor::new(*values, &Device::Cpu)
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
        g.insert(v.as_tensor(), t);
    }
    g
}

fn values(v: &Tensor) -> Vec<f64> {
    v.to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn assert_close(got: &[f64], want: &[f64], tol: f64) {
    assert_eq!(got.len(), want.len());
    for (g, w) in got.iter().zip(want) {
        assert!((g - w).abs() <= tol, "got {got:?}, want {want:?}");
    }
}

fn config() -> AdamWConfig {
    AdamWConfig {
        lr: 0.01,
        weight_decay: 0.1,
        ..AdamWConfig::default()
    }
}

/// Three steps; the LayerNorm weight gets no decay and no gradient at step 3, the third
/// parameter never has a gradient, and the learning rate changes before step 3.
fn three_steps(dtype: DType, tol: f64) {
    let (a, b, c) = (
        var(&[0.5, -0.3, 0.8, 0.1], dtype),
        var(&[1.0; 3], dtype),
        var(&[0.2; 2], dtype),
    );
    let named = [(A, &a), (B, &b), (C, &c)].map(|(n, v)| (n.to_string(), v.clone()));
    let mut opt = AdamW::new(named, config()).unwrap();
    let c_before = values(&c);
    assert_eq!((opt.decays(A), opt.decays(B)), (Some(true), Some(false)));

    opt.step(&grads(
        &[(&a, &[0.1, -0.2, 0.3, 0.0]), (&b, &[0.5, -0.5, 1e-3])],
        dtype,
    ))
    .unwrap();
    let want_a1 = [
        0.4895000009999999,
        -0.28970000049999994,
        0.7892000003333334,
        0.0999,
    ];
    assert_close(&values(&a), &want_a1, tol);
    assert_close(
        &values(&b),
        &[0.9900000002, 1.0099999998, 0.990000099999],
        tol,
    );

    opt.step(&grads(
        &[(&a, &[-0.1, 0.4, 0.2, 0.05]), (&b, &[0.25, 0.0, -2.0])],
        dtype,
    ))
    .unwrap();
    let want_a2 = [
        0.489536816735842,
        -0.29307133565410365,
        0.778707279432677,
        0.09235873386854011,
    ];
    let want_b2 = [0.9806782040477462, 1.016700582151797, 0.9974381186375596];
    assert_close(&values(&a), &want_a2, tol);
    assert_close(&values(&b), &want_b2, tol);

    opt.set_lr(0.05);
    assert_eq!(opt.lr(), 0.05);
    opt.step(&grads(&[(&a, &[0.3, 0.3, -0.3, 1.0])], dtype))
        .unwrap();
    let want_a3 = [
        0.4590606239287867,
        -0.32115575814856145,
        0.7664335296089645,
        0.05856053308652275,
    ];
    assert_close(&values(&a), &want_a3, tol);
    assert_close(&values(&b), &want_b2, tol);
    assert_close(&values(&c), &c_before, 0.0);
    assert_eq!([A, B, C].map(|n| opt.param_step(n).unwrap()), [3, 2, 0]);

    let state = opt.state_tensors().unwrap();
    assert_eq!(state.len(), 6);
    let m = [
        0.029099999999999994,
        0.04979999999999999,
        0.012299999999999998,
        0.10449999999999998,
    ];
    assert_close(&values(&state[&format!("{A}.exp_avg")]), &m, tol);
    let v = [
        0.0001099700100000001,
        0.0002897600400000003,
        0.0002197800900000002,
        0.0010024975000000008,
    ];
    assert_close(&values(&state[&format!("{A}.exp_avg_sq")]), &v, tol * 1e-2);
    assert_eq!(state[&format!("{B}.step")].to_scalar::<i64>().unwrap(), 2);
}

#[test]
fn matches_torch_formula_f64() {
    three_steps(DType::F64, 1e-14);
}

#[test]
fn matches_torch_formula_f32() {
    three_steps(DType::F32, 2e-7);
}

#[test]
fn matches_torch_formula_bf16_loosely() {
    three_steps(DType::BF16, 1e-2);
}

#[test]
fn scalar_by_hand() {
    // p=1, g=0.5, lr=0.1, wd=0.1. Step 1: p = 0.99 - (0.1/0.1) * 0.05 / (0.5 + 1e-8).
    // Step 2: m = 0.095, v = 0.00049975, bias-corrected sqrt(v) = 0.5 again, so
    // p = 0.890000002 * 0.99 - (0.1/0.19) * 0.095 / (0.5 + 1e-8).
    let p = var(&[1.0], DType::F64);
    let cfg = AdamWConfig {
        lr: 0.1,
        weight_decay: 0.1,
        ..AdamWConfig::default()
    };
    let mut opt = AdamW::with_decay_filter([("w".to_string(), p.clone())], cfg, |_| true).unwrap();
    opt.step(&grads(&[(&p, &[0.5])], DType::F64)).unwrap();
    assert_close(&values(&p), &[0.890000002], 1e-15);
    opt.step(&grads(&[(&p, &[0.5])], DType::F64)).unwrap();
    assert_close(&values(&p), &[0.7811000039800006], 1e-15);
}

#[test]
fn weight_decay_skips_excluded_names() {
    // Zero gradients leave m = v = 0, so only decay moves a parameter.
    let names = [
        "dense.weight",
        "dense.bias",
        "LayerNorm.weight",
        "model.norm.weight",
    ];
    let vars: Vec<Var> = names
        .iter()
        .map(|_| var(&[2.0, -4.0], DType::F32))
        .collect();
    let named = names
        .iter()
        .map(|n| n.to_string())
        .zip(vars.iter().cloned());
    let cfg = AdamWConfig {
        lr: 0.5,
        weight_decay: 0.2,
        ..AdamWConfig::default()
    };
    let mut opt = AdamW::new(named, cfg).unwrap();
    let pairs: Vec<(&Var, &[f64])> = vars.iter().map(|v| (v, &[0.0, 0.0][..])).collect();
    opt.step(&grads(&pairs, DType::F32)).unwrap();
    assert_close(&values(&vars[0]), &[1.8, -3.6], 1e-6);
    for v in &vars[1..] {
        assert_close(&values(v), &[2.0, -4.0], 0.0);
    }
}

#[test]
fn fused_and_tensor_paths_agree() {
    let p1 = Var::randn(0f32, 1.0, (7, 5), &Device::Cpu).unwrap();
    let p2 = Var::from_tensor(&p1.as_tensor().copy().unwrap()).unwrap();
    let (mut m, mut v) = (p1.zeros_like().unwrap(), p1.zeros_like().unwrap());
    let (m2, v2) = (m.copy().unwrap(), v.copy().unwrap());
    let h = kernels::Hyper {
        lerp_w: 0.1,
        beta2: 0.999,
        one_minus_beta2: 0.001,
        decay: Some(0.999),
        bc2_sqrt: 0.001f64.sqrt(),
        eps: 1e-8,
        neg_step_size: -0.01,
        grad_scale: Some(0.5),
    };
    for _ in 0..3 {
        let g = Tensor::randn(0f32, 1.0, (7, 5), &Device::Cpu).unwrap();
        kernels::fused_step(&p1, &m2, &v2, &g, h).unwrap();
        (m, v) = kernels::tensor_step(&p2, &m, &v, &g, h).unwrap();
    }
    assert_close(&values(&p1), &values(&p2), 1e-6);
    assert_close(&values(&m2), &values(&m), 1e-6);
    assert_close(&values(&v2), &values(&v), 1e-6);
}

#[test]
fn step_scaled_equals_scaled_gradients() {
    let (p1, p2) = (var(&[0.3, -0.7], DType::F64), var(&[0.3, -0.7], DType::F64));
    let mut o1 = AdamW::new([("a".to_string(), p1.clone())], config()).unwrap();
    let mut o2 = AdamW::new([("a".to_string(), p2.clone())], config()).unwrap();
    for _ in 0..2 {
        o1.step_scaled(&grads(&[(&p1, &[0.4, -1.0])], DType::F64), 0.25)
            .unwrap();
        o2.step(&grads(&[(&p2, &[0.1, -0.25])], DType::F64))
            .unwrap();
    }
    assert_close(&values(&p1), &values(&p2), 1e-15);
    assert!(o1.step_scaled(&GradStore::default(), f64::NAN).is_err());
}

#[test]
fn state_round_trip_resumes_exactly() {
    let run =
        |p: &Var, opt: &mut AdamW, g: &[f64]| opt.step(&grads(&[(p, g)], DType::F32)).unwrap();
    let p1 = var(&[0.1, 0.2, 0.3], DType::F32);
    let mut o1 = AdamW::new([("w".to_string(), p1.clone())], config()).unwrap();
    run(&p1, &mut o1, &[1.0, -1.0, 0.5]);
    run(&p1, &mut o1, &[0.2, 0.1, -0.5]);
    let saved = o1.state_tensors().unwrap();
    let p2 = Var::from_tensor(&p1.as_detached_tensor()).unwrap();
    let mut o2 = AdamW::new([("w".to_string(), p2.clone())], config()).unwrap();
    o2.load_state_tensors(&saved).unwrap();
    run(&p1, &mut o1, &[0.3, 0.3, 0.3]);
    run(&p2, &mut o2, &[0.3, 0.3, 0.3]);
    assert_eq!(values(&p1), values(&p2));
    // The snapshot was not changed by the later steps.
    assert_eq!(saved["w.step"].to_scalar::<i64>().unwrap(), 2);
    assert_eq!(o2.param_step("w"), Some(3));
}

#[test]
fn bad_state_is_rejected_without_changes() {
    let p = var(&[0.1, 0.2], DType::F32);
    let mut opt = AdamW::new([("w".to_string(), p.clone())], config()).unwrap();
    opt.step(&grads(&[(&p, &[1.0, 1.0])], DType::F32)).unwrap();
    let good = opt.state_tensors().unwrap();
    for (case, key) in ["x.step", "w.exp_avg", "w.exp_avg", "w.step"]
        .iter()
        .enumerate()
    {
        let mut bad = good.clone();
        let cpu = &Device::Cpu;
        match case {
            0 => bad.insert("x.step".into(), good["w.step"].clone()),
            1 => bad.remove("w.exp_avg_sq"),
            2 => bad.insert(
                "w.exp_avg".into(),
                Tensor::zeros(3, DType::F32, cpu).unwrap(),
            ),
            _ => bad.insert("w.step".into(), Tensor::new(-1f32, cpu).unwrap()),
        };
        let err = opt.load_state_tensors(&bad).unwrap_err();
        assert!(err.to_string().contains(key), "{err}");
    }
    assert_eq!(opt.param_step("w"), Some(1));
    opt.load_state_tensors(&HashMap::new()).unwrap();
    assert_eq!(opt.param_step("w"), Some(0));
}

#[test]
fn constructor_validates() {
    let p = var(&[0.0], DType::F32);
    let bad = AdamWConfig {
        beta1: 1.0,
        ..AdamWConfig::default()
    };
    let err = AdamW::new([("w".to_string(), p.clone())], bad).unwrap_err();
    assert!(err.to_string().contains("optimizer.beta1"), "{err}");
    let twice = [("w".to_string(), p.clone()), ("w".to_string(), p)];
    assert!(AdamW::new(twice, AdamWConfig::default()).is_err());
    let ints = Var::from_tensor(&Tensor::new(&[1u32], &Device::Cpu).unwrap()).unwrap();
    assert!(AdamW::new([("i".to_string(), ints)], AdamWConfig::default()).is_err());
    let cfg: AdamWConfig = serde_json::from_str(r#"{"lr": 0.0002}"#).unwrap();
    assert_eq!(cfg.weight_decay, 0.01);
    assert!(serde_json::from_str::<AdamWConfig>(r#"{"learning_rate": 1}"#).is_err());
}

#[test]
fn var_map_in_name_order() {
    let map = candle_nn::VarMap::new();
    let vb = candle_nn::VarBuilder::from_varmap(&map, DType::F32, &Device::Cpu);
    vb.get(2, "b.weight").unwrap();
    vb.get(2, "a.bias").unwrap();
    let opt = AdamW::from_var_map(&map, AdamWConfig::default()).unwrap();
    let names: Vec<&str> = opt.vars().map(|(n, _)| n).collect();
    assert_eq!(names, ["a.bias", "b.weight"]);
    assert_eq!(opt.decays("a.bias"), Some(false));
}
