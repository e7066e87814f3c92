//! Adapter methods, one module each (config, layer, merge, keys), registered in one table:
//! [`AdapterConfig`]. Injection, the active-adapter switch, merge and key naming are written once
//! (in [`crate::TunableLinear`], [`crate::Registry`] and [`crate::adapter_io`]) for all of them.

pub mod bottleneck;
pub mod combine;
mod dora;
pub mod ia3;
pub mod lora;
pub mod lora_conv;
pub mod lora_embedding;
pub mod pissa;
pub mod prompt;

use std::fmt::Debug;

use candle_core::{Device, Tensor, Var};
use rand::rngs::StdRng;
use serde::{Deserialize, Serialize};

use crate::error::Result;
use crate::ops::{frozen_linear, DropoutRng};
use crate::target::TargetMatcher;

pub use bottleneck::{BottleneckConfig, BottleneckHook, HookPoint};
pub use combine::{add_weighted_adapter, Combination};
pub use ia3::{Ia3Config, Ia3Layer};
pub use lora::{LoraConfig, LoraInit, LoraLayer};
pub use prompt::{PrefixTuningConfig, PromptSite, PromptTuningConfig, VirtualInput};

/// One adapter method and its settings: the table of methods peft-rs knows. In a recipe the
/// `method` key picks the variant (`method = "lora"`), the other keys are its settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "method", rename_all = "snake_case")]
pub enum AdapterConfig {
    /// Low-rank adaptation (with rsLoRA and DoRA as options).
    Lora(LoraConfig),
    /// Learned rescaling of activations (IA³).
    Ia3(Ia3Config),
    /// Bottleneck MLPs at the layers' hook points (Houlsby, Pfeiffer, parallel).
    Bottleneck(BottleneckConfig),
    /// Trainable key/value prefixes in every attention layer.
    PrefixTuning(PrefixTuningConfig),
    /// Trainable virtual token embeddings before the input.
    PromptTuning(PromptTuningConfig),
}

/// The `peft_type`s peft-rs reads and writes (`BOTTLENECK` is peft-rs's own).
pub const SUPPORTED_PEFT_TYPES: [&str; 5] = [
    "LORA",
    "IA3",
    "PREFIX_TUNING",
    "PROMPT_TUNING",
    "BOTTLENECK",
];

impl AdapterConfig {
    /// peft's `peft_type` for this method.
    pub fn peft_type(&self) -> &'static str {
        match self {
            Self::Lora(_) => "LORA",
            Self::Ia3(_) => "IA3",
            Self::Bottleneck(_) => "BOTTLENECK",
            Self::PrefixTuning(_) => "PREFIX_TUNING",
            Self::PromptTuning(_) => "PROMPT_TUNING",
        }
    }

    /// Checks ranges that serde cannot.
    pub fn validate(&self) -> Result<()> {
        match self {
            Self::Lora(c) => c.validate(),
            Self::Ia3(c) => c.validate(),
            Self::Bottleneck(c) => c.validate(),
            Self::PrefixTuning(c) => c.validate(),
            Self::PromptTuning(c) => c.validate(),
        }
    }

    /// The settings a file records: those of the tensors [`LinearAdapter::tensors_to_save`]
    /// writes (a PiSSA adapter is saved as a plain LoRA of twice the rank).
    pub fn saved_config(&self) -> Self {
        match self {
            Self::Lora(c) if c.init == LoraInit::Pissa => {
                let mut c = c.clone();
                c.r *= 2;
                c.lora_alpha *= if c.use_rslora { 2f64.sqrt() } else { 2.0 };
                c.init = LoraInit::Kaiming;
                Self::Lora(c)
            }
            other => other.clone(),
        }
    }

    /// Whether the adapter can be folded into the base weights.
    pub fn is_mergeable(&self) -> bool {
        matches!(self, Self::Lora(_) | Self::Ia3(_))
    }

    /// The linear layers this adapter targets, compiled (`None` for methods that do not act on
    /// linear layers).
    pub fn linear_targets(&self) -> Result<Option<TargetMatcher>> {
        match self {
            Self::Lora(c) => TargetMatcher::new(
                &c.target_modules,
                c.layers_to_transform.as_deref(),
                &c.layers_pattern,
            )
            .map(Some),
            Self::Ia3(c) => TargetMatcher::new(&c.target_modules, None, &[]).map(Some),
            _ => Ok(None),
        }
    }

    /// Builds this method's layer for the linear at `ctx.path` (already matched by
    /// [`Self::linear_targets`]).
    pub fn linear_layer(&self, ctx: &mut LayerContext<'_>) -> Result<Box<dyn LinearAdapter>> {
        Ok(match self {
            Self::Lora(c) => Box::new(LoraLayer::new(c, ctx)?),
            Self::Ia3(c) => Box::new(Ia3Layer::new(c, ctx)?),
            other => {
                return Err(crate::PeftError::Config {
                    key: "adapter".into(),
                    message: format!("{} does not act on linear layers", other.peft_type()),
                })
            }
        })
    }
}

/// What an adapter layer is built from.
pub struct LayerContext<'a> {
    /// The module path of the layer.
    pub path: &'a str,
    /// The base weight (`out × in`), as loaded.
    pub weight: &'a Tensor,
    /// The adapter's initialisation stream.
    pub rng: &'a mut StdRng,
    /// The model's dropout stream.
    pub dropout_rng: DropoutRng,
    /// Where the adapter's parameters live.
    pub device: &'a Device,
    /// Set by methods that replace the base weight (PiSSA's residual).
    pub new_base_weight: Option<Tensor>,
}

/// The base of a linear layer as an adapter sees it: frozen tensors, or `Var`s when the base
/// itself trains (full fine-tuning, an unfrozen layer).
#[derive(Clone, Copy, Debug)]
pub struct BaseLinear<'a> {
    /// `out × in`.
    pub weight: &'a Tensor,
    /// `out`.
    pub bias: Option<&'a Tensor>,
    /// Whether the base parameters get gradients in this forward pass.
    pub trainable: bool,
}

impl BaseLinear<'_> {
    /// `x·Wᵀ + b` for `x` of shape `(..., in)`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.apply(x, self.bias)
    }

    /// `x·Wᵀ`, without the bias.
    pub fn forward_no_bias(&self, x: &Tensor) -> Result<Tensor> {
        self.apply(x, None)
    }

    fn apply(&self, x: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
        if !self.trainable {
            // Frozen base: one op over `(..., in)` whose backward computes no weight gradient.
            return Ok(frozen_linear(x, self.weight, bias)?);
        }
        if !self.weight.is_variable() {
            // Only the bias trains (BitFit): the frozen op, then the bias, so that no
            // weight-sized gradient is computed.
            let y = frozen_linear(x, self.weight, None)?;
            return Ok(match bias {
                Some(b) => y.broadcast_add(&b.to_dtype(y.dtype())?)?,
                None => y,
            });
        }
        // A trainable base: one op with dx, dW and db (candle's ops, casting the weights to
        // the activations' dtype, where it has no fused path: mixed precision keeps f32 masters).
        Ok(crate::ops::trainable_linear(x, self.weight, bias)?)
    }
}

/// What an adapter method does to one linear layer.
pub trait LinearAdapter: Debug + Send + Sync {
    /// The trainable tensors with their peft key under the layer's path (`lora_A.weight`).
    fn named_params(&self) -> Vec<(String, Var)>;

    /// The layer's output for `x` of shape `(..., in)`.
    fn forward(&self, x: &Tensor, base: &BaseLinear<'_>, train: bool) -> Result<Tensor>;

    /// The base weight and bias with the adapter folded in.
    fn merged(&self, weight: &Tensor, bias: Option<&Tensor>) -> Result<(Tensor, Option<Tensor>)>;

    /// Undoes [`Self::merged`] on its output.
    fn unmerged(&self, weight: &Tensor, bias: Option<&Tensor>) -> Result<(Tensor, Option<Tensor>)>;

    /// The tensors a file stores, with their keys (the parameters, unless the method converts
    /// them at save, as PiSSA does).
    fn tensors_to_save(&self) -> Result<Vec<(String, Tensor)>> {
        Ok(self
            .named_params()
            .into_iter()
            .map(|(n, v)| (n, v.as_tensor().clone()))
            .collect())
    }

    /// The base weight to put back when the adapter is deleted, for methods that changed it.
    fn restored_base(&self, _weight: &Tensor) -> Result<Option<Tensor>> {
        Ok(None)
    }

    /// The LoRA layer, for methods that are one (weighted combinations, inspection).
    fn as_lora(&self) -> Option<&LoraLayer> {
        None
    }
}

/// A parameter as the forward pass uses it: detached at evaluation, so that no autograd graph
/// is built for it.
pub(crate) fn use_param(v: &Var, train: bool) -> Tensor {
    if train {
        v.as_tensor().clone()
    } else {
        v.as_tensor().detach()
    }
}

/// The map of a JSON object literal (the `to_peft` field lists).
pub(crate) fn json_object(v: serde_json::Value) -> serde_json::Map<String, serde_json::Value> {
    match v {
        serde_json::Value::Object(m) => m,
        _ => unreachable!("a JSON object literal"),
    }
}
