//! The bf16 frozen matmul precision (AMX): the products with frozen weights equal f64 products
//! of the bf16-rounded operands up to f32 summation, and the LoRA factors' gradients do not
//! depend on it. One test function, because the precision is a process-wide setting.

use candle_core::{DType, Device, Tensor, Var};
use peft_core::ops::{
    frozen_linear, lora_linear, set_frozen_matmul_precision, LoraBranch, MatmulPrecision,
};

/// `x` rounded to bf16 and back, in f64.
fn rounded(x: &Tensor) -> Tensor {
    x.to_dtype(DType::BF16)
        .and_then(|t| t.to_dtype(DType::F64))
        .expect("dtype round trip")
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    let d = (a.to_dtype(DType::F64).unwrap() - b.to_dtype(DType::F64).unwrap()).unwrap();
    d.abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

#[test]
fn bf16_products_round_the_operands_and_nothing_else() -> candle_core::Result<()> {
    if !set_frozen_matmul_precision(MatmulPrecision::Bf16) {
        eprintln!("skipped: this CPU has no AMX bf16");
        return Ok(());
    }
    let dev = Device::Cpu;
    // Ragged shapes: 2·37 rows, 70 inputs, 45 outputs (none a multiple of the tiles).
    let x = Var::randn(0f32, 1., (2, 37, 70), &dev)?;
    let w = Tensor::randn(0f32, 0.2, (45, 70), &dev)?;
    let bias = Tensor::randn(0f32, 1., 45, &dev)?;
    let y = frozen_linear(x.as_tensor(), &w, Some(&bias))?;
    let want = rounded(x.as_tensor())
        .broadcast_matmul(&rounded(&w).t()?)?
        .broadcast_add(&bias.to_dtype(DType::F64)?)?;
    // 70 exact products of magnitude ≲ 1 summed in f32.
    let diff = max_abs_diff(&y, &want);
    assert!(
        diff < 2e-5,
        "forward differs from the rounded reference by {diff}"
    );

    // Input gradient of sum(y ⊙ c): c·W with both rounded.
    let c = Tensor::randn(0f32, 1., (2, 37, 45), &dev)?;
    let grads = (&y * &c)?.sum_all()?.backward()?;
    let dx = grads.get(x.as_tensor()).expect("dx");
    let want = rounded(&c).broadcast_matmul(&rounded(&w))?;
    let diff = max_abs_diff(dx, &want);
    assert!(
        diff < 2e-5,
        "input gradient differs from the rounded reference by {diff}"
    );

    // LoRA: the factors' gradients are the same at both precisions (they never touch W); the
    // input gradient differs from f32 by the rounding of g·W alone.
    let a = Var::randn(0f32, 0.1, (4, 70), &dev)?;
    let b = Var::randn(0f32, 0.1, (45, 4), &dev)?;
    let run = |precision| -> candle_core::Result<Vec<Tensor>> {
        set_frozen_matmul_precision(precision);
        let branch = LoraBranch {
            a: a.as_tensor(),
            b: b.as_tensor(),
            scale: 2.0,
            mask: None,
        };
        let y = lora_linear(x.as_tensor(), &w, Some(&bias), &branch)?;
        let grads = (&y * &c)?.sum_all()?.backward()?;
        Ok(vec![
            y,
            grads.get(a.as_tensor()).expect("dA").clone(),
            grads.get(b.as_tensor()).expect("dB").clone(),
            grads.get(x.as_tensor()).expect("dx").clone(),
        ])
    };
    let bf16 = run(MatmulPrecision::Bf16)?;
    let f32 = run(MatmulPrecision::F32)?;
    assert_eq!(
        max_abs_diff(&bf16[1], &f32[1]),
        0.0,
        "dA depends on the precision"
    );
    assert_eq!(
        max_abs_diff(&bf16[2], &f32[2]),
        0.0,
        "dB depends on the precision"
    );
    // bf16 keeps 8 significant bits: |x·Wᵀ| ≲ 5 here, so the rounding moves it by ≲ 0.05.
    for (i, name) in [(0, "output"), (3, "input gradient")] {
        let diff = max_abs_diff(&bf16[i], &f32[i]);
        assert!(
            diff > 0.0 && diff < 0.05,
            "{name}: bf16 vs f32 differ by {diff}"
        );
    }
    Ok(())
}
