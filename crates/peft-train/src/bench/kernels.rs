//! Device kernel checks and LoRA-linear timings (`peft-rs bench --suite kernels`).
//!
//! Every op of `peft_core::ops` runs on the device on fresh random inputs of several shapes (odd
//! sizes included) and is compared with the same op on the CPU in f32 (the CPU paths are tested
//! against composite candle ops and finite differences in peft-core). Errors are normwise:
//! `max |device − cpu| / max |cpu|`. Bounds: 1e-5 in f32; 1e-2 in bf16, where the CPU reference
//! runs on the same bf16-rounded inputs, so the bound covers bf16 rounding of outputs and
//! intermediates (2⁻⁸ relative each) accumulated in f32. A whole training step of a small BERT
//! on the device is compared with the CPU step the same way (same weights, same dropout masks).

use candle_core::{DType, Device, Tensor, Var};
use peft_core::ops::{
    attention, attention_reference, dropout_mask, frozen_linear, gelu, layer_norm, lora_linear,
    lora_linear_reference, masked_softmax, multi_lora_linear, multi_lora_linear_reference,
    AttentionSpec, LoraBranch, LoraStack, NO_ADAPTER,
};
use serde::Serialize;

use super::{ctx, time_steps, CaseResult};
use crate::error::Result;

/// One correctness check.
#[derive(Clone, Debug, Serialize)]
pub struct Check {
    /// What was compared, e.g. `lora_linear/dA`.
    pub name: String,
    /// `f32` or `bf16`.
    pub dtype: String,
    /// The input shape.
    pub shape: Vec<usize>,
    /// `max |device − cpu|`.
    pub max_abs: f64,
    /// `max_abs / max |cpu|`.
    pub rel: f64,
    /// The bound `rel` must stay within.
    pub bound: f64,
    /// Whether it did.
    pub pass: bool,
}

fn bound(dtype: DType) -> f64 {
    if dtype == DType::BF16 {
        1e-2
    } else {
        1e-5
    }
}

fn compare(name: &str, dtype: DType, shape: &[usize], dev: &Tensor, cpu: &Tensor) -> Result<Check> {
    let dev = ctx("compare", || {
        dev.to_device(&Device::Cpu)?.to_dtype(DType::F32)
    })?;
    let cpu = ctx("compare", || cpu.to_dtype(DType::F32))?;
    let max = |t: &Tensor| -> Result<f64> {
        Ok(ctx("compare", || {
            t.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()
        })? as f64)
    };
    let max_abs = max(&ctx("compare", || &dev - &cpu)?)?;
    let scale = max(&cpu)?.max(f64::MIN_POSITIVE);
    let rel = max_abs / scale;
    let b = bound(dtype);
    Ok(Check {
        name: name.into(),
        dtype: format!("{dtype:?}").to_lowercase(),
        shape: shape.to_vec(),
        max_abs,
        rel,
        bound: b,
        pass: rel.is_finite() && rel <= b,
    })
}

/// A random tensor rounded to `dtype` (f32 values), so that device and CPU see the same inputs.
fn rand_rounded(shape: &[usize], std: f64, dtype: DType) -> Result<Tensor> {
    ctx("inputs", || {
        Tensor::randn(0f32, std as f32, shape, &Device::Cpu)?
            .to_dtype(dtype)?
            .to_dtype(DType::F32)
    })
}

fn on(t: &Tensor, device: &Device, dtype: DType) -> Result<Tensor> {
    ctx("inputs", || t.to_device(device)?.to_dtype(dtype))
}

/// `f(inputs)` on the device in `dtype` and on the CPU in f32; compares the outputs and the
/// gradients of `sum(out · weights)` with respect to each input.
fn check_op(
    checks: &mut Vec<Check>,
    name: &str,
    device: &Device,
    dtype: DType,
    inputs: &[Tensor],
    f: &dyn Fn(&[Tensor]) -> candle_core::Result<Tensor>,
) -> Result<()> {
    let run = |dev: &Device, dt: DType| -> Result<(Tensor, Vec<Tensor>)> {
        let vars: Vec<Var> = inputs
            .iter()
            .map(|t| {
                ctx("inputs", || {
                    Var::from_tensor(&t.to_device(dev)?.to_dtype(dt)?)
                })
            })
            .collect::<Result<_>>()?;
        let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let out = ctx(name, || f(&ts))?;
        let w = ctx("weights", || {
            Tensor::ones(out.shape(), DType::F32, &Device::Cpu)?
                .cumsum(out.rank() - 1)?
                .sin()?
                .to_device(dev)?
                .to_dtype(dt)
        })?;
        let grads = ctx("backward", || (&out * &w)?.sum_all()?.backward())?;
        let gs = ts
            .iter()
            .map(|t| {
                grads
                    .get(t)
                    .cloned()
                    .ok_or_else(|| crate::error::TrainError::config(name, "no gradient"))
            })
            .collect::<Result<_>>()?;
        Ok((out, gs))
    };
    let (out_d, g_d) = run(device, dtype)?;
    let (out_c, g_c) = run(&Device::Cpu, DType::F32)?;
    let shape = inputs[0].dims().to_vec();
    checks.push(compare(
        &format!("{name}/out"),
        dtype,
        &shape,
        &out_d,
        &out_c,
    )?);
    for (i, (d, c)) in g_d.iter().zip(&g_c).enumerate() {
        checks.push(compare(&format!("{name}/d{i}"), dtype, &shape, d, c)?);
    }
    Ok(())
}

/// Runs every op check on `device` in f32 and bf16 (f32 only on the CPU).
pub fn op_checks(device: &Device) -> Result<Vec<Check>> {
    let dtypes: &[DType] = if device.is_cpu() {
        &[DType::F32]
    } else {
        &[DType::F32, DType::BF16]
    };
    let mut checks = vec![];
    for &dt in dtypes {
        for (m, k, n, r) in [(7, 13, 11, 3), (257, 384, 1536, 8), (1000, 768, 768, 16)] {
            let w_cpu = rand_rounded(&[n, k], 0.05, dt)?;
            let bias = rand_rounded(&[n], 0.5, dt)?;
            let mask = ctx("mask", || {
                dropout_mask(5, 0.9, &(m, k).into(), DType::F32, &Device::Cpu)
            })?;
            let inputs = [
                rand_rounded(&[m, k], 1.0, dt)?,
                rand_rounded(&[r, k], 0.05, dt)?,
                rand_rounded(&[n, r], 0.05, dt)?,
            ];
            let (w_dev, w_c, b_dev, m_dev) = (
                on(&w_cpu, device, dt)?,
                w_cpu.clone(),
                on(&bias, device, dt)?,
                on(&mask, device, dt)?,
            );
            check_op(&mut checks, "lora_linear", device, dt, &inputs, &|t| {
                let (w, b, m) = if t[0].device().is_cpu() {
                    (&w_c, bias.clone(), mask.clone())
                } else {
                    (&w_dev, b_dev.clone(), m_dev.clone())
                };
                let branch = LoraBranch {
                    a: &t[1],
                    b: &t[2],
                    scale: 2.0,
                    mask: Some(&m),
                };
                lora_linear(&t[0], w, Some(&b), &branch)
            })?;
            check_op(
                &mut checks,
                "frozen_linear",
                device,
                dt,
                &inputs[..1],
                &|t| {
                    let w = if t[0].device().is_cpu() { &w_c } else { &w_dev };
                    frozen_linear(&t[0], w, None)
                },
            )?;
        }
        for (rows, h) in [(5, 7), (300, 384), (129, 1000)] {
            let gamma = rand_rounded(&[h], 1.0, dt)?;
            let beta = rand_rounded(&[h], 1.0, dt)?;
            let (g_d, b_d) = (on(&gamma, device, dt)?, on(&beta, device, dt)?);
            let x = [rand_rounded(&[rows, h], 2.0, dt)?];
            check_op(&mut checks, "layer_norm", device, dt, &x, &|t| {
                if t[0].device().is_cpu() {
                    layer_norm(&t[0], &gamma, &beta, 1e-12)
                } else {
                    layer_norm(&t[0], &g_d, &b_d, 1e-12)
                }
            })?;
            check_op(&mut checks, "gelu", device, dt, &x, &|t| gelu(&t[0]))?;
        }
        for (b, heads, q, keys) in [(2, 3, 5, 7), (4, 12, 128, 128), (2, 2, 77, 512)] {
            let valid: Vec<f32> = (0..b * keys)
                .map(|i| {
                    if i % keys < keys - i / keys - 1 {
                        0.0
                    } else {
                        f32::MIN
                    }
                })
                .collect();
            let mask = ctx("mask", || Tensor::from_vec(valid, (b, keys), &Device::Cpu))?;
            let mask_d = ctx("mask", || mask.to_device(device))?;
            let x = [rand_rounded(&[b, heads, q, keys], 3.0, dt)?];
            check_op(&mut checks, "masked_softmax", device, dt, &x, &|t| {
                let m = if t[0].device().is_cpu() {
                    &mask
                } else {
                    &mask_d
                };
                masked_softmax(&t[0], Some(m), 0.125)
            })?;
        }
        for (rows, k, n, r, adapters) in [(9, 13, 7, 3, 3), (1000, 768, 768, 8, 16)] {
            checks.push(multi_lora_check(device, dt, (rows, k, n, r, adapters))?);
        }
        if dt == DType::F32 {
            checks.push(adamw_check(device)?);
        }
        for (b, s, heads, d, with_dropout) in [
            (2, 7, 3, 5, false),
            (3, 128, 12, 64, true),
            (2, 77, 4, 32, true),
        ] {
            let valid: Vec<f32> = (0..b * s)
                .map(|i| if i % s < s - i / s - 1 { 0.0 } else { f32::MIN })
                .collect();
            let mask = ctx("mask", || Tensor::from_vec(valid, (b, s), &Device::Cpu))?;
            let mask_d = ctx("mask", || mask.to_device(device))?;
            let dropout = with_dropout.then_some((99u64, 0.9f32));
            let qkv: Vec<Tensor> = (0..3)
                .map(|_| rand_rounded(&[b, s, heads * d], 1.0, dt))
                .collect::<Result<_>>()?;
            check_op(&mut checks, "attention", device, dt, &qkv, &|t| {
                let on_cpu = t[0].device().is_cpu();
                let spec = AttentionSpec {
                    heads,
                    scale: 1.0 / (d as f64).sqrt(),
                    mask: Some(if on_cpu { &mask } else { &mask_d }),
                    dropout,
                };
                if on_cpu {
                    attention_reference(&t[0], &t[1], &t[2], &spec)
                } else {
                    attention(&t[0], &t[1], &t[2], &spec)
                }
            })?;
        }
        let shape: candle_core::Shape = (1001, 77).into();
        let d = ctx("dropout", || dropout_mask(42, 0.9, &shape, dt, device))?;
        // The CPU mask rounded to the device dtype: the same values must come out exactly.
        let c = ctx("dropout", || {
            dropout_mask(42, 0.9, &shape, DType::F32, &Device::Cpu)?.to_dtype(dt)
        })?;
        let mut exact = compare("dropout_mask", dt, shape.dims(), &d, &c)?;
        exact.bound = 0.0;
        exact.pass = exact.max_abs == 0.0;
        checks.push(exact);
    }
    Ok(checks)
}

/// Three AdamW steps (weight decay, gradient scale) on the device against the CPU, from the same
/// parameter and the same gradients (f32).
fn adamw_check(device: &Device) -> Result<Check> {
    use crate::optim::{AdamW, AdamWConfig};
    let shape = [333usize, 77];
    let p0 = rand_rounded(&shape, 1.0, DType::F32)?;
    let grads: Vec<Tensor> = (0..3)
        .map(|_| rand_rounded(&shape, 0.1, DType::F32))
        .collect::<Result<_>>()?;
    let run = |dev: &Device| -> Result<Tensor> {
        let var = ctx("adamw", || Var::from_tensor(&p0.to_device(dev)?))?;
        let config = AdamWConfig {
            lr: 1e-2,
            weight_decay: 0.1,
            ..Default::default()
        };
        let mut opt = AdamW::new([("w".to_string(), var.clone())], config)?;
        for g in &grads {
            // A gradient store holding `g` for the parameter: d(sum(p ⊙ g))/dp = g.
            let store = ctx("adamw", || {
                (var.as_tensor() * g.to_device(dev)?)?.sum_all()?.backward()
            })?;
            opt.step_scaled(&store, 0.5)?;
        }
        Ok(var.as_tensor().clone())
    };
    let (d, c) = (run(device)?, run(&Device::Cpu)?);
    compare("adamw_step", DType::F32, &shape, &d, &c)
}

/// Row `i`'s adapter in the multi-adapter cases: every `adapters + 1`-th row uses none.
fn adapter_of_row(rows: usize, adapters: usize) -> Vec<u32> {
    (0..rows)
        .map(|i| match (i * 7919) % (adapters + 1) {
            a if a == adapters => NO_ADAPTER,
            a => a as u32,
        })
        .collect()
}

fn random_stack(
    k: usize,
    n: usize,
    r: usize,
    adapters: usize,
    dt: DType,
    device: &Device,
) -> Result<LoraStack> {
    let list: Vec<(Tensor, Tensor, f64)> = (0..adapters)
        .map(|i| -> Result<_> {
            Ok((
                on(&rand_rounded(&[r, k], 0.05, dt)?, device, dt)?,
                on(&rand_rounded(&[n, r], 0.05, dt)?, device, dt)?,
                1.0 + 0.25 * i as f64,
            ))
        })
        .collect::<Result<_>>()?;
    ctx("stack", || LoraStack::new(&list))
}

/// The multi-adapter (BGMV) linear on the device against the CPU's one-adapter-at-a-time
/// reference on the same values.
fn multi_lora_check(
    device: &Device,
    dt: DType,
    (rows, k, n, r, adapters): (usize, usize, usize, usize, usize),
) -> Result<Check> {
    let x = rand_rounded(&[rows, k], 1.0, dt)?;
    let w = rand_rounded(&[n, k], 0.05, dt)?;
    let stack = random_stack(k, n, r, adapters, dt, device)?;
    let idx = adapter_of_row(rows, adapters);
    let out = ctx("multi-lora", || {
        let idx_t = Tensor::new(idx.as_slice(), device)?;
        multi_lora_linear(
            &x.to_device(device)?.to_dtype(dt)?,
            &w.to_device(device)?.to_dtype(dt)?,
            None,
            &stack,
            &idx_t,
        )
    })?;
    let reference = ctx("multi-lora", || {
        let cpu = LoraStack {
            a: stack.a.to_device(&Device::Cpu)?.to_dtype(DType::F32)?,
            b: stack.b.to_device(&Device::Cpu)?.to_dtype(DType::F32)?,
            scales: stack.scales.to_device(&Device::Cpu)?,
        };
        multi_lora_linear_reference(&x, &w, None, &cpu, &idx)
    })?;
    compare(
        "multi_lora_linear",
        dt,
        &[rows, k, n, r, adapters],
        &out,
        &reference,
    )
}

/// The dtype the timings run in: bf16 on a GPU, f32 on the CPU (no bf16 kernels there).
fn timing_dtype(device: &Device) -> DType {
    if device.is_cpu() {
        DType::F32
    } else {
        DType::BF16
    }
}

/// Serving many adapters at once: a batch whose rows use `adapters` different LoRAs (forward
/// only): the BGMV op, the same one adapter at a time with plain ops, and the base linear alone
/// (what a merged single-adapter model costs).
pub fn multi_adapter_cases(
    device: &Device,
    shapes: &[[usize; 4]],
    adapters: usize,
    warmup: usize,
    steps: usize,
) -> Vec<CaseResult> {
    let dt = timing_dtype(device);
    let mut out = vec![];
    for &[m, k, n, r] in shapes {
        for method in ["base_only", "bgmv", "per_adapter_loop"] {
            let measured = (|| -> Result<Vec<f64>> {
                let x = on(&rand_rounded(&[m, k], 1.0, dt)?, device, dt)?;
                let w = on(&rand_rounded(&[n, k], 0.02, dt)?, device, dt)?;
                let stack = random_stack(k, n, r, adapters, dt, device)?;
                let idx = adapter_of_row(m, adapters);
                let idx_t = ctx("index", || Tensor::new(idx.as_slice(), device))?;
                time_steps(device, warmup, steps, || {
                    ctx("forward", || match method {
                        "base_only" => frozen_linear(&x, &w, None),
                        "bgmv" => multi_lora_linear(&x, &w, None, &stack, &idx_t),
                        _ => multi_lora_linear_reference(&x, &w, None, &stack, &idx),
                    })?;
                    Ok(())
                })
            })();
            let name = format!("multi_adapter/{method}/{m}x{k}x{n}r{r}x{adapters}");
            let c =
                CaseResult::from_rows("multi_adapter", name, method, [m, k, n, r], None, measured);
            out.push(c);
        }
    }
    out
}

/// One training step of a small BERT with LoRA on query and value (f32, dropout on): loss and
/// every trainable parameter's gradient on `device` against the CPU. Same weights, inputs and
/// dropout masks on both (all drawn from seeded host generators). Bound 1e-4 (normwise).
pub fn step_checks(device: &Device) -> Result<Vec<Check>> {
    let run = |dev: &Device| -> Result<(Tensor, Vec<(String, Tensor)>)> {
        let s = super::BenchSettings {
            model: super::ModelShape::Tiny,
            device: dev.clone(),
            dtype: DType::F32,
            batch: 3,
            steps: 1,
            warmup: 0,
            phases: false,
        };
        let model = super::build_model(&s, super::Method::LoraQv.plan())?;
        for (name, var) in model.parts.params.named_vars() {
            if name.contains("lora_B") {
                // B starts at zero, which would make dA zero; give it fixed non-zero values.
                let n = var.elem_count();
                let t = ctx("init", || {
                    Tensor::arange(0f32, n as f32, &Device::Cpu)?
                        .affine(0.37, 0.0)?
                        .sin()?
                        .affine(0.05, 0.0)?
                        .reshape(var.shape())?
                        .to_device(dev)
                })?;
                ctx("init", || var.set(&t))?;
            }
        }
        let input = super::inputs(&s, 16)?;
        let logits = model.forward(&input.ids, &input.types, &input.mask, true)?;
        let (loss, _) =
            crate::tasks::token_classification::masked_cross_entropy(&logits, &input.labels)?;
        let grads = ctx("backward", || loss.backward())?;
        let mut named = vec![];
        for (name, var) in model.parts.params.named_vars() {
            if let Some(g) = grads.get(var.as_tensor()) {
                named.push((name, g.clone()));
            }
        }
        named.sort_by(|a, b| a.0.cmp(&b.0));
        Ok((loss, named))
    };
    let (loss_d, grads_d) = run(device)?;
    let (loss_c, grads_c) = run(&Device::Cpu)?;
    let mut checks = vec![compare(
        "train_step/loss",
        DType::F32,
        &[],
        &loss_d,
        &loss_c,
    )?];
    if grads_d.len() != grads_c.len() || grads_d.is_empty() {
        return Err(crate::error::TrainError::config(
            "train_step",
            format!(
                "{} device gradients vs {} CPU",
                grads_d.len(),
                grads_c.len()
            ),
        ));
    }
    for ((name, d), (_, c)) in grads_d.iter().zip(&grads_c) {
        checks.push(compare(
            &format!("train_step/grad/{name}"),
            DType::F32,
            d.dims(),
            d,
            c,
        )?);
    }
    for c in &mut checks {
        c.bound = 1e-4;
        c.pass = c.rel.is_finite() && c.rel <= c.bound;
    }
    Ok(checks)
}

/// The LoRA linear alone (bf16 on CUDA, f32 on the CPU): the frozen linear's forward + dx
/// against the fused LoRA linear's forward + (dx, dA, dB), and against the same from plain
/// candle ops (unfused), at `(tokens, in, out, r)` shapes; plus forward-only timings of candle's
/// matmul and of the frozen-linear op, to tell GEMM speed from autograd overhead.
pub fn linear_cases(
    device: &Device,
    shapes: &[[usize; 4]],
    warmup: usize,
    steps: usize,
) -> Vec<CaseResult> {
    let dt = timing_dtype(device);
    let mut out = vec![];
    for &[m, k, n, r] in shapes {
        for method in [
            "frozen",
            "lora_fused",
            "lora_unfused",
            "matmul_fwd",
            "frozen_fwd",
            "dx_matmul",
        ] {
            let measured = (|| -> Result<Vec<f64>> {
                let t = |shape: &[usize], std: f32| -> candle_core::Result<Tensor> {
                    Tensor::randn(0f32, std, shape, device)?.to_dtype(dt)
                };
                let x = ctx("inputs", || Var::from_tensor(&t(&[m, k], 1.0)?))?;
                let w = ctx("inputs", || t(&[n, k], 0.02))?;
                let a = ctx("inputs", || Var::from_tensor(&t(&[r, k], 0.02)?))?;
                let b = ctx("inputs", || Var::from_tensor(&t(&[n, r], 0.02)?))?;
                let branch = LoraBranch {
                    a: a.as_tensor(),
                    b: b.as_tensor(),
                    scale: 2.0,
                    mask: None,
                };
                let xd = x.as_tensor().detach();
                let gd = t(&[m, n], 1.0).and_then(|g| g.detach().contiguous());
                let gd = ctx("inputs", || gd)?;
                time_steps(device, warmup, steps, || {
                    let y = match method {
                        "frozen" => frozen_linear(x.as_tensor(), &w, None),
                        "lora_fused" => lora_linear(x.as_tensor(), &w, None, &branch),
                        "lora_unfused" => lora_linear_reference(x.as_tensor(), &w, None, &branch),
                        // Forward only, no autograd: candle's matmul and the frozen-linear op.
                        "matmul_fwd" => w.t().and_then(|wt| xd.matmul(&wt)),
                        // The frozen linear's backward GEMM alone: dx = g·W.
                        "dx_matmul" => gd.matmul(&w),
                        _ => frozen_linear(&xd, &w, None),
                    };
                    let y = ctx("forward", || y)?;
                    if !method.ends_with("_fwd") {
                        ctx("backward", || y.backward())?;
                    }
                    Ok(())
                })
            })();
            let name = format!("linear/{method}/{m}x{k}x{n}r{r}");
            let trainable = Some(if method.starts_with("lora") {
                r * (k + n)
            } else {
                0
            });
            let c =
                CaseResult::from_rows("linear", name, method, [m, k, n, r], trainable, measured);
            out.push(c);
        }
    }
    out
}
