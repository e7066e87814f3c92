//! IA³ as peft defines it: a learned vector `l` rescales a linear layer's output
//! (`y = (x·Wᵀ + b) ⊙ l`, keys and values) or, for the modules listed in `feedforward_modules`,
//! its input (`y = (x ⊙ l)·Wᵀ + b`). `l` starts at ones, so the model starts at the base output.
//! Merging scales the rows (and bias) or the columns of `W`.

use candle_core::{DType, Tensor, Var};
use serde::{Deserialize, Serialize};

use super::{use_param, BaseLinear, LayerContext, LinearAdapter};
use crate::error::{PeftError, Result};
use crate::target::{TargetMatcher, TargetModules};

/// IA³ settings, with peft's names.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Ia3Config {
    /// Modules to rescale.
    pub target_modules: TargetModules,
    /// The targets whose input (not output) is rescaled; must be among `target_modules`.
    #[serde(default = "no_modules")]
    pub feedforward_modules: TargetModules,
}

fn no_modules() -> TargetModules {
    TargetModules::Names(vec![])
}

impl Ia3Config {
    /// peft's defaults for BERT: keys, values and the FFN output linear (rescaled on its input).
    pub fn bert_default() -> Self {
        Self {
            target_modules: TargetModules::Names(vec![
                "key".into(),
                "value".into(),
                "output.dense".into(),
            ]),
            feedforward_modules: TargetModules::Names(vec!["output.dense".into()]),
        }
    }

    /// Checks that the patterns compile.
    pub fn validate(&self) -> Result<()> {
        TargetMatcher::new(&self.target_modules, None, &[])?;
        TargetMatcher::new(&self.feedforward_modules, None, &[]).map_err(|e| {
            PeftError::Config {
                key: "adapter.feedforward_modules".into(),
                message: e.to_string(),
            }
        })?;
        Ok(())
    }
}

/// The IA³ vector of one linear layer.
#[derive(Debug)]
pub struct Ia3Layer {
    /// `out × 1` (rescales the output) or `1 × in` (feed-forward: rescales the input).
    pub vector: Var,
    feedforward: bool,
}

impl Ia3Layer {
    /// Ones for the linear in `ctx`, on its input when it is a feed-forward module.
    pub fn new(cfg: &Ia3Config, ctx: &mut LayerContext<'_>) -> Result<Self> {
        let (out_features, in_features) = ctx.weight.dims2()?;
        let feedforward =
            TargetMatcher::new(&cfg.feedforward_modules, None, &[])?.matches(ctx.path, false);
        let shape = if feedforward {
            (1, in_features)
        } else {
            (out_features, 1)
        };
        Ok(Self {
            vector: Var::ones(shape, DType::F32, ctx.device)?,
            feedforward,
        })
    }

    /// Whether the layer's input (rather than its output) is rescaled.
    pub fn is_feedforward(&self) -> bool {
        self.feedforward
    }

    fn flat(&self, train: bool) -> Result<Tensor> {
        Ok(use_param(&self.vector, train).flatten_all()?)
    }
}

impl LinearAdapter for Ia3Layer {
    fn named_params(&self) -> Vec<(String, Var)> {
        vec![("ia3_l".to_string(), self.vector.clone())]
    }

    fn forward(&self, x: &Tensor, base: &BaseLinear<'_>, train: bool) -> Result<Tensor> {
        let l = self.flat(train)?.to_dtype(x.dtype())?;
        if self.feedforward {
            base.forward(&x.broadcast_mul(&l)?)
        } else {
            Ok(base.forward(x)?.broadcast_mul(&l)?)
        }
    }

    fn merged(&self, weight: &Tensor, bias: Option<&Tensor>) -> Result<(Tensor, Option<Tensor>)> {
        let l = self.vector.as_tensor().detach();
        self.fold(weight, bias, &l)
    }

    fn unmerged(&self, weight: &Tensor, bias: Option<&Tensor>) -> Result<(Tensor, Option<Tensor>)> {
        // peft divides by `l + 1e-8`.
        let l = (self.vector.as_tensor().detach() + 1e-8)?.recip()?;
        self.fold(weight, bias, &l)
    }
}

impl Ia3Layer {
    /// `W ⊙ l` by rows (and `b ⊙ l`) or by columns (feed-forward), with `l` given.
    fn fold(
        &self,
        weight: &Tensor,
        bias: Option<&Tensor>,
        l: &Tensor,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let dtype = weight.dtype();
        let w = weight
            .to_dtype(DType::F32)?
            .broadcast_mul(l)?
            .to_dtype(dtype)?;
        let bias = match bias {
            Some(b) if !self.feedforward => Some(
                b.to_dtype(DType::F32)?
                    .mul(&l.flatten_all()?)?
                    .to_dtype(b.dtype())?,
            ),
            other => other.cloned(),
        };
        Ok((w, bias))
    }
}

impl Ia3Config {
    /// Reads peft's `IA3Config` fields.
    pub fn from_peft(j: &crate::adapter_io::PeftJson) -> Result<Self> {
        j.refuse_unless("fan_in_fan_out", &[], "transposed weights (GPT-2 Conv1D)")?;
        j.refuse_unless("exclude_modules", &[], "excluding modules")?;
        Ok(Self {
            target_modules: j.targets("target_modules")?,
            feedforward_modules: j.get("feedforward_modules")?.unwrap_or_else(no_modules),
        })
    }

    /// peft's `IA3Config` fields for `adapter_config.json`.
    pub fn to_peft(&self) -> serde_json::Map<String, serde_json::Value> {
        let v = serde_json::json!({
            "fan_in_fan_out": false,
            "feedforward_modules": self.feedforward_modules,
            "init_ia3_weights": true,
            "target_modules": self.target_modules,
        });
        super::json_object(v)
    }
}
