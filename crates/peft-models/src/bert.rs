//! BERT, written against the path-aware builder with transformers' module paths
//! (`bert.encoder.layer.0.attention.self.query`, ...), so Hugging Face checkpoints load unchanged
//! and peft's adapter keys line up.

use std::sync::Arc;

use candle_core::{DType, Tensor};
use peft_core::ops::{attention, gelu, AttentionSpec, Dropout};
use peft_core::{
    BottleneckHook, HookPoint, LayerNorm, ModelBuilder, PromptSite, Result, TunableEmbedding,
    TunableLinear, TunedParts, VirtualInput,
};
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
    word: Arc<TunableEmbedding>,
    position: Arc<TunableEmbedding>,
    token_type: Arc<TunableEmbedding>,
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

    /// The embeddings of `ids`, after `prompt`'s virtual tokens (`(n, dim)`, token type 0) when
    /// given, with positions counted from `first_position`.
    fn forward(
        &self,
        ids: &Tensor,
        token_types: &Tensor,
        prompt: Option<&Tensor>,
        first_position: usize,
        train: bool,
    ) -> Result<Tensor> {
        let (batch, _) = ids.dims2()?;
        let mut words = self.word.forward(ids, train)?;
        let mut token_types = token_types.clone();
        if let Some(p) = prompt {
            let (n, dim) = p.dims2()?;
            let p = p
                .to_dtype(words.dtype())?
                .unsqueeze(0)?
                .broadcast_as((batch, n, dim))?;
            words = Tensor::cat(&[&p, &words], 1)?;
            let zeros = Tensor::zeros((batch, n), token_types.dtype(), ids.device())?;
            token_types = Tensor::cat(&[&zeros, &token_types], 1)?;
        }
        let len = words.dim(1)?;
        let max = self.position.table().dim(0)?;
        if first_position + len > max {
            return Err(peft_core::PeftError::Config {
                key: "task.max_length".into(),
                message: format!(
                    "{len} tokens (virtual tokens included) from position {first_position} exceed \
                     the model's {max} positions (max_position_embeddings)"
                ),
            });
        }
        let first = first_position as u32;
        let positions = Tensor::arange(first, first + len as u32, ids.device())?.unsqueeze(0)?;
        let x = words
            .broadcast_add(&self.position.forward(&positions, train)?)?
            .add(&self.token_type.forward(&token_types, train)?)?;
        Ok(self
            .dropout
            .forward(&self.norm.forward(&x, train)?, train)?)
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
    attn_hook: Arc<BottleneckHook>,
    ffn_hook: Arc<BottleneckHook>,
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
            attn_hook: attn
                .pp("output")
                .bottleneck_hook(h, HookPoint::AttentionOutput)?,
            ffn_hook: b
                .pp("output")
                .bottleneck_hook(h, HookPoint::FeedForwardOutput)?,
            attn_dropout: b.dropout(cfg.attention_probs_dropout_prob),
            hidden_dropout: b.dropout(cfg.hidden_dropout_prob),
            heads: cfg.num_attention_heads,
        })
    }

    /// The layer's output; `prefix` holds prefix tuning's `(n, hidden)` keys and values, put
    /// before the projected ones.
    fn forward(
        &self,
        x: &Tensor,
        mask: Option<&Tensor>,
        prefix: Option<&(Tensor, Tensor)>,
        train: bool,
    ) -> Result<Tensor> {
        let (batch, _, hidden) = x.dims3()?;
        let mut key = self.key.forward(x, train)?;
        let mut value = self.value.forward(x, train)?;
        if let Some((pk, pv)) = prefix {
            let n = pk.dim(0)?;
            let expand = |p: &Tensor, like: &Tensor| -> Result<Tensor> {
                Ok(p.to_dtype(like.dtype())?
                    .unsqueeze(0)?
                    .broadcast_as((batch, n, hidden))?)
            };
            key = Tensor::cat(&[&expand(pk, &key)?, &key], 1)?;
            value = Tensor::cat(&[&expand(pv, &value)?, &value], 1)?;
        }
        let spec = AttentionSpec {
            heads: self.heads,
            scale: 1.0 / ((hidden / self.heads) as f64).sqrt(),
            mask,
            dropout: self.attn_dropout.next_seed(train),
        };
        let ctx = attention(&self.query.forward(x, train)?, &key, &value, &spec)?;
        let attn = self
            .hidden_dropout
            .forward(&self.attn_out.forward(&ctx, train)?, train)?;
        let attn = self.attn_hook.forward(&attn, x, train)?;
        let attn = self.attn_norm.forward(&(attn + x)?, train)?;
        let inner = gelu(&self.intermediate.forward(&attn, train)?)?;
        let out = self
            .hidden_dropout
            .forward(&self.output.forward(&inner, train)?, train)?;
        let out = self.ffn_hook.forward(&out, &attn, train)?;
        self.out_norm.forward(&(out + attn)?, train)
    }
}

/// The BERT encoder (`BertModel` without the pooler).
pub struct BertModel {
    embeddings: Embeddings,
    layers: Vec<Layer>,
    prompt: Arc<PromptSite>,
}

impl BertModel {
    /// Builds the encoder at the builder's path (`bert` inside task models, the root otherwise).
    pub fn new(cfg: &BertConfig, b: &ModelBuilder) -> Result<Self> {
        let embeddings = Embeddings::new(cfg, &b.pp("embeddings"))?;
        let prompt = b
            .pp("embeddings")
            .prompt_site(&embeddings.word.table(), cfg.num_hidden_layers)?;
        let enc = b.pp("encoder").pp("layer");
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| Layer::new(cfg, &enc.pp(i)))
            .collect::<Result<_>>()?;
        Ok(Self {
            embeddings,
            layers,
            prompt,
        })
    }

    /// Hidden states after the embeddings and after each layer (`num_hidden_layers + 1` tensors
    /// of shape `(batch, seq, hidden)`), as transformers' `output_hidden_states`.
    ///
    /// With a prompt-tuning adapter active, its `n` virtual tokens go before the input (token
    /// type 0, positions `0..n`, the input's from `n`) and are cut from the states returned. With
    /// prefix tuning, every layer's keys and values get its `n` prefixes and the input's
    /// positions start at `n`, as transformers counts positions after cached keys. Either way
    /// the virtual tokens are attended by every position, as peft extends the attention mask.
    pub fn hidden_states(
        &self,
        ids: &Tensor,
        token_types: &Tensor,
        attention_mask: &Tensor,
        train: bool,
    ) -> Result<Vec<Tensor>> {
        let dtype = self.embeddings.word.dtype();
        let virtual_input = self.prompt.active(train, dtype)?;
        let (batch, _) = ids.dims2()?;
        let with_virtual = |n: usize| -> Result<Tensor> {
            let ones = Tensor::ones((batch, n), attention_mask.dtype(), ids.device())?;
            Ok(Tensor::cat(&[&ones, attention_mask], 1)?)
        };
        let (embedded, mask, prefixes, cut) = match &virtual_input {
            None => (
                self.embeddings.forward(ids, token_types, None, 0, train)?,
                additive_mask(attention_mask)?,
                None,
                0,
            ),
            Some(VirtualInput::Prompt(p)) => {
                let n = p.dim(0)?;
                (
                    self.embeddings
                        .forward(ids, token_types, Some(p), 0, train)?,
                    additive_mask(&with_virtual(n)?)?,
                    None,
                    n,
                )
            }
            Some(VirtualInput::Prefix(pairs)) => {
                let n = pairs
                    .first()
                    .map(|(k, _)| k.dim(0))
                    .transpose()?
                    .unwrap_or(0);
                (
                    self.embeddings.forward(ids, token_types, None, n, train)?,
                    additive_mask(&with_virtual(n)?)?,
                    Some(pairs),
                    0,
                )
            }
        };
        let mut states = vec![embedded];
        for (i, layer) in self.layers.iter().enumerate() {
            let prefix = prefixes.and_then(|p| p.get(i));
            let next = layer.forward(
                states.last().expect("non-empty"),
                Some(&mask),
                prefix,
                train,
            )?;
            states.push(next);
        }
        if cut > 0 {
            let seq = ids.dim(1)?;
            states = states
                .into_iter()
                .map(|s| s.narrow(1, cut, seq))
                .collect::<candle_core::Result<_>>()?;
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
