//! `peft-rs bench`: training-step, inference and kernel benchmarks on random-weight BERT shapes
//! and MobileNetV2, printed as a table and written as JSON in the schema the Python side
//! (benches/compare/peft_gpu_bench.py) writes, so the two can be put side by side.

use std::path::Path;

use anyhow::{bail, Context, Result};
use candle_core::DType;
use peft_core::device::parse_device;
use peft_train::bench::vision::{self, VisionMethod};
use peft_train::bench::{
    self, kernels, BenchSettings, CaseResult, InferVariant, Method, ModelShape,
};

/// What `peft-rs bench` was asked to run.
pub struct BenchArgs<'a> {
    pub suites: &'a str,
    pub model: &'a str,
    pub methods: Option<&'a str>,
    pub device: &'a str,
    pub dtype: &'a str,
    pub matmul_precision: &'a str,
    pub batch: Option<usize>,
    pub seqs: Option<&'a str>,
    pub steps: usize,
    pub warmup: usize,
    pub out: Option<&'a Path>,
    pub phases: bool,
}

/// The LoRA linear shapes of issue 5 and ../shared/cuda/NOTES.md: (tokens, in, out, r).
const GPU_LINEAR_SHAPES: [[usize; 4]; 5] = [
    [4096, 768, 768, 8],
    [4096, 768, 3072, 8],
    [16384, 768, 768, 8],
    [4096, 4096, 4096, 16],
    [4096, 4096, 11008, 16],
];
/// MiniLM / BERT-base shapes at batch 16, seq 128 for the CPU.
const CPU_LINEAR_SHAPES: [[usize; 4]; 2] = [[2048, 384, 384, 8], [2048, 768, 768, 8]];

fn print_case(c: &CaseResult) {
    if let Some([f, b, o]) = c.phases_ms {
        println!(
            "{:<40} phases: forward {f:.3} ms, backward {b:.3} ms, optimizer {o:.3} ms",
            c.name
        );
    }
    match &c.error {
        Some(e) => println!("{:<40} error: {e}", c.name),
        None => println!(
            "{:<40} {:>10.3} ms {:>12.0} {} {:>10} MiB{}",
            c.name,
            c.median_ms,
            c.tokens_per_s,
            if c.name.contains("/px") {
                "img/s"
            } else {
                "tok/s"
            },
            c.peak_bytes
                .map(|b| format!("{:.0}", b as f64 / (1 << 20) as f64))
                .unwrap_or_else(|| "-".into()),
            c.adapter_bytes
                .map(|b| format!(" {:>10.2} MB adapter", b as f64 / 1e6))
                .unwrap_or_default()
        ),
    }
}

pub fn run(args: &BenchArgs<'_>) -> Result<()> {
    let device = parse_device(args.device)?;
    let dtype = match args.dtype {
        "f32" => DType::F32,
        "bf16" => DType::BF16,
        other => bail!("--dtype: `{other}` is not f32 or bf16"),
    };
    let precision = super::apply_matmul_precision(args.matmul_precision, "--matmul-precision")?;
    let model = ModelShape::parse(args.model)?;
    let image = model == ModelShape::MobileNetV2;
    if image {
        vision::check_dtype(dtype)?;
    }
    let (default_methods, default_batch, default_seqs) = if image {
        ("full,lora,head", 64, "64")
    } else {
        ("full,lora-qv,lora-all", 16, "128")
    };
    let batch = args.batch.unwrap_or(default_batch);
    let settings = BenchSettings {
        model,
        device: device.clone(),
        dtype,
        batch,
        steps: args.steps,
        warmup: args.warmup,
        phases: args.phases,
    };
    let seqs: Vec<usize> = args
        .seqs
        .unwrap_or(default_seqs)
        .split(',')
        .map(|s| {
            s.trim()
                .parse()
                .with_context(|| format!("--seqs: `{s}` is not a number"))
        })
        .collect::<Result<_>>()?;
    let method_names: Vec<&str> = args
        .methods
        .unwrap_or(default_methods)
        .split(',')
        .map(str::trim)
        .collect();
    let (methods, image_methods): (Vec<Method>, Vec<VisionMethod>) = if image {
        let parsed = method_names.iter().map(|m| VisionMethod::parse(m));
        (vec![], parsed.collect::<std::result::Result<_, _>>()?)
    } else {
        let parsed = method_names.iter().map(|m| Method::parse(m));
        (parsed.collect::<std::result::Result<_, _>>()?, vec![])
    };
    println!(
        "# peft-rs {} bench: model {} on {} ({}, frozen matmuls {}, f32 GEMM {}), batch {}, seqs {:?}, warmup {}, steps {}, {} threads",
        env!("CARGO_PKG_VERSION"),
        args.model,
        args.device,
        args.dtype,
        precision,
        peft_core::ops::f32_gemm_backend(),
        batch,
        seqs,
        args.warmup,
        args.steps,
        rayon_threads(),
    );
    let mut cases = vec![];
    let mut checks = vec![];
    let report = |cases: &[CaseResult], checks: &[kernels::Check]| -> Result<()> {
        if let Some(out) = args.out {
            let json = serde_json::json!({
                "tool": "peft-rs",
                "env": {
                    "version": env!("CARGO_PKG_VERSION"),
                    "device": args.device,
                    "dtype": args.dtype,
                    "frozen_matmul": precision,
                    "f32_gemm": peft_core::ops::f32_gemm_backend(),
                    "model": args.model,
                    "threads": rayon_threads(),
                    "cuda_feature": cfg!(feature = "cuda"),
                },
                "cases": cases,
                "checks": checks,
            });
            peft_core::fsio::write_atomic(out, serde_json::to_string_pretty(&json)?.as_bytes())
                .with_context(|| format!("writing {}", out.display()))?;
        }
        Ok(())
    };
    for suite in args.suites.split(',').map(str::trim) {
        match suite {
            "train" => {
                for &seq in &seqs {
                    for &m in &methods {
                        let c = bench::train_case(&settings, m, seq);
                        print_case(&c);
                        cases.push(c);
                        report(&cases, &checks)?;
                    }
                    for &m in &image_methods {
                        let c = vision::image_train_case(&settings, m, seq);
                        print_case(&c);
                        cases.push(c);
                        report(&cases, &checks)?;
                    }
                }
            }
            "infer" => {
                for &seq in &seqs {
                    for v in InferVariant::ALL {
                        let c = if image {
                            vision::image_infer_case(&settings, v, seq)
                        } else {
                            bench::infer_case(&settings, v, seq)
                        };
                        print_case(&c);
                        cases.push(c);
                        report(&cases, &checks)?;
                    }
                }
            }
            "kernels" => {
                // The checks compare against f32 references on the CPU: run them with f32
                // products whatever --matmul-precision says (the timings below follow it).
                let asked = peft_core::ops::frozen_matmul_precision();
                peft_core::ops::set_frozen_matmul_precision(peft_core::ops::MatmulPrecision::F32);
                let checked = kernels::op_checks(&device).and_then(|mut found| {
                    found.extend(kernels::step_checks(&device)?);
                    Ok(found)
                });
                peft_core::ops::set_frozen_matmul_precision(asked);
                let found = checked?;
                for c in &found {
                    println!(
                        "check {:<44} {:<5} rel {:.2e} (bound {:.0e}) {}",
                        c.name,
                        c.dtype,
                        c.rel,
                        c.bound,
                        if c.pass { "ok" } else { "FAIL" }
                    );
                }
                checks.extend(found);
                let shapes: &[[usize; 4]] = if device.is_cpu() {
                    &CPU_LINEAR_SHAPES
                } else {
                    &GPU_LINEAR_SHAPES
                };
                for c in kernels::linear_cases(&device, shapes, args.warmup, args.steps) {
                    print_case(&c);
                    cases.push(c);
                }
                let multi: &[[usize; 4]] = if device.is_cpu() {
                    &[[256, 384, 384, 8]]
                } else {
                    &[[4096, 768, 768, 8], [4096, 4096, 4096, 16]]
                };
                for c in kernels::multi_adapter_cases(&device, multi, 16, args.warmup, args.steps) {
                    print_case(&c);
                    cases.push(c);
                }
                report(&cases, &checks)?;
            }
            other => bail!("--suite: unknown suite `{other}` (expected train, infer or kernels)"),
        }
    }
    report(&cases, &checks)?;
    let failed = checks.iter().filter(|c| !c.pass).count();
    println!(
        "# {} cases, {} checks, {failed} failed",
        cases.len(),
        checks.len()
    );
    if failed > 0 {
        bail!("{failed} kernel checks failed");
    }
    Ok(())
}

fn rayon_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}
