//! Forward + backward of one adapted linear at all-MiniLM-L6-v2 and BERT-base shapes (f32, CPU):
//! candle's plain matmul with a frozen weight (which still computes the weight gradient) against
//! peft-core's frozen-linear op, each with a LoRA r=8 branch.
//!
//! `cargo bench -p peft-core --bench lora_linear`

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor, Var};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use peft_core::{AdapterConfig, LoraConfig, ModelBuilder, TargetModules, TuningPlan, WeightSource};

fn plan() -> TuningPlan {
    TuningPlan {
        adapter: Some(AdapterConfig::Lora(LoraConfig {
            r: 8,
            lora_alpha: 16.0,
            lora_dropout: 0.0,
            target_modules: TargetModules::Names(vec!["query".into()]),
            layers_to_transform: None,
            layers_pattern: vec![],
            use_rslora: false,
            use_dora: false,
            init: Default::default(),
        })),
        unfreeze: vec![],
        seed: 0,
    }
}

fn bench(c: &mut Criterion) {
    let dev = Device::Cpu;
    let mut group = c.benchmark_group("lora_linear_fwd_bwd");
    group.sample_size(20);
    // (tokens, in, out): MiniLM attention, BERT-base attention, BERT-base FFN up-projection.
    for (m, k, n) in [(1024, 384, 384), (2048, 768, 768), (2048, 768, 3072)] {
        let w = Tensor::randn(0f32, 0.02, (n, k), &dev).unwrap();
        let b = Tensor::zeros(n, DType::F32, &dev).unwrap();
        let weights = HashMap::from([
            ("query.weight".to_string(), w.clone()),
            ("query.bias".to_string(), b.clone()),
        ]);
        let builder =
            ModelBuilder::new(WeightSource::Map(weights), plan(), DType::F32, dev.clone()).unwrap();
        let lora = builder.linear(k, n, true, "query").unwrap();
        builder.parts().unwrap();
        let ad = lora.active_adapter().unwrap();
        let ad = ad.as_lora().unwrap();
        ad.b.set(&Tensor::randn(0f32, 0.02, (n, 8), &dev).unwrap())
            .unwrap();
        let x = Var::randn(0f32, 1.0, (m, k), &dev).unwrap();
        let id = format!("{m}x{k}x{n}");
        group.bench_function(BenchmarkId::new("peft_core_frozen_op", &id), |bench| {
            bench.iter(|| {
                lora.forward(x.as_tensor(), true)
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .backward()
                    .unwrap()
            })
        });
        group.bench_function(BenchmarkId::new("candle_matmul", &id), |bench| {
            bench.iter(|| {
                let base = x
                    .as_tensor()
                    .matmul(&w.t().unwrap())
                    .unwrap()
                    .broadcast_add(&b)
                    .unwrap();
                let delta = x
                    .as_tensor()
                    .matmul(&ad.a.t().unwrap())
                    .unwrap()
                    .matmul(&ad.b.t().unwrap())
                    .unwrap();
                (base + (delta * 2.0).unwrap())
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .backward()
                    .unwrap()
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
