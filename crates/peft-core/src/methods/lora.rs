//! LoRA as peft defines it: `y = base(x) + s · B·A·dropout(x)`, `s = alpha/r` (or `alpha/√r`
//! with rsLoRA), `A` (`r × in`) random and `B` (`out × r`) zero at initialisation. DoRA
//! (`use_dora`) adds a learned magnitude per output (see [`super::dora`]).

use candle_core::{DType, Tensor, Var};
use rand::Rng;
use serde::{Deserialize, Serialize};

use super::dora::Magnitude;
use super::{use_param, BaseLinear, LayerContext, LinearAdapter};
use crate::error::{PeftError, Result};
use crate::ops::{lora_linear, Dropout, LoraBranch};
use crate::target::TargetModules;

/// How LoRA's `A` matrix is initialised (`B` always starts at zero).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LoraInit {
    /// Kaiming-uniform with `a = √5`, as `nn.Linear` and peft's default.
    #[default]
    Kaiming,
    /// Normal with standard deviation `1/r`, as peft's `init_lora_weights="gaussian"`.
    Gaussian,
    /// The base weight's principal singular vectors, the base replaced by the residual
    /// (peft's `pissa_niter_4`); saved as a plain LoRA of twice the rank (see [`super::pissa`]).
    Pissa,
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
    /// Weight-decomposed LoRA: a trainable magnitude per output row (peft's `use_dora`).
    #[serde(default)]
    pub use_dora: bool,
    /// Initialisation of `A`.
    #[serde(default)]
    pub init: LoraInit,
}

impl LoraConfig {
    /// A plain LoRA config: rank `r`, `lora_alpha`, no dropout, on `targets`.
    pub fn new(r: usize, lora_alpha: f64, targets: &[&str]) -> Self {
        Self {
            r,
            lora_alpha,
            lora_dropout: 0.0,
            target_modules: TargetModules::Names(targets.iter().map(|s| s.to_string()).collect()),
            layers_to_transform: None,
            layers_pattern: vec![],
            use_rslora: false,
            use_dora: false,
            init: LoraInit::Kaiming,
        }
    }

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
            Err(PeftError::Config {
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
        if self.init == LoraInit::Pissa && self.use_dora {
            return bad("init", "PiSSA with DoRA is not supported".into());
        }
        Ok(())
    }
}

/// The LoRA pair `A` (`r × in`) and `B` (`out × r`) of one linear layer, with DoRA's magnitude
/// when enabled.
#[derive(Debug)]
pub struct LoraLayer {
    /// Down-projection, `r × in`.
    pub a: Var,
    /// Up-projection, `out × r`; zero at initialisation so the model starts at the base output.
    pub b: Var,
    /// The factor applied to `B·A·x`.
    pub scaling: f64,
    magnitude: Option<Magnitude>,
    dropout: Dropout,
    /// PiSSA's initial `(A₀, B₀)`, kept to convert the adapter for the original base at save.
    initial: Option<(Tensor, Tensor)>,
}

impl LoraLayer {
    /// A fresh adapter for the linear in `ctx`.
    pub fn new(cfg: &LoraConfig, ctx: &mut LayerContext<'_>) -> Result<Self> {
        let (out_features, in_features) = ctx.weight.dims2()?;
        let r = cfg.r;
        if cfg.init == LoraInit::Pissa {
            let (a, b, residual) = super::pissa::pissa_init(ctx.weight, r, cfg.scaling(), ctx.rng)?;
            ctx.new_base_weight = Some(residual);
            return Ok(Self {
                a: Var::from_tensor(&a)?,
                b: Var::from_tensor(&b)?,
                scaling: cfg.scaling(),
                magnitude: None,
                dropout: Dropout::new(cfg.lora_dropout, ctx.dropout_rng.clone()),
                initial: Some((a, b)),
            });
        }
        let a: Vec<f32> = match cfg.init {
            LoraInit::Pissa => unreachable!("handled above"),
            // kaiming_uniform_(a=√5): bound = gain·√(3/fan_in) with gain = √(2/(1+5)) = 1/√fan_in.
            LoraInit::Kaiming => {
                let bound = 1.0 / (in_features as f64).sqrt();
                (0..r * in_features)
                    .map(|_| ctx.rng.gen_range(-bound..bound) as f32)
                    .collect()
            }
            LoraInit::Gaussian => (0..r * in_features)
                .map(|_| (crate::weights::standard_normal(ctx.rng) / r as f64) as f32)
                .collect(),
        };
        let a = Tensor::from_vec(a, (r, in_features), ctx.device)?;
        let b = Tensor::zeros((out_features, r), DType::F32, ctx.device)?;
        let magnitude = if cfg.use_dora {
            Some(Magnitude::new(ctx.weight)?)
        } else {
            None
        };
        Ok(Self {
            a: Var::from_tensor(&a)?,
            b: Var::from_tensor(&b)?,
            scaling: cfg.scaling(),
            magnitude,
            dropout: Dropout::new(cfg.lora_dropout, ctx.dropout_rng.clone()),
            initial: None,
        })
    }

    /// DoRA's magnitude vector (`out`), when enabled.
    pub fn magnitude(&self) -> Option<&Var> {
        self.magnitude.as_ref().map(|m| &m.vector)
    }

    /// The weight update `s · B·A` (`out × in`, f32), as merged into the base.
    pub fn delta_weight(&self) -> Result<Tensor> {
        Ok((self.b.as_tensor().matmul(self.a.as_tensor())? * self.scaling)?)
    }

    /// `s · B·A·(x ⊙ mask)` for `x` of shape `(..., in)`, in `x`'s dtype.
    fn delta(&self, x: &Tensor, mask: Option<&Tensor>, train: bool) -> Result<Tensor> {
        let dtype = x.dtype();
        let x = match mask {
            Some(m) => x.mul(m)?,
            None => x.clone(),
        };
        let a = use_param(&self.a, train).to_dtype(dtype)?;
        let b = use_param(&self.b, train).to_dtype(dtype)?;
        let h = x.broadcast_matmul(&a.t()?)?;
        Ok((h.broadcast_matmul(&b.t()?)? * self.scaling)?)
    }

    /// `x·Wᵀ (+ b) + s·B·A·(x ⊙ mask)`: one fused op over a frozen base.
    pub(crate) fn base_plus_delta(
        &self,
        x: &Tensor,
        base: &BaseLinear<'_>,
        with_bias: bool,
        mask: Option<&Tensor>,
        train: bool,
    ) -> Result<Tensor> {
        let bias = base.bias.filter(|_| with_bias);
        if base.trainable {
            let y = if with_bias {
                base.forward(x)?
            } else {
                base.forward_no_bias(x)?
            };
            return Ok((y + self.delta(x, mask, train)?)?);
        }
        let (a, b) = (use_param(&self.a, train), use_param(&self.b, train));
        let branch = LoraBranch {
            a: &a,
            b: &b,
            scale: self.scaling,
            mask,
        };
        Ok(lora_linear(&x.contiguous()?, base.weight, bias, &branch)?)
    }

    /// The next dropout keep-mask for the adapter's input `x` (`None` at evaluation or `p = 0`).
    pub(crate) fn dropout_mask(&self, x: &Tensor, train: bool) -> Result<Option<Tensor>> {
        Ok(self.dropout.mask_for(x, train)?)
    }
}

impl LinearAdapter for LoraLayer {
    fn named_params(&self) -> Vec<(String, Var)> {
        let mut p = vec![
            ("lora_A.weight".to_string(), self.a.clone()),
            ("lora_B.weight".to_string(), self.b.clone()),
        ];
        if let Some(m) = &self.magnitude {
            p.push(("lora_magnitude_vector".to_string(), m.vector.clone()));
        }
        p
    }

    fn forward(&self, x: &Tensor, base: &BaseLinear<'_>, train: bool) -> Result<Tensor> {
        let mask = self.dropout_mask(x, train)?;
        match &self.magnitude {
            Some(m) => m.forward(self, x, base, mask.as_ref(), train),
            None => self.base_plus_delta(x, base, true, mask.as_ref(), train),
        }
    }

    fn merged(&self, weight: &Tensor, bias: Option<&Tensor>) -> Result<(Tensor, Option<Tensor>)> {
        let delta = self.delta_weight()?.to_dtype(weight.dtype())?;
        let w = match &self.magnitude {
            Some(m) => m.merged(weight, &delta)?,
            None => (weight + delta)?,
        };
        Ok((w, bias.cloned()))
    }

    fn unmerged(&self, weight: &Tensor, bias: Option<&Tensor>) -> Result<(Tensor, Option<Tensor>)> {
        let delta = self.delta_weight()?.to_dtype(weight.dtype())?;
        let w = match &self.magnitude {
            Some(m) => m.unmerged(weight, &delta)?,
            None => (weight - delta)?,
        };
        Ok((w, bias.cloned()))
    }

    fn tensors_to_save(&self) -> Result<Vec<(String, Tensor)>> {
        let Some((a0, b0)) = &self.initial else {
            return Ok(self
                .named_params()
                .into_iter()
                .map(|(n, v)| (n, v.as_tensor().clone()))
                .collect());
        };
        // W_res + s·B·A = W + s·(B·A − B₀·A₀): a rank-2r LoRA on the original base.
        Ok(vec![
            (
                "lora_A.weight".into(),
                Tensor::cat(&[self.a.as_tensor(), a0], 0)?,
            ),
            (
                "lora_B.weight".into(),
                Tensor::cat(&[self.b.as_tensor(), &b0.neg()?], 1)?,
            ),
        ])
    }

    fn restored_base(&self, weight: &Tensor) -> Result<Option<Tensor>> {
        let Some((a0, b0)) = &self.initial else {
            return Ok(None);
        };
        let delta = (b0.matmul(a0)? * self.scaling)?.to_dtype(weight.dtype())?;
        Ok(Some((weight + delta)?))
    }

    fn as_lora(&self) -> Option<&LoraLayer> {
        Some(self)
    }
}

impl LoraConfig {
    /// Reads peft's `LoraConfig` fields, refusing the options this version cannot reproduce.
    pub fn from_peft(j: &crate::adapter_io::PeftJson) -> Result<Self> {
        use serde_json::json;
        j.refuse_unless("fan_in_fan_out", &[], "transposed weights (GPT-2 Conv1D)")?;
        j.refuse_unless("bias", &[json!("none")], "training biases with the adapter")?;
        j.refuse_unless("rank_pattern", &[], "a per-module rank")?;
        j.refuse_unless("alpha_pattern", &[], "a per-module alpha")?;
        j.refuse_unless("layer_replication", &[], "layer replication")?;
        j.refuse_unless("lora_bias", &[], "a LoRA bias")?;
        j.refuse_unless("exclude_modules", &[], "excluding modules")?;
        j.refuse_unless("target_parameters", &[], "LoRA on parameters")?;
        j.refuse_unless("trainable_token_indices", &[], "trainable tokens")?;
        let init = match j.get::<serde_json::Value>("init_lora_weights")? {
            Some(serde_json::Value::String(s)) if s == "gaussian" => LoraInit::Gaussian,
            Some(serde_json::Value::String(s)) => {
                return Err(j.error(format!(
                    "`init_lora_weights` = \"{s}\": the weights are relative to a modified base \
                     model; save the adapter from peft with \
                     `path_initial_model_for_weight_conversion` so that it applies to the \
                     original base"
                )))
            }
            _ => LoraInit::Kaiming,
        };
        Ok(Self {
            r: j.need("r")?,
            lora_alpha: j.need("lora_alpha")?,
            lora_dropout: j.get("lora_dropout")?.unwrap_or(0.0),
            target_modules: j.targets("target_modules")?,
            layers_to_transform: j.one_or_many("layers_to_transform")?,
            layers_pattern: j.one_or_many("layers_pattern")?.unwrap_or_default(),
            use_rslora: j.get("use_rslora")?.unwrap_or(false),
            use_dora: j.get("use_dora")?.unwrap_or(false),
            init,
        })
    }

    /// peft's `LoraConfig` fields for `adapter_config.json`.
    pub fn to_peft(&self) -> serde_json::Map<String, serde_json::Value> {
        let v = serde_json::json!({
            "alpha_pattern": {},
            "bias": "none",
            "fan_in_fan_out": false,
            "init_lora_weights": match self.init {
                LoraInit::Kaiming => serde_json::json!(true),
                LoraInit::Gaussian => serde_json::json!("gaussian"),
                LoraInit::Pissa => serde_json::json!("pissa_niter_4"),
            },
            "layer_replication": null,
            "layers_pattern": if self.layers_pattern.is_empty() { serde_json::Value::Null } else { serde_json::json!(self.layers_pattern) },
            "layers_to_transform": self.layers_to_transform,
            "lora_alpha": self.lora_alpha,
            "lora_dropout": self.lora_dropout,
            "megatron_config": null,
            "megatron_core": "megatron.core",
            "r": self.r,
            "rank_pattern": {},
            "target_modules": self.target_modules,
            "use_dora": self.use_dora,
            "use_rslora": self.use_rslora,
        });
        super::json_object(v)
    }
}
