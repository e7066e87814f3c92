//! Prompt tuning (Lester et al. 2021) and prefix tuning (Li & Liang 2021) as peft defines them:
//! trainable virtual tokens that the model reads at its input (prompt tuning: embeddings
//! prepended to the word embeddings) or in every attention layer (prefix tuning: keys and values
//! prepended to each layer's projected keys and values). Neither is mergeable.
//!
//! peft's files hold one tensor, `prompt_embeddings`: `(n, dim)` for prompt tuning and
//! `(n, layers·2·dim)` for prefix tuning, where the columns of layer `l` are its key prefix
//! `[2l·dim, (2l+1)·dim)` and its value prefix `[(2l+1)·dim, (2l+2)·dim)`, each in the
//! `heads × head_dim` layout of the projections. Prefix tuning's optional reparameterisation MLP
//! (`prefix_projection`) trains `(n, dim)` embeddings through `Linear → tanh → Linear` and is
//! dropped at save: the file holds its output, as peft saves it.

use candle_core::{DType, Device, Tensor, Var};
use rand::Rng;
use serde::{Deserialize, Serialize};

use super::use_param;
use crate::error::{PeftError, Result};
use crate::site::Site;

/// How prompt tuning's virtual tokens start.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum PromptInit {
    /// Standard normal, as `nn.Embedding`.
    #[default]
    #[serde(rename = "random", alias = "RANDOM")]
    Random,
    /// The word embeddings of `prompt_tuning_init_text`'s tokens, repeated to fill.
    #[serde(rename = "text", alias = "TEXT")]
    Text,
}

/// Prompt tuning settings, with peft's names.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PromptTuningConfig {
    /// Number of virtual tokens.
    pub num_virtual_tokens: usize,
    /// Random or text initialisation.
    #[serde(default)]
    pub prompt_tuning_init: PromptInit,
    /// The text whose token embeddings start the virtual tokens (with `text` init).
    #[serde(default)]
    pub prompt_tuning_init_text: Option<String>,
    /// The tokenizer that turns the text into ids (the base model's when absent).
    #[serde(default)]
    pub tokenizer_name_or_path: Option<String>,
    /// The text's token ids, special tokens included (filled in from the tokenizer by the
    /// caller; peft's `tokenizer(text)["input_ids"]`).
    #[serde(default)]
    pub init_token_ids: Option<Vec<u32>>,
}

/// Prefix tuning settings, with peft's names.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrefixTuningConfig {
    /// Number of virtual tokens per layer.
    pub num_virtual_tokens: usize,
    /// Train the prefixes through a `Linear → tanh → Linear` MLP (dropped at save).
    #[serde(default)]
    pub prefix_projection: bool,
    /// Hidden width of that MLP.
    #[serde(default = "default_encoder_hidden")]
    pub encoder_hidden_size: usize,
}

fn default_encoder_hidden() -> usize {
    512
}

fn check_tokens(n: usize) -> Result<()> {
    if n == 0 {
        return Err(PeftError::Config {
            key: "adapter.num_virtual_tokens".into(),
            message: "must be at least 1".into(),
        });
    }
    Ok(())
}

impl PromptTuningConfig {
    /// Checks ranges that serde cannot.
    pub fn validate(&self) -> Result<()> {
        check_tokens(self.num_virtual_tokens)?;
        if self.prompt_tuning_init == PromptInit::Text && self.prompt_tuning_init_text.is_none() {
            return Err(PeftError::Config {
                key: "adapter.prompt_tuning_init_text".into(),
                message: "text initialisation needs the text".into(),
            });
        }
        Ok(())
    }
}

impl PrefixTuningConfig {
    /// Checks ranges that serde cannot.
    pub fn validate(&self) -> Result<()> {
        check_tokens(self.num_virtual_tokens)?;
        if self.prefix_projection && self.encoder_hidden_size == 0 {
            return Err(PeftError::Config {
                key: "adapter.encoder_hidden_size".into(),
                message: "must be at least 1".into(),
            });
        }
        Ok(())
    }
}

fn normal(rng: &mut impl Rng, shape: (usize, usize), std: f64, device: &Device) -> Result<Var> {
    let v: Vec<f32> = (0..shape.0 * shape.1)
        .map(|_| (crate::weights::standard_normal(rng) * std) as f32)
        .collect();
    Ok(Var::from_tensor(&Tensor::from_vec(v, shape, device)?)?)
}

fn kaiming(rng: &mut impl Rng, shape: (usize, usize), device: &Device) -> Result<(Var, Var)> {
    // nn.Linear's default: weight and bias uniform in ±1/√fan_in.
    let bound = 1.0 / (shape.1 as f64).sqrt();
    let mut draw = |n: usize| -> Vec<f32> {
        (0..n)
            .map(|_| rng.gen_range(-bound..bound) as f32)
            .collect()
    };
    let w = Tensor::from_vec(draw(shape.0 * shape.1), shape, device)?;
    let b = Tensor::from_vec(draw(shape.0), shape.0, device)?;
    Ok((Var::from_tensor(&w)?, Var::from_tensor(&b)?))
}

/// Prefix tuning's reparameterisation: `Linear(dim → hidden) → tanh → Linear(hidden → width)`.
#[derive(Debug)]
pub struct PrefixMlp {
    w1: Var,
    b1: Var,
    w2: Var,
    b2: Var,
}

impl PrefixMlp {
    fn forward(&self, e: &Tensor, train: bool) -> Result<Tensor> {
        let h = e
            .matmul(&use_param(&self.w1, train).t()?)?
            .broadcast_add(&use_param(&self.b1, train))?
            .tanh()?;
        Ok(h.matmul(&use_param(&self.w2, train).t()?)?
            .broadcast_add(&use_param(&self.b2, train))?)
    }
}

/// The virtual tokens of one prompt- or prefix-tuning adapter.
#[derive(Debug)]
pub enum VirtualTokens {
    /// Prompt tuning: `(n, dim)` embeddings prepended to the input.
    Prompt(Var),
    /// Prefix tuning: `(n, layers·2·dim)` key/value prefixes, or `(n, dim)` embeddings through
    /// the MLP.
    Prefix {
        /// The trained embeddings.
        embedding: Var,
        /// The reparameterisation, while training with `prefix_projection`.
        mlp: Option<PrefixMlp>,
    },
}

impl VirtualTokens {
    /// Fresh prompt-tuning tokens: standard normal, or the embeddings of `init_token_ids` from
    /// `table` (`vocab × dim`), repeated and cut to `n` as peft does.
    pub fn prompt(cfg: &PromptTuningConfig, table: &Tensor, rng: &mut impl Rng) -> Result<Self> {
        let (vocab, dim) = table.dims2()?;
        let n = cfg.num_virtual_tokens;
        let var = match cfg.prompt_tuning_init {
            PromptInit::Random => normal(rng, (n, dim), 1.0, table.device())?,
            PromptInit::Text => {
                let ids = cfg
                    .init_token_ids
                    .as_ref()
                    .filter(|i| !i.is_empty())
                    .ok_or_else(|| PeftError::Config {
                        key: "adapter.prompt_tuning_init_text".into(),
                        message: "the text's token ids were not filled in (init_token_ids)".into(),
                    })?;
                if let Some(bad) = ids.iter().find(|i| **i as usize >= vocab) {
                    return Err(PeftError::Config {
                        key: "adapter.init_token_ids".into(),
                        message: format!("token id {bad} is outside the vocabulary ({vocab})"),
                    });
                }
                let ids: Vec<u32> = ids.iter().cycle().take(n).copied().collect();
                let ids = Tensor::from_vec(ids, n, table.device())?;
                Var::from_tensor(&table.index_select(&ids, 0)?.to_dtype(DType::F32)?)?
            }
        };
        Ok(Self::Prompt(var))
    }

    /// Fresh prefix-tuning tokens for a model of `layers` layers of width `dim`.
    pub fn prefix(
        cfg: &PrefixTuningConfig,
        layers: usize,
        dim: usize,
        rng: &mut impl Rng,
        device: &Device,
    ) -> Result<Self> {
        let n = cfg.num_virtual_tokens;
        let width = layers * 2 * dim;
        if !cfg.prefix_projection {
            return Ok(Self::Prefix {
                embedding: normal(rng, (n, width), 1.0, device)?,
                mlp: None,
            });
        }
        let embedding = normal(rng, (n, dim), 1.0, device)?;
        let (w1, b1) = kaiming(rng, (cfg.encoder_hidden_size, dim), device)?;
        let (w2, b2) = kaiming(rng, (width, cfg.encoder_hidden_size), device)?;
        Ok(Self::Prefix {
            embedding,
            mlp: Some(PrefixMlp { w1, b1, w2, b2 }),
        })
    }

    /// The trainable tensors by name (the MLP's as peft names them in memory).
    pub fn named_params(&self) -> Vec<(String, Var)> {
        match self {
            Self::Prompt(v) => vec![(PROMPT_KEY.into(), v.clone())],
            Self::Prefix {
                embedding,
                mlp: None,
            } => vec![(PROMPT_KEY.into(), embedding.clone())],
            Self::Prefix {
                embedding,
                mlp: Some(m),
            } => vec![
                ("prompt_encoder.embedding.weight".into(), embedding.clone()),
                ("prompt_encoder.transform.0.weight".into(), m.w1.clone()),
                ("prompt_encoder.transform.0.bias".into(), m.b1.clone()),
                ("prompt_encoder.transform.2.weight".into(), m.w2.clone()),
                ("prompt_encoder.transform.2.bias".into(), m.b2.clone()),
            ],
        }
    }

    /// What the file stores: `prompt_embeddings` (the MLP's output for prefix projection).
    pub fn tensors_to_save(&self) -> Result<Vec<(String, Tensor)>> {
        Ok(match self {
            Self::Prompt(v)
            | Self::Prefix {
                embedding: v,
                mlp: None,
            } => {
                vec![(PROMPT_KEY.into(), v.as_tensor().clone())]
            }
            Self::Prefix { .. } => vec![(PROMPT_KEY.into(), self.values(false)?)],
        })
    }

    /// The prompt embeddings `(n, dim)` or the prefixes `(n, layers·2·dim)`, in f32.
    pub fn values(&self, train: bool) -> Result<Tensor> {
        match self {
            Self::Prompt(v)
            | Self::Prefix {
                embedding: v,
                mlp: None,
            } => Ok(use_param(v, train)),
            Self::Prefix {
                embedding,
                mlp: Some(m),
            } => m.forward(&use_param(embedding, train), train),
        }
    }

    /// The number of virtual tokens.
    pub fn len(&self) -> usize {
        match self {
            Self::Prompt(v) | Self::Prefix { embedding: v, .. } => v.dim(0).unwrap_or(0),
        }
    }

    /// Whether there are none (never, for a valid config).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The one key of peft's prompt-learning files.
pub const PROMPT_KEY: &str = "prompt_embeddings";

/// Where a model reads virtual tokens: its input embeddings and its attention layers.
#[derive(Debug)]
pub struct PromptSite {
    /// The adapters added here.
    pub site: Site<VirtualTokens>,
    /// The word embedding table (`vocab × dim`), for text initialisation.
    pub table: Tensor,
    /// Number of attention layers.
    pub layers: usize,
}

/// What the active adapter asks of the model's forward pass.
#[derive(Debug)]
pub enum VirtualInput {
    /// Prepend these `(n, dim)` embeddings to the input.
    Prompt(Tensor),
    /// Prepend these `(n, dim)` keys and values in each layer (one pair per layer).
    Prefix(Vec<(Tensor, Tensor)>),
}

impl PromptSite {
    /// The active adapter's virtual tokens in `dtype`, if it is a prompt-learning one.
    pub fn active(&self, train: bool, dtype: DType) -> Result<Option<VirtualInput>> {
        let Some(tokens) = self.site.active() else {
            return Ok(None);
        };
        let values = tokens.values(train)?.to_dtype(dtype)?;
        Ok(Some(match &*tokens {
            VirtualTokens::Prompt(_) => VirtualInput::Prompt(values),
            VirtualTokens::Prefix { .. } => {
                let dim = self.table.dim(1)?;
                let pairs = (0..self.layers)
                    .map(|l| -> Result<(Tensor, Tensor)> {
                        Ok((
                            values.narrow(1, 2 * l * dim, dim)?,
                            values.narrow(1, (2 * l + 1) * dim, dim)?,
                        ))
                    })
                    .collect::<Result<_>>()?;
                VirtualInput::Prefix(pairs)
            }
        }))
    }
}

impl PromptTuningConfig {
    /// Reads peft's `PromptTuningConfig` fields. The initialisation is not needed to load trained
    /// tokens, so a loaded config says `random` (the text is kept for reference).
    pub fn from_peft(j: &crate::adapter_io::PeftJson) -> Result<Self> {
        Ok(Self {
            num_virtual_tokens: j.need("num_virtual_tokens")?,
            prompt_tuning_init: PromptInit::Random,
            prompt_tuning_init_text: j.get("prompt_tuning_init_text")?,
            tokenizer_name_or_path: j.get("tokenizer_name_or_path")?,
            init_token_ids: None,
        })
    }

    /// peft's `PromptTuningConfig` fields; peft fills the model sizes left null from the model.
    pub fn to_peft(&self) -> serde_json::Map<String, serde_json::Value> {
        super::json_object(serde_json::json!({
            "num_attention_heads": null,
            "num_layers": null,
            "num_transformer_submodules": 1,
            "num_virtual_tokens": self.num_virtual_tokens,
            "prompt_tuning_init": match self.prompt_tuning_init {
                PromptInit::Random => "RANDOM",
                PromptInit::Text => "TEXT",
            },
            "prompt_tuning_init_text": self.prompt_tuning_init_text,
            "token_dim": null,
            "tokenizer_kwargs": null,
            "tokenizer_name_or_path": self.tokenizer_name_or_path,
        }))
    }
}

impl PrefixTuningConfig {
    /// Reads peft's `PrefixTuningConfig` fields. The file holds the prefixes themselves (peft
    /// saves the MLP's output), so a loaded config has no projection.
    pub fn from_peft(j: &crate::adapter_io::PeftJson) -> Result<Self> {
        Ok(Self {
            num_virtual_tokens: j.need("num_virtual_tokens")?,
            prefix_projection: false,
            encoder_hidden_size: j
                .get("encoder_hidden_size")?
                .unwrap_or_else(default_encoder_hidden),
        })
    }

    /// peft's `PrefixTuningConfig` fields. What is saved is always the prefixes themselves, so
    /// the file says `prefix_projection = false` (peft then loads them as they are).
    pub fn to_peft(&self) -> serde_json::Map<String, serde_json::Value> {
        super::json_object(serde_json::json!({
            "encoder_hidden_size": self.encoder_hidden_size,
            "num_attention_heads": null,
            "num_layers": null,
            "num_transformer_submodules": 1,
            "num_virtual_tokens": self.num_virtual_tokens,
            "prefix_projection": false,
            "token_dim": null,
        }))
    }
}
