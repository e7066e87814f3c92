//! BERT, written against the path-aware builder with transformers' module paths
//! (`bert.encoder.layer.0.attention.self.query`, ...), so Hugging Face checkpoints load unchanged
//! and peft's adapter keys line up.

use std::sync::Arc;

use candle_core::{DType, Tensor};
use peft_core::ops::{attention, gelu, AttentionSpec, Dropout};
use peft_core::{Embedding, LayerNorm, ModelBuilder, Result, TunableLinear, TunedParts};
use serde::Deserialize;

/// The fields of transformers' `BertConfig` that the model uses.
#[derive(Clone, Debug, Deserialize)]
pub struct BertConfig {
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Hidden size.
    pub hidden_size: usize,
    /// Number of layers.
    pub num_hidden_layers: usize,
    /// Attention heads per layer.
    pub num_attention_heads: usize,
    /// FFN inner size.
    pub intermediate_size: usize,
    /// Activation (`gelu` only).
    #[serde(default = "default_act")]
    pub hidden_act: String,
    /// Dropout on hidden states.
    #[serde(default = "default_dropout")]
    pub hidden_dropout_prob: f32,
    /// Dropout on attention probabilities.
    #[serde(default = "default_dropout")]
    pub attention_probs_dropout_prob: f32,
    /// Position table size.
    pub max_position_embeddings: usize,
    /// Token type table size.
    #[serde(default = "default_type_vocab")]
    pub type_vocab_size: usize,
    /// LayerNorm epsilon.
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    /// Padding id.
    #[serde(default)]
    pub pad_token_id: u32,
    /// Dropout before the classifier (`hidden_dropout_prob` when absent).
    #[serde(default)]
    pub classifier_dropout: Option<f32>,
    /// Position embedding kind (`absolute` only).
    #[serde(default = "default_pos")]
    pub position_embedding_type: String,
}

fn default_act() -> String {
    "gelu".into()
}
fn default_dropout() -> f32 {
    0.1
}
fn default_type_vocab() -> usize {
    2
}
fn default_eps() -> f64 {
    1e-12
}
fn default_pos() -> String {
    "absolute".into()
}

impl BertConfig {
    /// Parses and checks a `config.json`.
    pub fn from_json(text: &str, path: &str) -> std::result::Result<Self, String> {
        let cfg: Self =
            serde_json::from_str(text).map_err(|e| format!("{path}: not a BERT config: {e}"))?;
        if !matches!(cfg.hidden_act.as_str(), "gelu" | "gelu_python") {
            return Err(format!(
                "{path}: hidden_act `{}` is not supported (only gelu)",
                cfg.hidden_act
            ));
        }
        if cfg.position_embedding_type != "absolute" {
            return Err(format!(
                "{path}: position_embedding_type `{}` is not supported",
                cfg.position_embedding_type
            ));
        }
        if cfg.num_attention_heads == 0 || !cfg.hidden_size.is_multiple_of(cfg.num_attention_heads)
        {
            return Err(format!(
                "{path}: hidden_size must be a multiple of num_attention_heads"
            ));
        }
        Ok(cfg)
    }
}

struct Embeddings {
    word: Embedding,
    position: Embedding,
    token_type: Embedding,
    norm: LayerNorm,
    dropout: Dropout,
}

impl Embeddings {
    fn new(cfg: &BertConfig, b: &ModelBuilder) -> Result<Self> {
        Ok(Self {
            word: b.embedding(cfg.vocab_size, cfg.hidden_size, "word_embeddings")?,
            position: b.embedding(
                cfg.max_position_embeddings,
                cfg.hidden_size,
                "position_embeddings",
            )?,
            token_type: b.embedding(
                cfg.type_vocab_size,
                cfg.hidden_size,
                "token_type_embeddings",
            )?,
            norm: b.layer_norm(cfg.hidden_size, cfg.layer_norm_eps, "LayerNorm")?,
            dropout: b.dropout(cfg.hidden_dropout_prob),
        })
    }

    fn forward(&self, ids: &Tensor, token_types: &Tensor, train: bool) -> Result<Tensor> {
        let (_, seq) = ids.dims2()?;
        let positions = Tensor::arange(0u32, seq as u32, ids.device())?.unsqueeze(0)?;
        let x = self
            .word
            .forward(ids)?
            .broadcast_add(&self.position.forward(&positions)?)?
            .add(&self.token_type.forward(token_types)?)?;
        Ok(self.dropout.forward(&self.norm.forward(&x)?, train)?)
    }
}

struct Layer {
    query: Arc<TunableLinear>,
    key: Arc<TunableLinear>,
    value: Arc<TunableLinear>,
    attn_out: Arc<TunableLinear>,
    attn_norm: LayerNorm,
    intermediate: Arc<TunableLinear>,
    output: Arc<TunableLinear>,
    out_norm: LayerNorm,
    attn_dropout: Dropout,
    hidden_dropout: Dropout,
    heads: usize,
}

impl Layer {
    fn new(cfg: &BertConfig, b: &ModelBuilder) -> Result<Self> {
        let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
        let attn = b.pp("attention");
        let sa = attn.pp("self");
        Ok(Self {
            query: sa.linear(h, h, true, "query")?,
            key: sa.linear(h, h, true, "key")?,
            value: sa.linear(h, h, true, "value")?,
            attn_out: attn.pp("output").linear(h, h, true, "dense")?,
            attn_norm: attn
                .pp("output")
                .layer_norm(h, cfg.layer_norm_eps, "LayerNorm")?,
            intermediate: b.pp("intermediate").linear(h, i, true, "dense")?,
            output: b.pp("output").linear(i, h, true, "dense")?,
            out_norm: b
                .pp("output")
                .layer_norm(h, cfg.layer_norm_eps, "LayerNorm")?,
            attn_dropout: b.dropout(cfg.attention_probs_dropout_prob),
            hidden_dropout: b.dropout(cfg.hidden_dropout_prob),
            heads: cfg.num_attention_heads,
        })
    }

    fn forward(&self, x: &Tensor, mask: Option<&Tensor>, train: bool) -> Result<Tensor> {
        let hidden = x.dim(2)?;
        let spec = AttentionSpec {
            heads: self.heads,
            scale: 1.0 / ((hidden / self.heads) as f64).sqrt(),
            mask,
            dropout: self.attn_dropout.next_seed(train),
        };
        let ctx = attention(
            &self.query.forward(x, train)?,
            &self.key.forward(x, train)?,
            &self.value.forward(x, train)?,
            &spec,
        )?;
        let attn = self
            .hidden_dropout
            .forward(&self.attn_out.forward(&ctx, train)?, train)?;
        let attn = self.attn_norm.forward(&(attn + x)?)?;
        let inner = gelu(&self.intermediate.forward(&attn, train)?)?;
        let out = self
            .hidden_dropout
            .forward(&self.output.forward(&inner, train)?, train)?;
        self.out_norm.forward(&(out + attn)?)
    }
}

/// The BERT encoder (`BertModel` without the pooler).
pub struct BertModel {
    embeddings: Embeddings,
    layers: Vec<Layer>,
}

impl BertModel {
    /// Builds the encoder at the builder's path (`bert` inside task models, the root otherwise).
    pub fn new(cfg: &BertConfig, b: &ModelBuilder) -> Result<Self> {
        let embeddings = Embeddings::new(cfg, &b.pp("embeddings"))?;
        let enc = b.pp("encoder").pp("layer");
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| Layer::new(cfg, &enc.pp(i)))
            .collect::<Result<_>>()?;
        Ok(Self { embeddings, layers })
    }

    /// Hidden states after the embeddings and after each layer (`num_hidden_layers + 1` tensors
    /// of shape `(batch, seq, hidden)`), as transformers' `output_hidden_states`.
    pub fn hidden_states(
        &self,
        ids: &Tensor,
        token_types: &Tensor,
        attention_mask: &Tensor,
        train: bool,
    ) -> Result<Vec<Tensor>> {
        let mask = additive_mask(attention_mask)?;
        let mut states = vec![self.embeddings.forward(ids, token_types, train)?];
        for layer in &self.layers {
            let next = layer.forward(states.last().expect("non-empty"), Some(&mask), train)?;
            states.push(next);
        }
        Ok(states)
    }

    /// The last hidden state.
    pub fn forward(
        &self,
        ids: &Tensor,
        token_types: &Tensor,
        attention_mask: &Tensor,
        train: bool,
    ) -> Result<Tensor> {
        let mut states = self.hidden_states(ids, token_types, attention_mask, train)?;
        Ok(states.pop().expect("the embeddings output is always there"))
    }
}

/// `(1 − mask) · f32::MIN`, as transformers builds the extended attention mask.
fn additive_mask(attention_mask: &Tensor) -> Result<Tensor> {
    let m = attention_mask.to_dtype(DType::F32)?;
    Ok(((m.ones_like()? - m)? * f32::MIN as f64)?)
}

/// `BertForTokenClassification`: the encoder at `bert`, dropout, and a new `classifier` head.
pub struct BertForTokenClassification {
    /// The encoder.
    pub bert: BertModel,
    dropout: Dropout,
    classifier: Arc<TunableLinear>,
    /// Parameters, registry and base fingerprint.
    pub parts: TunedParts,
    /// The configuration.
    pub config: BertConfig,
    device: candle_core::Device,
}

impl BertForTokenClassification {
    /// Builds the model; base weights may be named with or without the `bert.` prefix.
    pub fn new(cfg: &BertConfig, num_labels: usize, builder: ModelBuilder) -> Result<Self> {
        let b = builder.with_optional_prefix("bert");
        let bert = BertModel::new(cfg, &b.pp("bert"))?;
        let classifier = b.new_linear(cfg.hidden_size, num_labels, "classifier")?;
        let p = cfg.classifier_dropout.unwrap_or(cfg.hidden_dropout_prob);
        Ok(Self {
            bert,
            dropout: b.dropout(p),
            classifier,
            parts: b.parts()?,
            config: cfg.clone(),
            device: b.device().clone(),
        })
    }

    /// The device the model lives on.
    pub fn device(&self) -> &candle_core::Device {
        &self.device
    }

    /// Per-token logits `(batch, seq, num_labels)`.
    pub fn forward(
        &self,
        ids: &Tensor,
        token_types: &Tensor,
        attention_mask: &Tensor,
        train: bool,
    ) -> Result<Tensor> {
        let h = self.bert.forward(ids, token_types, attention_mask, train)?;
        self.classifier
            .forward(&self.dropout.forward(&h, train)?, train)
    }
}
