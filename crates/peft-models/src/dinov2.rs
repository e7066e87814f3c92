//! DINOv2 as transformers 5.24 writes it (`Dinov2Model`, `Dinov2ForImageClassification`),
//! against the path-aware builder:
//!
//! `embeddings.{cls_token, mask_token, position_embeddings, patch_embeddings.projection}`,
//! `encoder.layer.<i>.{norm1, attention.{q,k,v,o}_proj, layer_scale1.lambda1, norm2, mlp.fc1,
//! mlp.fc2, layer_scale2.lambda1}`, `layernorm` (under `dinov2.` in the classifier, with
//! `classifier`).
//!
//! As for ViT, transformers 5.24 converts the transformers 4 checkpoint names
//! (`attention.attention.{query,key,value}`, `attention.output.dense`) when loading and back when
//! saving; [`dinov2_weights`] does the same, [`legacy_dinov2_key`] the way back. The position
//! table is always fitted to the input's patch grid (bicubic, `size=`, no antialias, in f32, as
//! `Dinov2Embeddings` in 5.24). The SwiGLU MLP (`use_swiglu_ffn`) and `bool_masked_pos` are not
//! supported (the mask token is loaded, not used).

use std::path::PathBuf;
use std::sync::Arc;

use candle_core::{DType, Device, Shape, Tensor};
use peft_core::ops::{dropout_mask, Dropout};
use peft_core::{
    Init, LayerNorm, ModelBuilder, Result, TunableLinear, TunedParts, TuningPlan, WeightSource,
};

use crate::resolve::ModelFiles;
use crate::vit::num_labels;
use crate::vit_common::{
    check_common, checkpoint_head, config_error, convert_sublayer, legacy_sublayer,
    load_checkpoint, position_table, read_text, set_head, split_legacy_layer,
    with_cls_and_positions, ConfigReader, Mlp, PatchEmbeddings, SelfAttention,
};

/// The fields of transformers' `Dinov2Config` that the model uses (defaults as transformers').
#[derive(Clone, Debug)]
pub struct Dinov2Config {
    /// Hidden size.
    pub hidden_size: usize,
    /// Number of layers.
    pub num_hidden_layers: usize,
    /// Attention heads per layer.
    pub num_attention_heads: usize,
    /// MLP inner size over hidden size (the inner size is `int(hidden_size · mlp_ratio)`).
    pub mlp_ratio: f64,
    /// Activation (`gelu` only).
    pub hidden_act: String,
    /// Dropout on the embeddings.
    pub hidden_dropout_prob: f32,
    /// Dropout on attention probabilities.
    pub attention_probs_dropout_prob: f32,
    /// LayerNorm epsilon.
    pub layer_norm_eps: f64,
    /// Side of the pretraining images (square): the position table is `(side/patch)²` + 1.
    pub image_size: usize,
    /// Side of a patch (square).
    pub patch_size: usize,
    /// Input channels.
    pub num_channels: usize,
    /// Whether the query, key and value projections have biases.
    pub qkv_bias: bool,
    /// Stochastic depth: the probability of dropping a sample's residual branch in training.
    pub drop_path_rate: f32,
    /// Whether the checkpoint has `embeddings.mask_token`.
    pub use_mask_token: bool,
    /// Classes of the checkpoint's classifier (`id2label`, else `num_labels`), if any.
    pub num_labels: Option<usize>,
}

impl Dinov2Config {
    /// Parses and checks a `config.json`; a refused value is a [`peft_core::PeftError::Config`]
    /// naming its key.
    pub fn from_json(text: &str, path: &str) -> Result<Self> {
        let r = ConfigReader::new(text, path)?;
        r.expect_model_type("dinov2")?;
        if r.get("use_swiglu_ffn", Some(false))? {
            return Err(config_error(
                "use_swiglu_ffn",
                format!("{path}: the SwiGLU MLP (use_swiglu_ffn = true, the giant DINOv2) is not supported"),
            ));
        }
        let cfg = Self {
            hidden_size: r.get("hidden_size", Some(768))?,
            num_hidden_layers: r.get("num_hidden_layers", Some(12))?,
            num_attention_heads: r.get("num_attention_heads", Some(12))?,
            mlp_ratio: r.get("mlp_ratio", Some(4.0))?,
            hidden_act: r.get("hidden_act", Some("gelu".into()))?,
            hidden_dropout_prob: r.get("hidden_dropout_prob", Some(0.0))?,
            attention_probs_dropout_prob: r.get("attention_probs_dropout_prob", Some(0.0))?,
            layer_norm_eps: r.get("layer_norm_eps", Some(1e-6))?,
            image_size: r.side("image_size", 224)?,
            patch_size: r.side("patch_size", 14)?,
            num_channels: r.get("num_channels", Some(3))?,
            qkv_bias: r.get("qkv_bias", Some(true))?,
            drop_path_rate: r.get("drop_path_rate", Some(0.0))?,
            use_mask_token: r.get("use_mask_token", Some(true))?,
            num_labels: num_labels(&r)?,
        };
        check_common(
            &r,
            &cfg.hidden_act,
            cfg.hidden_size,
            cfg.num_attention_heads,
            cfg.image_size,
            cfg.patch_size,
            &[
                ("hidden_dropout_prob", cfg.hidden_dropout_prob),
                (
                    "attention_probs_dropout_prob",
                    cfg.attention_probs_dropout_prob,
                ),
                ("drop_path_rate", cfg.drop_path_rate),
            ],
        )?;
        if cfg.mlp_ratio.is_nan() || cfg.mlp_ratio <= 0.0 || cfg.mlp_size() == 0 {
            return Err(config_error(
                "mlp_ratio",
                format!("{path}: must be positive"),
            ));
        }
        Ok(cfg)
    }

    /// The configuration as transformers' `Dinov2Config` writes it in `config.json` (the
    /// fields above, `model_type`, and the defaults of the fields peft-rs does not model:
    /// layer scale on, no SwiGLU).
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "model_type": "dinov2",
            "architectures": ["Dinov2Model"],
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            // transformers 5.24 types it as an int (every DINOv2 has 4)
            "mlp_ratio": if self.mlp_ratio.fract() == 0.0 {
                serde_json::json!(self.mlp_ratio as u64)
            } else {
                serde_json::json!(self.mlp_ratio)
            },
            "hidden_act": self.hidden_act,
            "hidden_dropout_prob": self.hidden_dropout_prob,
            "attention_probs_dropout_prob": self.attention_probs_dropout_prob,
            "layer_norm_eps": self.layer_norm_eps,
            "image_size": self.image_size,
            "patch_size": self.patch_size,
            "num_channels": self.num_channels,
            "qkv_bias": self.qkv_bias,
            "drop_path_rate": self.drop_path_rate,
            "use_mask_token": self.use_mask_token,
            "layerscale_value": 1.0,
            "use_swiglu_ffn": false,
            "apply_layernorm": true,
        })
    }

    /// The MLP's inner size, `int(hidden_size · mlp_ratio)`.
    pub fn mlp_size(&self) -> usize {
        (self.hidden_size as f64 * self.mlp_ratio) as usize
    }
}

struct Embeddings {
    cls: Tensor,
    positions: Tensor,
    patches: PatchEmbeddings,
    dropout: Dropout,
    patch: usize,
}

impl Embeddings {
    fn new(cfg: &Dinov2Config, b: &ModelBuilder) -> Result<Self> {
        let (h, n) = (cfg.hidden_size, (cfg.image_size / cfg.patch_size).pow(2));
        let cls = b.param("cls_token", (1, 1, h), Init::Normal(0.02))?;
        if cfg.use_mask_token {
            // Part of the checkpoint (and of merged ones); masked image modelling is not done.
            b.param("mask_token", (1, h), Init::Zeros)?;
        }
        Ok(Self {
            cls,
            positions: b.param("position_embeddings", (1, n + 1, h), Init::Normal(0.02))?,
            patches: PatchEmbeddings::new(
                &b.pp("patch_embeddings"),
                cfg.num_channels,
                h,
                cfg.patch_size,
            )?,
            dropout: b.dropout(cfg.hidden_dropout_prob),
            patch: cfg.patch_size,
        })
    }

    fn forward(&self, pixels: &Tensor, train: bool) -> Result<Tensor> {
        let (_, h, w) = self.patches.check(pixels)?;
        let x = self.patches.forward(pixels, train)?;
        let use_param = |t: &Tensor| if train { t.clone() } else { t.detach() };
        let grid = (h / self.patch, w / self.patch);
        let positions = position_table(&use_param(&self.positions), grid, h == w)?;
        let x = with_cls_and_positions(&x, &use_param(&self.cls), &positions)?;
        Ok(self.dropout.forward(&x, train)?)
    }
}

struct Layer {
    norm1: LayerNorm,
    attention: SelfAttention,
    lambda1: Tensor,
    norm2: LayerNorm,
    mlp: Mlp,
    lambda2: Tensor,
    drop_path: Dropout,
}

impl Layer {
    fn new(cfg: &Dinov2Config, b: &ModelBuilder) -> Result<Self> {
        let (h, eps) = (cfg.hidden_size, cfg.layer_norm_eps);
        Ok(Self {
            norm1: b.layer_norm(h, eps, "norm1")?,
            attention: SelfAttention::new(
                &b.pp("attention"),
                h,
                cfg.num_attention_heads,
                cfg.qkv_bias,
                cfg.attention_probs_dropout_prob,
            )?,
            lambda1: b.pp("layer_scale1").param("lambda1", h, Init::Ones)?,
            norm2: b.layer_norm(h, eps, "norm2")?,
            mlp: Mlp::new(&b.pp("mlp"), h, cfg.mlp_size())?,
            lambda2: b.pp("layer_scale2").param("lambda1", h, Init::Ones)?,
            drop_path: b.dropout(cfg.drop_path_rate),
        })
    }

    /// `x · lambda`, then in training with `drop_path_rate > 0` the whole branch of a sample
    /// dropped with that probability and the kept ones scaled by `1/keep` (`Dinov2DropPath`).
    fn scale_and_drop(&self, x: &Tensor, lambda: &Tensor, train: bool) -> Result<Tensor> {
        let lambda = if train {
            lambda.clone()
        } else {
            lambda.detach()
        };
        let x = x.broadcast_mul(&lambda.to_dtype(x.dtype())?)?;
        match self.drop_path.next_seed(train) {
            None => Ok(x),
            Some((seed, keep)) => {
                let shape = Shape::from((x.dim(0)?, 1, 1));
                let mask = dropout_mask(seed, keep, &shape, x.dtype(), x.device())?;
                Ok(x.broadcast_mul(&mask)?)
            }
        }
    }

    fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let a = self
            .attention
            .forward(&self.norm1.forward(x, train)?, train)?;
        let x = (self.scale_and_drop(&a, &self.lambda1, train)? + x)?;
        let m = self.mlp.forward(&self.norm2.forward(&x, train)?, train)?;
        Ok((self.scale_and_drop(&m, &self.lambda2, train)? + x)?)
    }
}

/// The DINOv2 backbone (`Dinov2Model`).
pub struct Dinov2Model {
    embeddings: Embeddings,
    layers: Vec<Layer>,
    layernorm: LayerNorm,
}

impl Dinov2Model {
    /// Builds the backbone at the builder's path (`dinov2` inside the classifier, the root
    /// otherwise).
    pub fn new(cfg: &Dinov2Config, b: &ModelBuilder) -> Result<Self> {
        let layers = b.pp("encoder").pp("layer");
        Ok(Self {
            embeddings: Embeddings::new(cfg, &b.pp("embeddings"))?,
            layers: (0..cfg.num_hidden_layers)
                .map(|i| Layer::new(cfg, &layers.pp(i)))
                .collect::<Result<_>>()?,
            layernorm: b.layer_norm(cfg.hidden_size, cfg.layer_norm_eps, "layernorm")?,
        })
    }

    /// The embeddings and each layer's output (`num_hidden_layers + 1` tensors of shape
    /// `(batch, 1 + patches, hidden)`, before the final LayerNorm) for `pixels`
    /// `(batch, num_channels, h, w)` of any size that is a whole number of patches.
    pub fn hidden_states(&self, pixels: &Tensor, train: bool) -> Result<Vec<Tensor>> {
        let mut states = vec![self.embeddings.forward(pixels, train)?];
        for layer in &self.layers {
            let next = layer.forward(states.last().expect("non-empty"), train)?;
            states.push(next);
        }
        Ok(states)
    }

    /// `last_hidden_state`: the last layer's output after the final LayerNorm.
    pub fn forward(&self, pixels: &Tensor, train: bool) -> Result<Tensor> {
        let mut states = self.hidden_states(pixels, train)?;
        let last = states.pop().expect("the embeddings output is always there");
        self.layernorm.forward(&last, train)
    }

    /// `(last_hidden_state, pooler_output)`, the pooler output being the CLS token's state
    /// `(batch, hidden)`.
    pub fn forward_pooled(&self, pixels: &Tensor, train: bool) -> Result<(Tensor, Tensor)> {
        let h = self.forward(pixels, train)?;
        let pooled = h.narrow(1, 0, 1)?.squeeze(1)?;
        Ok((h, pooled))
    }
}

/// `Dinov2ForImageClassification`: the backbone at `dinov2` and a `classifier` on
/// `[CLS state; mean of the patch states]` (`2 · hidden` inputs).
pub struct Dinov2ForImageClassification {
    /// The backbone.
    pub dinov2: Dinov2Model,
    classifier: Arc<TunableLinear>,
    /// Parameters, registry and base fingerprint.
    pub parts: TunedParts,
    /// The configuration.
    pub config: Dinov2Config,
    device: Device,
}

impl Dinov2ForImageClassification {
    /// Builds the model with a new, trainable `classifier` of `num_labels` outputs (seeded from
    /// the plan; [`dinov2_image_classifier`] puts in the checkpoint's when the sizes match). Base
    /// weights may be named with or without the `dinov2.` prefix (a `Dinov2Model` checkpoint).
    pub fn new(cfg: &Dinov2Config, num_labels: usize, builder: ModelBuilder) -> Result<Self> {
        let b = builder.with_optional_prefix("dinov2");
        let dinov2 = Dinov2Model::new(cfg, &b.pp("dinov2"))?;
        let classifier = b.new_linear(2 * cfg.hidden_size, num_labels, "classifier")?;
        Ok(Self {
            dinov2,
            classifier,
            parts: b.parts()?,
            config: cfg.clone(),
            device: b.device().clone(),
        })
    }

    /// The device the model lives on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Sets the classifier's values (`num_labels × 2·hidden`, `num_labels`).
    pub fn set_classifier(&self, weight: &Tensor, bias: &Tensor) -> Result<()> {
        set_head(&self.parts, "classifier", weight, bias)
    }

    /// Logits `(batch, num_labels)` of `pixels` `(batch, num_channels, h, w)`.
    pub fn forward(&self, pixels: &Tensor, train: bool) -> Result<Tensor> {
        let h = self.dinov2.forward(pixels, train)?;
        let n = h.dim(1)?;
        let cls = h.narrow(1, 0, 1)?.squeeze(1)?;
        let patches = h.narrow(1, 1, n - 1)?.mean(1)?;
        let features = Tensor::cat(&[&cls, &patches], 1)?;
        self.classifier.forward(&features, train)
    }
}

/// transformers 5.24's conversion of a DINOv2 checkpoint key (transformers 4 names, as on the
/// Hub): `attention.attention.{query,key,value}` → `attention.{q,k,v}_proj`,
/// `attention.output.dense` → `attention.o_proj` under `encoder.layer.<i>.`; others unchanged.
pub fn convert_dinov2_key(key: &str) -> String {
    match split_legacy_layer(key) {
        Some((prefix, i, rest)) => {
            format!(
                "{prefix}encoder.layer.{i}.{}",
                convert_sublayer(rest, false)
            )
        }
        None => key.to_string(),
    }
}

/// The inverse of [`convert_dinov2_key`]: a module name (`dinov2.encoder.layer.<i>.attention.
/// q_proj.weight`) as transformers 4, Hub checkpoints and `save_pretrained` name it
/// (`...attention.attention.query.weight`); other keys unchanged.
pub fn legacy_dinov2_key(name: &str) -> String {
    match split_legacy_layer(name) {
        Some((prefix, i, rest)) => {
            format!("{prefix}encoder.layer.{i}.{}", legacy_sublayer(rest, false))
        }
        None => name.to_string(),
    }
}

/// The base weights of a DINOv2 checkpoint under the model's names ([`convert_dinov2_key`]).
pub fn dinov2_weights(files: &[PathBuf]) -> Result<WeightSource> {
    load_checkpoint(files, convert_dinov2_key)
}

/// Reads the model's `config.json` as a DINOv2 config.
pub fn read_dinov2_config(files: &ModelFiles) -> Result<Dinov2Config> {
    Dinov2Config::from_json(
        &read_text(&files.config)?,
        &files.config.display().to_string(),
    )
}

/// Builds `Dinov2ForImageClassification` with `num_labels` outputs from the model's checkpoint
/// (a `Dinov2Model` one such as `facebook/dinov2-small`, or a classifier), applying `plan`, on
/// `device`, frozen weights in `dtype`. The classifier is trainable; it starts from the
/// checkpoint's when that has `num_labels` classes, else it is new.
pub fn dinov2_image_classifier(
    files: &ModelFiles,
    plan: TuningPlan,
    num_labels: usize,
    device: &Device,
    dtype: DType,
) -> Result<Dinov2ForImageClassification> {
    let cfg = read_dinov2_config(files)?;
    let builder = ModelBuilder::new(dinov2_weights(&files.weights)?, plan, dtype, device.clone())?;
    let model = Dinov2ForImageClassification::new(&cfg, num_labels, builder)?;
    if let Some((w, b)) = checkpoint_head(&files.weights, num_labels, 2 * cfg.hidden_size)? {
        model.set_classifier(&w, &b)?;
    }
    Ok(model)
}
