//! `peft-rs bench --model mobilenet-v2`: MobileNetV2 training steps and inference on random
//! weights at the shapes of recipes/mobilenet-fashion-mnist.toml (10 classes, square images of
//! side `--seqs`, batch `--batch`; BatchNorm on batch statistics while training, dropout 0.2
//! before the new head). "Tokens" per second are images per second here.

use candle_core::{DType, Tensor};
use peft_core::{AdapterConfig, BatchNormMode, LoraConfig, ModelBuilder, TargetModules};
use peft_core::{TuningPlan, WeightSource};
use peft_models::{ImageModelOptions, MobileNetV2};
use rand::{Rng, SeedableRng};

use super::{ctx, memory, time_steps, BenchSettings, CaseResult, InferVariant};
use crate::error::{Result, TrainError};
use crate::optim::{AdamW, AdamWConfig};
use crate::tasks::image_classification::cross_entropy;

/// Every 1×1 convolution of torchvision's MobileNetV2 (the recipe's `target_modules`).
const ONE_BY_ONE: &str = r"features\.(1\.conv\.1|([2-9]|1[0-7])\.conv\.(0\.0|2)|18\.0)";

/// Classes of the benchmark task (Fashion-MNIST's).
const CLASSES: usize = 10;

/// What trains in a MobileNetV2 case.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VisionMethod {
    /// Every weight trains.
    Full,
    /// LoRA r=8, alpha 16 on every 1×1 convolution; the new head trains.
    Lora,
    /// Only the new head trains.
    Head,
}

impl VisionMethod {
    /// Parses `full`, `lora` or `head`.
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "full" => Ok(Self::Full),
            "lora" => Ok(Self::Lora),
            "head" => Ok(Self::Head),
            other => Err(TrainError::config(
                "method",
                format!("unknown MobileNetV2 bench method `{other}` (expected full, lora or head)"),
            )),
        }
    }

    /// The name used in case names and JSON.
    pub fn name(self) -> &'static str {
        match self {
            Self::Full => "full",
            Self::Lora => "lora",
            Self::Head => "head",
        }
    }

    fn plan(self) -> TuningPlan {
        match self {
            Self::Full => TuningPlan {
                unfreeze: vec![".*".into()],
                ..Default::default()
            },
            Self::Lora => {
                let mut c = LoraConfig::new(8, 16.0, &[]);
                c.target_modules = TargetModules::Pattern(ONE_BY_ONE.into());
                TuningPlan {
                    adapter: Some(AdapterConfig::Lora(c)),
                    ..Default::default()
                }
            }
            Self::Head => TuningPlan::default(),
        }
    }
}

fn build(s: &BenchSettings, plan: TuningPlan) -> Result<MobileNetV2> {
    let builder = ModelBuilder::new(WeightSource::Random(0), plan, s.dtype, s.device.clone())?;
    let options = ImageModelOptions {
        num_labels: CLASSES,
        pretrained_head: false,
        batch_norm: BatchNormMode::Update,
        dropout: 0.2,
    };
    Ok(MobileNetV2::new(builder, options)?)
}

/// A batch of random images of side `side` and their labels.
fn images(s: &BenchSettings, side: usize) -> Result<(Tensor, Vec<u32>)> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    let pixels: Vec<f32> = (0..s.batch * 3 * side * side)
        .map(|_| rng.gen_range(-2.0..2.0))
        .collect();
    let labels = (0..s.batch)
        .map(|_| rng.gen_range(0..CLASSES as u32))
        .collect();
    let x = ctx("images", || {
        Tensor::from_vec(pixels, (s.batch, 3, side, side), &s.device)?.to_dtype(s.dtype)
    })?;
    Ok((x, labels))
}

fn case(
    kind: &str,
    method: &str,
    s: &BenchSettings,
    side: usize,
    measured: Result<(Vec<f64>, Option<usize>)>,
    peak: Option<u64>,
) -> CaseResult {
    let trainable = measured.as_ref().ok().and_then(|(_, n)| *n);
    let name = format!("{kind}/{method}/px{side}");
    let times = measured.map(|(times, _)| times);
    CaseResult {
        batch: Some(s.batch),
        seq: Some(side),
        peak_bytes: peak,
        trainable_params: trainable,
        ..CaseResult::timed(kind, name, method, s.batch, times)
    }
}

/// Training-step timings of `method` on images of side `side`: forward, cross-entropy,
/// backward and an AdamW step (lr 1e-3) over the trainable parameters.
pub fn image_train_case(s: &BenchSettings, method: VisionMethod, side: usize) -> CaseResult {
    let mem = memory::PeakMeter::start(&s.device);
    let measured = (|| {
        let model = build(s, method.plan())?;
        let trainable = model.parts.params.num_elements();
        let (x, labels) = images(s, side)?;
        let config = AdamWConfig {
            lr: 1e-3,
            ..Default::default()
        };
        let mut opt = AdamW::new(model.parts.params.named_vars(), config)?;
        let times = time_steps(&s.device, s.warmup, s.steps, || {
            let logits = model.forward(&x, true)?;
            let loss = cross_entropy(&logits, &labels)?;
            let grads = ctx("backward", || loss.backward())?;
            opt.step(&grads)
        })?;
        Ok((times, Some(trainable)))
    })();
    case("train", method.name(), s, side, measured, mem.peak())
}

/// Inference (eval mode) timings of one variant on images of side `side`: the base model,
/// LoRA on the 1×1 convolutions unmerged, and the same merged into the kernels.
pub fn image_infer_case(s: &BenchSettings, variant: InferVariant, side: usize) -> CaseResult {
    let mem = memory::PeakMeter::start(&s.device);
    let measured = (|| {
        let plan = match variant {
            InferVariant::Base => TuningPlan::default(),
            _ => VisionMethod::Lora.plan(),
        };
        let model = build(s, plan)?;
        variant.prepare(&model.parts)?;
        let (x, _) = images(s, side)?;
        let times = time_steps(&s.device, s.warmup, s.steps, || {
            model.forward(&x, false)?;
            Ok(())
        })?;
        Ok((times, None))
    })();
    case("infer", variant.name(), s, side, measured, mem.peak())
}

/// The dtype a MobileNetV2 case runs in: f32 only (the CNN ops have no half-precision path).
pub fn check_dtype(dtype: DType) -> Result<()> {
    match dtype {
        DType::F32 => Ok(()),
        other => Err(TrainError::config(
            "dtype",
            format!("MobileNetV2 benches run in f32, not {other:?}"),
        )),
    }
}
