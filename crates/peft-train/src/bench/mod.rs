//! `peft-rs bench`: training-step and inference timings of BERT-shaped models (random weights)
//! under full fine-tuning and PEFT methods, with the same cases and JSON schema as the Python
//! side (benches/compare/peft_gpu_bench.py), the same for MobileNetV2 ([`vision`]), and device
//! kernel checks ([`kernels`]).
//!
//! Timing: `warmup` untimed steps, then `steps` timed ones, each ended by a device
//! synchronisation; the median, 10th and 90th percentiles are reported. Peak memory is the
//! process's peak RSS on the CPU (reset before each case through `/proc/self/clear_refs`) and the
//! high-water mark of the CUDA memory pool on a GPU.

mod adapter_size;
pub mod kernels;
mod memory;
pub mod vision;

use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use peft_core::{AdapterConfig, LoraConfig, ModelBuilder, TargetModules, TuningPlan, WeightSource};
use peft_models::{BertConfig, BertForTokenClassification};
use rand::{Rng, SeedableRng};
use serde::Serialize;

use crate::error::{Result, TrainError};
use crate::optim::{AdamW, AdamWConfig};
use crate::tasks::token_classification::masked_cross_entropy;

/// Runs `f`, naming `what` in its error.
fn ctx<T>(what: &str, f: impl FnOnce() -> candle_core::Result<T>) -> Result<T> {
    f().map_err(|e| TrainError::candle(what, e))
}

/// A model shape to benchmark (random weights).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ModelShape {
    /// all-MiniLM-L6-v2: hidden 384, 6 layers, 12 heads, FFN 1536.
    MiniLm,
    /// BERT-base: hidden 768, 12 layers, 12 heads, FFN 3072.
    BertBase,
    /// A 2-layer, 64-wide BERT for smoke tests.
    Tiny,
    /// torchvision's MobileNetV2 (the cases of [`vision`]).
    MobileNetV2,
}

impl ModelShape {
    /// Parses `minilm`, `bert-base`, `tiny` or `mobilenet-v2`.
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "minilm" => Ok(Self::MiniLm),
            "bert-base" => Ok(Self::BertBase),
            "tiny" => Ok(Self::Tiny),
            "mobilenet-v2" => Ok(Self::MobileNetV2),
            other => Err(TrainError::config(
                "model",
                format!(
                    "unknown bench model `{other}` (expected minilm, bert-base, tiny or \
                     mobilenet-v2)"
                ),
            )),
        }
    }

    /// The BERT configuration of this shape (`None` for MobileNetV2).
    pub fn config(self) -> Option<BertConfig> {
        let (hidden, layers, heads, ffn) = match self {
            Self::MiniLm => (384, 6, 12, 1536),
            Self::BertBase => (768, 12, 12, 3072),
            Self::Tiny => (64, 2, 4, 128),
            Self::MobileNetV2 => return None,
        };
        let json = format!(
            r#"{{"vocab_size": 30522, "hidden_size": {hidden}, "num_hidden_layers": {layers},
                "num_attention_heads": {heads}, "intermediate_size": {ffn},
                "max_position_embeddings": 512, "type_vocab_size": 2, "hidden_act": "gelu",
                "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1,
                "layer_norm_eps": 1e-12}}"#
        );
        Some(BertConfig::from_json(&json, "<bench preset>").expect("the presets are valid"))
    }
}

/// What trains (or, for inference, what adapter the model carries).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    /// Every weight trains.
    Full,
    /// LoRA r=8, alpha 16, dropout 0.1 on query and value; the head trains.
    LoraQv,
    /// The same LoRA on every linear of the encoder.
    LoraAll,
    /// IA3 with peft's BERT targets (keys, values, FFN input).
    Ia3,
    /// Pfeiffer bottleneck adapters (after each FFN, reduction 16).
    Bottleneck,
}

impl Method {
    /// Parses `full`, `lora-qv`, `lora-all`, `ia3` or `bottleneck`.
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "full" => Ok(Self::Full),
            "lora-qv" => Ok(Self::LoraQv),
            "lora-all" => Ok(Self::LoraAll),
            "ia3" => Ok(Self::Ia3),
            "bottleneck" => Ok(Self::Bottleneck),
            other => Err(TrainError::config(
                "method",
                format!(
                    "unknown bench method `{other}` (expected full, lora-qv, lora-all, ia3 or \
                     bottleneck)"
                ),
            )),
        }
    }

    /// The name used in case names and JSON.
    pub fn name(self) -> &'static str {
        match self {
            Self::Full => "full",
            Self::LoraQv => "lora-qv",
            Self::LoraAll => "lora-all",
            Self::Ia3 => "ia3",
            Self::Bottleneck => "bottleneck",
        }
    }

    fn plan(self) -> TuningPlan {
        let lora = |targets: &[&str]| {
            Some(AdapterConfig::Lora(LoraConfig {
                r: 8,
                lora_alpha: 16.0,
                lora_dropout: 0.1,
                target_modules: TargetModules::Names(
                    targets.iter().map(|s| s.to_string()).collect(),
                ),
                layers_to_transform: None,
                layers_pattern: vec![],
                use_rslora: false,
                use_dora: false,
                init: Default::default(),
            }))
        };
        match self {
            Self::Full => TuningPlan {
                adapter: None,
                unfreeze: vec![".*".into()],
                seed: 0,
            },
            Self::LoraQv => TuningPlan {
                adapter: lora(&["query", "value"]),
                unfreeze: vec![],
                seed: 0,
            },
            Self::LoraAll => TuningPlan {
                adapter: lora(&["query", "key", "value", "dense"]),
                unfreeze: vec![],
                seed: 0,
            },
            Self::Ia3 => TuningPlan {
                adapter: Some(AdapterConfig::Ia3(peft_core::Ia3Config::bert_default())),
                unfreeze: vec![],
                seed: 0,
            },
            Self::Bottleneck => TuningPlan {
                adapter: Some(AdapterConfig::Bottleneck(peft_core::BottleneckConfig {
                    placement: Default::default(),
                    reduction_factor: 16,
                    non_linearity: Default::default(),
                    residual: true,
                    scaling: 1.0,
                    layers_to_transform: None,
                })),
                unfreeze: vec![],
                seed: 0,
            },
        }
    }
}

/// One benchmark run's settings.
#[derive(Clone, Debug)]
pub struct BenchSettings {
    /// Model shape.
    pub model: ModelShape,
    /// Where to run.
    pub device: Device,
    /// Activation and frozen-weight dtype (trainable weights and optimizer state stay f32).
    pub dtype: DType,
    /// Sequences per batch.
    pub batch: usize,
    /// Timed steps per case.
    pub steps: usize,
    /// Untimed steps before.
    pub warmup: usize,
    /// Also time forward, backward and optimizer apart (synchronising between them).
    pub phases: bool,
}

/// One measured case, in the JSON schema shared with the Python side.
#[derive(Clone, Debug, Serialize)]
pub struct CaseResult {
    /// `train`, `infer` or `linear`.
    pub kind: String,
    /// e.g. `train/lora-qv/seq128`.
    pub name: String,
    /// The method or variant.
    pub method: String,
    /// Sequences per batch.
    pub batch: Option<usize>,
    /// Tokens per sequence.
    pub seq: Option<usize>,
    /// `[M, K, N, r]` for linear cases.
    pub shape: Option<[usize; 4]>,
    /// Median step time.
    pub median_ms: f64,
    /// 10th percentile.
    pub p10_ms: f64,
    /// 90th percentile.
    pub p90_ms: f64,
    /// Tokens (rows for linear cases) per second at the median.
    pub tokens_per_s: f64,
    /// Peak memory during the case (RSS on CPU, pool high-water mark on CUDA).
    pub peak_bytes: Option<u64>,
    /// Trainable parameters.
    pub trainable_params: Option<usize>,
    /// Bytes of the adapter folder the trained case would save (training cases).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub adapter_bytes: Option<u64>,
    /// Why the case failed, if it did.
    pub error: Option<String>,
    /// Median forward / backward / optimizer times of a training step, timed apart (`--phases`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub phases_ms: Option<[f64; 3]>,
}

impl CaseResult {
    /// A case from its step times (or why it failed), each step processing `tokens` tokens (or
    /// rows); the fields that depend on the kind of case are left empty.
    fn timed(
        kind: &str,
        name: String,
        method: &str,
        tokens: usize,
        measured: Result<Vec<f64>>,
    ) -> Self {
        let mut c = Self {
            kind: kind.into(),
            name,
            method: method.into(),
            batch: None,
            seq: None,
            shape: None,
            median_ms: f64::NAN,
            p10_ms: f64::NAN,
            p90_ms: f64::NAN,
            tokens_per_s: f64::NAN,
            peak_bytes: None,
            trainable_params: None,
            adapter_bytes: None,
            error: None,
            phases_ms: None,
        };
        match measured {
            Ok(mut times) => {
                (c.median_ms, c.p10_ms, c.p90_ms) = percentiles(&mut times);
                c.tokens_per_s = tokens as f64 / (c.median_ms / 1e3);
            }
            Err(e) => c.error = Some(e.to_string()),
        }
        c
    }

    /// A case over `shape = [rows, in, out, r]` (tokens per second = rows per second).
    pub fn from_rows(
        kind: &str,
        name: String,
        method: &str,
        shape: [usize; 4],
        trainable_params: Option<usize>,
        measured: Result<Vec<f64>>,
    ) -> Self {
        Self {
            shape: Some(shape),
            trainable_params,
            ..Self::timed(kind, name, method, shape[0], measured)
        }
    }
}

/// Median, p10 and p90 of `times` (ms).
pub fn percentiles(times: &mut [f64]) -> (f64, f64, f64) {
    times.sort_by(|a, b| a.total_cmp(b));
    let at = |q: f64| times[((times.len() - 1) as f64 * q).round() as usize];
    (at(0.5), at(0.1), at(0.9))
}

/// Runs `step` `warmup + steps` times and returns the sorted timed durations (ms).
pub fn time_steps(
    device: &Device,
    warmup: usize,
    steps: usize,
    mut step: impl FnMut() -> Result<()>,
) -> Result<Vec<f64>> {
    for _ in 0..warmup {
        step()?;
        ctx("synchronize", || device.synchronize())?;
    }
    let mut times = Vec::with_capacity(steps);
    for _ in 0..steps.max(1) {
        let t = Instant::now();
        step()?;
        ctx("synchronize", || device.synchronize())?;
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    Ok(times)
}

fn build_model(s: &BenchSettings, plan: TuningPlan) -> Result<BertForTokenClassification> {
    let builder = ModelBuilder::new(WeightSource::Random(0), plan, s.dtype, s.device.clone())?;
    let config = s
        .model
        .config()
        .ok_or_else(|| TrainError::config("model", format!("{:?} is not a BERT shape", s.model)))?;
    Ok(BertForTokenClassification::new(&config, 9, builder)?)
}

struct Inputs {
    ids: Tensor,
    types: Tensor,
    mask: Tensor,
    labels: Vec<i64>,
}

fn inputs(s: &BenchSettings, seq: usize) -> Result<Inputs> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    let n = s.batch * seq;
    let ids: Vec<u32> = (0..n).map(|_| rng.gen_range(1000..30000)).collect();
    let labels: Vec<i64> = (0..n).map(|_| rng.gen_range(0..9)).collect();
    let shape = (s.batch, seq);
    Ok(Inputs {
        ids: ctx("inputs", || Tensor::from_vec(ids, shape, &s.device))?,
        types: ctx("inputs", || Tensor::zeros(shape, DType::U32, &s.device))?,
        mask: ctx("inputs", || Tensor::ones(shape, DType::U32, &s.device))?,
        labels,
    })
}

fn case(
    kind: &str,
    method: &str,
    s: &BenchSettings,
    seq: usize,
    measured: Result<(Vec<f64>, Option<usize>)>,
    peak: Option<u64>,
) -> CaseResult {
    let trainable = measured.as_ref().ok().and_then(|(_, n)| *n);
    let name = format!("{kind}/{method}/seq{seq}");
    let times = measured.map(|(times, _)| times);
    CaseResult {
        batch: Some(s.batch),
        seq: Some(seq),
        peak_bytes: peak,
        trainable_params: trainable,
        ..CaseResult::timed(kind, name, method, s.batch * seq, times)
    }
}

/// Training-step timings of `method` at sequence length `seq`: forward, token cross-entropy,
/// backward and an AdamW step (lr 1e-4) over the trainable parameters.
pub fn train_case(s: &BenchSettings, method: Method, seq: usize) -> CaseResult {
    let mem = memory::PeakMeter::start(&s.device);
    let measured = (|| {
        let model = build_model(s, method.plan())?;
        let trainable = model.parts.params.num_elements();
        let input = inputs(s, seq)?;
        let config = AdamWConfig {
            lr: 1e-4,
            ..Default::default()
        };
        let mut opt = AdamW::new(model.parts.params.named_vars(), config)?;
        // Forward and the token cross-entropy (computed in f32 whatever the model's dtype).
        let loss = || -> Result<Tensor> {
            let logits = model.forward(&input.ids, &input.types, &input.mask, true)?;
            Ok(masked_cross_entropy(&logits, &input.labels)?.0)
        };
        let times = time_steps(&s.device, s.warmup, s.steps, || {
            let loss = loss()?;
            let grads = ctx("backward", || loss.backward())?;
            opt.step(&grads)
        })?;
        let phases = if s.phases {
            let mut split = [vec![], vec![], vec![]];
            let sync = || ctx("synchronize", || s.device.synchronize());
            for _ in 0..s.steps.max(1) {
                let t = Instant::now();
                let loss = loss()?;
                sync()?;
                let t1 = Instant::now();
                let grads = ctx("backward", || loss.backward())?;
                sync()?;
                let t2 = Instant::now();
                opt.step(&grads)?;
                sync()?;
                let ms = |a: Instant, b: Instant| (b - a).as_secs_f64() * 1e3;
                split[0].push(ms(t, t1));
                split[1].push(ms(t1, t2));
                split[2].push(ms(t2, Instant::now()));
            }
            Some(split.map(|mut v| percentiles(&mut v).0))
        } else {
            None
        };
        // The peak is read before the adapter is written: saving is not part of a step.
        let peak = mem.peak();
        let bytes = adapter_size::adapter_bytes(&model.parts)?;
        Ok((times, Some(trainable), phases, peak, bytes))
    })();
    let (measured, phases, peak, bytes) = match measured {
        Ok((times, trainable, phases, peak, bytes)) => {
            (Ok((times, trainable)), phases, peak, Some(bytes))
        }
        Err(e) => (Err(e), None, mem.peak(), None),
    };
    let mut c = case("train", method.name(), s, seq, measured, peak);
    c.phases_ms = phases;
    c.adapter_bytes = bytes;
    c
}

/// Inference variants: the base model, LoRA (query, value) unmerged, and the same merged.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InferVariant {
    /// No adapter.
    Base,
    /// LoRA applied beside the frozen weights.
    LoraUnmerged,
    /// LoRA folded into the weights.
    LoraMerged,
}

impl InferVariant {
    /// All variants, in report order.
    pub const ALL: [Self; 3] = [Self::Base, Self::LoraUnmerged, Self::LoraMerged];

    /// Gives a LoRA model's B factors values (they start at zero, which would make the adapter
    /// a no-op) and merges them for [`Self::LoraMerged`].
    fn prepare(self, parts: &peft_core::TunedParts) -> Result<()> {
        if self != Self::Base {
            for (name, var) in parts.params.named_vars() {
                if name.contains("lora_B") {
                    let t = ctx("init", || var.randn_like(0.0, 0.02))?;
                    ctx("init", || var.set(&t))?;
                }
            }
        }
        if self == Self::LoraMerged {
            parts.registry.merge_all()?;
        }
        Ok(())
    }

    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::Base => "base",
            Self::LoraUnmerged => "lora-unmerged",
            Self::LoraMerged => "lora-merged",
        }
    }
}

/// Inference (eval mode, no gradient) timings of one variant at sequence length `seq`.
pub fn infer_case(s: &BenchSettings, variant: InferVariant, seq: usize) -> CaseResult {
    let mem = memory::PeakMeter::start(&s.device);
    let measured = (|| {
        let plan = match variant {
            InferVariant::Base => TuningPlan::default(),
            _ => Method::LoraQv.plan(),
        };
        let model = build_model(s, plan)?;
        variant.prepare(&model.parts)?;
        let input = inputs(s, seq)?;
        let times = time_steps(&s.device, s.warmup, s.steps, || {
            model.forward(&input.ids, &input.types, &input.mask, false)?;
            Ok(())
        })?;
        Ok((times, None))
    })();
    case("infer", variant.name(), s, seq, measured, mem.peak())
}
