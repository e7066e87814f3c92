//! The tuning plan: which adapter goes where, and which base parameters are trained outright.

use regex::Regex;
use serde::{Deserialize, Serialize};

use crate::error::Result;
use crate::target::{full_match_regex, TargetMatcher, TargetModules};

/// How LoRA's `A` matrix is initialised (`B` always starts at zero).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LoraInit {
    /// Kaiming-uniform with `a = √5`, as `nn.Linear` and peft's default.
    #[default]
    Kaiming,
    /// Normal with standard deviation `1/r`, as peft's `init_lora_weights="gaussian"`.
    Gaussian,
}

/// LoRA hyper-parameters, with Hugging Face peft's names.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoraConfig {
    /// Rank of the update.
    pub r: usize,
    /// Scaling numerator: the update is scaled by `lora_alpha / r` (or `/ √r` with rsLoRA).
    #[serde(alias = "alpha")]
    pub lora_alpha: f64,
    /// Dropout on the adapter's input.
    #[serde(default, alias = "dropout")]
    pub lora_dropout: f32,
    /// Modules to adapt.
    pub target_modules: TargetModules,
    /// Restrict to these layer indices.
    #[serde(default)]
    pub layers_to_transform: Option<Vec<usize>>,
    /// Names of the layer list in module paths (peft's defaults when empty).
    #[serde(default)]
    pub layers_pattern: Vec<String>,
    /// Rank-stabilised scaling `lora_alpha / √r`.
    #[serde(default)]
    pub use_rslora: bool,
    /// Initialisation of `A`.
    #[serde(default)]
    pub init: LoraInit,
}

impl LoraConfig {
    /// The factor applied to `B·A·x`.
    pub fn scaling(&self) -> f64 {
        if self.use_rslora {
            self.lora_alpha / (self.r as f64).sqrt()
        } else {
            self.lora_alpha / self.r as f64
        }
    }

    /// Checks ranges that serde cannot.
    pub fn validate(&self) -> Result<()> {
        let bad = |key: &str, message: String| {
            Err(crate::PeftError::Config {
                key: format!("adapter.{key}"),
                message,
            })
        };
        if self.r == 0 {
            return bad("r", "the rank must be at least 1".into());
        }
        if !(0.0..1.0).contains(&self.lora_dropout) {
            return bad(
                "lora_dropout",
                format!(
                    "expected a probability in [0, 1), got {}",
                    self.lora_dropout
                ),
            );
        }
        if !self.lora_alpha.is_finite() {
            return bad("lora_alpha", "expected a finite number".into());
        }
        Ok(())
    }
}

/// One adapter method and its settings: the table of methods peft-rs knows.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "method", rename_all = "snake_case")]
pub enum AdapterConfig {
    /// Low-rank adaptation.
    Lora(LoraConfig),
}

impl AdapterConfig {
    /// peft's `peft_type` for this method.
    pub fn peft_type(&self) -> &'static str {
        match self {
            Self::Lora(_) => "LORA",
        }
    }
}

/// Everything that decides which weights train: the adapter, whole parameters unfrozen by
/// pattern, and the seed for adapter initialisation and dropout.
#[derive(Clone, Debug, Default)]
pub struct TuningPlan {
    /// The adapter to inject, if any (none = only unfrozen parameters and heads train).
    pub adapter: Option<AdapterConfig>,
    /// Full-match regular expressions over parameter names (`classifier\..*`, `.*\.bias`).
    pub unfreeze: Vec<String>,
    /// Seed for adapter initialisation and dropout.
    pub seed: u64,
}

/// A tuning plan with its patterns compiled.
#[derive(Clone, Debug)]
pub struct CompiledPlan {
    /// The plan as given.
    pub plan: TuningPlan,
    lora_targets: Option<TargetMatcher>,
    unfreeze: Vec<Regex>,
}

impl CompiledPlan {
    /// Compiles the plan's patterns, with errors naming the key.
    pub fn new(plan: TuningPlan) -> Result<Self> {
        let lora_targets = match &plan.adapter {
            Some(AdapterConfig::Lora(cfg)) => {
                cfg.validate()?;
                Some(TargetMatcher::new(
                    &cfg.target_modules,
                    cfg.layers_to_transform.as_deref(),
                    &cfg.layers_pattern,
                )?)
            }
            None => None,
        };
        let unfreeze = plan
            .unfreeze
            .iter()
            .map(|p| full_match_regex(p, "tuning.unfreeze"))
            .collect::<Result<_>>()?;
        Ok(Self {
            plan,
            lora_targets,
            unfreeze,
        })
    }

    /// The LoRA settings for the linear at `path`, if the plan targets it.
    pub fn lora_for(&self, path: &str, is_output_head: bool) -> Option<&LoraConfig> {
        match (&self.plan.adapter, &self.lora_targets) {
            (Some(AdapterConfig::Lora(cfg)), Some(m)) if m.matches(path, is_output_head) => {
                Some(cfg)
            }
            _ => None,
        }
    }

    /// Whether the base parameter `name` is trained outright.
    pub fn is_unfrozen(&self, name: &str) -> bool {
        self.unfreeze.iter().any(|re| re.is_match(name))
    }
}
