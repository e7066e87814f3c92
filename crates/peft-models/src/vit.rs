//! ViT as transformers 5.24 writes it (`ViTModel`, `ViTForImageClassification`), against the
//! path-aware builder, so peft's adapter keys line up with ours:
//!
//! `vit.embeddings.{cls_token, position_embeddings, patch_embeddings.projection}`,
//! `vit.layers.<i>.{layernorm_before, attention.{q,k,v,o}_proj, layernorm_after, mlp.fc1,
//! mlp.fc2}`, `vit.layernorm`, `classifier`.
//!
//! transformers 5.24 renamed the modules of transformers 4 (`vit.encoder.layer.<i>.attention.
//! attention.query`, `intermediate.dense`, `output.dense`, ...) and converts those checkpoint keys
//! when loading (its `ViTModel` conversion mapping) and back when saving: Hub checkpoints and
//! `save_pretrained` output keep the old names, while the modules, and so peft's keys and
//! `target_modules`, carry the new ones (`q_proj`, `v_proj`). [`vit_weights`] does the same
//! conversion, and [`legacy_vit_key`] the way back (for merged checkpoints). The pooler of
//! `ViTModel` (unused by the classifier) is not built.

use std::path::PathBuf;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use peft_core::ops::Dropout;
use peft_core::{
    Init, LayerNorm, ModelBuilder, Result, TunableLinear, TunedParts, TuningPlan, WeightSource,
};

use crate::resolve::ModelFiles;
use crate::vit_common::{
    check_common, checkpoint_head, config_error, convert_sublayer, legacy_sublayer,
    load_checkpoint, position_table, read_text, set_head, split_legacy_layer, split_vit_layer,
    with_cls_and_positions, ConfigReader, Mlp, PatchEmbeddings, SelfAttention,
};

/// The fields of transformers' `ViTConfig` that the model uses (defaults as transformers').
#[derive(Clone, Debug)]
pub struct ViTConfig {
    /// Hidden size.
    pub hidden_size: usize,
    /// Number of layers.
    pub num_hidden_layers: usize,
    /// Attention heads per layer.
    pub num_attention_heads: usize,
    /// MLP inner size.
    pub intermediate_size: usize,
    /// Activation (`gelu` only).
    pub hidden_act: String,
    /// LayerNorm epsilon.
    pub layer_norm_eps: f64,
    /// Side of the training images (square).
    pub image_size: usize,
    /// Side of a patch (square).
    pub patch_size: usize,
    /// Input channels.
    pub num_channels: usize,
    /// Whether the query, key and value projections have biases.
    pub qkv_bias: bool,
    /// Dropout on the embeddings and after attention and MLP.
    pub hidden_dropout_prob: f32,
    /// Dropout on attention probabilities.
    pub attention_probs_dropout_prob: f32,
    /// Classes of the checkpoint's classifier (`id2label`, else `num_labels`), if any.
    pub num_labels: Option<usize>,
}

impl ViTConfig {
    /// Parses and checks a `config.json`; a refused value is a [`peft_core::PeftError::Config`]
    /// naming its key.
    pub fn from_json(text: &str, path: &str) -> Result<Self> {
        let r = ConfigReader::new(text, path)?;
        r.expect_model_type("vit")?;
        let cfg = Self {
            hidden_size: r.get("hidden_size", Some(768))?,
            num_hidden_layers: r.get("num_hidden_layers", Some(12))?,
            num_attention_heads: r.get("num_attention_heads", Some(12))?,
            intermediate_size: r.get("intermediate_size", Some(3072))?,
            hidden_act: r.get("hidden_act", Some("gelu".into()))?,
            layer_norm_eps: r.get("layer_norm_eps", Some(1e-12))?,
            image_size: r.side("image_size", 224)?,
            patch_size: r.side("patch_size", 16)?,
            num_channels: r.get("num_channels", Some(3))?,
            qkv_bias: r.get("qkv_bias", Some(true))?,
            hidden_dropout_prob: r.get("hidden_dropout_prob", Some(0.0))?,
            attention_probs_dropout_prob: r.get("attention_probs_dropout_prob", Some(0.0))?,
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
            ],
        )?;
        Ok(cfg)
    }
}

/// The classifier size a config records: `id2label`'s length, else `num_labels`.
pub(crate) fn num_labels(r: &ConfigReader) -> Result<Option<usize>> {
    let id2label: Option<serde_json::Map<String, serde_json::Value>> =
        r.get("id2label", Some(None))?;
    match id2label {
        Some(m) => Ok(Some(m.len())),
        None => r.get("num_labels", Some(None)),
    }
}

struct Embeddings {
    cls: Tensor,
    positions: Tensor,
    patches: PatchEmbeddings,
    dropout: Dropout,
    cfg: ViTConfig,
}

impl Embeddings {
    fn new(cfg: &ViTConfig, b: &ModelBuilder) -> Result<Self> {
        let (h, n) = (cfg.hidden_size, (cfg.image_size / cfg.patch_size).pow(2));
        Ok(Self {
            cls: b.param("cls_token", (1, 1, h), Init::Normal(0.02))?,
            positions: b.param("position_embeddings", (1, n + 1, h), Init::Normal(0.02))?,
            patches: PatchEmbeddings::new(
                &b.pp("patch_embeddings"),
                cfg.num_channels,
                h,
                cfg.patch_size,
            )?,
            dropout: b.dropout(cfg.hidden_dropout_prob),
            cfg: cfg.clone(),
        })
    }

    fn forward(&self, pixels: &Tensor, interpolate: bool, train: bool) -> Result<Tensor> {
        let (_, h, w) = self.patches.check(pixels)?;
        let (side, p) = (self.cfg.image_size, self.cfg.patch_size);
        if !interpolate && (h != side || w != side) {
            return Err(config_error(
                "pixel_values",
                format!(
                    "input image size ({h}*{w}) doesn't match the model ({side}*{side}): resize \
                     it, or interpolate the position embeddings (interpolate_pos_encoding)"
                ),
            ));
        }
        let x = self.patches.forward(pixels, train)?;
        let use_param = |t: &Tensor| if train { t.clone() } else { t.detach() };
        let table = use_param(&self.positions);
        let positions = if interpolate {
            position_table(&table, (h / p, w / p), h == w)?
        } else {
            table
        };
        let x = with_cls_and_positions(&x, &use_param(&self.cls), &positions)?;
        Ok(self.dropout.forward(&x, train)?)
    }
}

struct Layer {
    layernorm_before: LayerNorm,
    attention: SelfAttention,
    layernorm_after: LayerNorm,
    mlp: Mlp,
    dropout: Dropout,
}

impl Layer {
    fn new(cfg: &ViTConfig, b: &ModelBuilder) -> Result<Self> {
        let (h, eps) = (cfg.hidden_size, cfg.layer_norm_eps);
        Ok(Self {
            layernorm_before: b.layer_norm(h, eps, "layernorm_before")?,
            attention: SelfAttention::new(
                &b.pp("attention"),
                h,
                cfg.num_attention_heads,
                cfg.qkv_bias,
                cfg.attention_probs_dropout_prob,
            )?,
            layernorm_after: b.layer_norm(h, eps, "layernorm_after")?,
            mlp: Mlp::new(&b.pp("mlp"), h, cfg.intermediate_size)?,
            dropout: b.dropout(cfg.hidden_dropout_prob),
        })
    }

    /// Pre-norm attention and MLP, each with dropout and a residual (`ViTLayer`).
    fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let a = self
            .attention
            .forward(&self.layernorm_before.forward(x, train)?, train)?;
        let x = (self.dropout.forward(&a, train)? + x)?;
        let m = self
            .mlp
            .forward(&self.layernorm_after.forward(&x, train)?, train)?;
        Ok((self.dropout.forward(&m, train)? + x)?)
    }
}

/// The ViT encoder (`ViTModel` without the pooler).
pub struct ViTModel {
    embeddings: Embeddings,
    layers: Vec<Layer>,
    layernorm: LayerNorm,
}

impl ViTModel {
    /// Builds the encoder at the builder's path (`vit` inside the classifier, the root otherwise).
    pub fn new(cfg: &ViTConfig, b: &ModelBuilder) -> Result<Self> {
        let layers = b.pp("layers");
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
    /// `(batch, num_channels, h, w)`. Without `interpolate_pos_encoding` the image must be
    /// `image_size` square; with it, the position table is resized bicubically as transformers does.
    pub fn hidden_states(
        &self,
        pixels: &Tensor,
        interpolate_pos_encoding: bool,
        train: bool,
    ) -> Result<Vec<Tensor>> {
        let mut states = vec![self
            .embeddings
            .forward(pixels, interpolate_pos_encoding, train)?];
        for layer in &self.layers {
            let next = layer.forward(states.last().expect("non-empty"), train)?;
            states.push(next);
        }
        Ok(states)
    }

    /// `last_hidden_state`: the last layer's output after the final LayerNorm.
    pub fn forward(
        &self,
        pixels: &Tensor,
        interpolate_pos_encoding: bool,
        train: bool,
    ) -> Result<Tensor> {
        let mut states = self.hidden_states(pixels, interpolate_pos_encoding, train)?;
        let last = states.pop().expect("the embeddings output is always there");
        self.layernorm.forward(&last, train)
    }
}

/// `ViTForImageClassification`: the encoder at `vit` and a `classifier` on the CLS token.
pub struct ViTForImageClassification {
    /// The encoder.
    pub vit: ViTModel,
    classifier: Arc<TunableLinear>,
    /// Whether [`Self::forward`] resizes the position table to the input (transformers'
    /// `interpolate_pos_encoding`; off by default, as there).
    pub interpolate_pos_encoding: bool,
    /// Parameters, registry and base fingerprint.
    pub parts: TunedParts,
    /// The configuration.
    pub config: ViTConfig,
    device: Device,
}

impl ViTForImageClassification {
    /// Builds the model with a new, trainable `classifier` of `num_labels` outputs (seeded from
    /// the plan; [`vit_image_classifier`] puts in the checkpoint's when the sizes match). Base
    /// weights may be named with or without the `vit.` prefix.
    pub fn new(cfg: &ViTConfig, num_labels: usize, builder: ModelBuilder) -> Result<Self> {
        let b = builder.with_optional_prefix("vit");
        let vit = ViTModel::new(cfg, &b.pp("vit"))?;
        let classifier = b.new_linear(cfg.hidden_size, num_labels, "classifier")?;
        Ok(Self {
            vit,
            classifier,
            interpolate_pos_encoding: false,
            parts: b.parts()?,
            config: cfg.clone(),
            device: b.device().clone(),
        })
    }

    /// The device the model lives on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Sets the classifier's values (`num_labels × hidden`, `num_labels`).
    pub fn set_classifier(&self, weight: &Tensor, bias: &Tensor) -> Result<()> {
        set_head(&self.parts, "classifier", weight, bias)
    }

    /// Logits `(batch, num_labels)` of `pixels` `(batch, num_channels, h, w)`, with
    /// [`Self::interpolate_pos_encoding`].
    pub fn forward(&self, pixels: &Tensor, train: bool) -> Result<Tensor> {
        self.forward_with(pixels, self.interpolate_pos_encoding, train)
    }

    /// Logits with an explicit `interpolate_pos_encoding`.
    pub fn forward_with(
        &self,
        pixels: &Tensor,
        interpolate_pos_encoding: bool,
        train: bool,
    ) -> Result<Tensor> {
        let h = self.vit.forward(pixels, interpolate_pos_encoding, train)?;
        let cls = h.narrow(1, 0, 1)?.squeeze(1)?;
        self.classifier.forward(&cls, train)
    }
}

/// transformers 5.24's conversion of a ViT checkpoint key (the transformers 4 names that Hub
/// checkpoints and `save_pretrained` use) to the module name: `encoder.layer.<i>.` → `layers.<i>.`,
/// `attention.attention.{query,key,value}` → `attention.{q,k,v}_proj`, `attention.output.dense`
/// → `attention.o_proj`, `intermediate.dense` → `mlp.fc1`, `output.dense` → `mlp.fc2`; other
/// keys (and keys already in the new layout) unchanged.
pub fn convert_vit_key(key: &str) -> String {
    match split_legacy_layer(key) {
        Some((prefix, i, rest)) => format!("{prefix}layers.{i}.{}", convert_sublayer(rest, true)),
        None => key.to_string(),
    }
}

/// The inverse of [`convert_vit_key`]: a module name (`vit.layers.<i>.attention.q_proj.weight`)
/// as transformers 4, Hub checkpoints and `save_pretrained` name it
/// (`vit.encoder.layer.<i>.attention.attention.query.weight`); other keys unchanged.
pub fn legacy_vit_key(name: &str) -> String {
    match split_vit_layer(name) {
        Some((prefix, i, rest)) => {
            format!("{prefix}encoder.layer.{i}.{}", legacy_sublayer(rest, true))
        }
        None => name.to_string(),
    }
}

/// The base weights of a ViT checkpoint under the model's names ([`convert_vit_key`]).
pub fn vit_weights(files: &[PathBuf]) -> Result<WeightSource> {
    load_checkpoint(files, convert_vit_key)
}

/// Reads the model's `config.json` as a ViT config.
pub fn read_vit_config(files: &ModelFiles) -> Result<ViTConfig> {
    ViTConfig::from_json(
        &read_text(&files.config)?,
        &files.config.display().to_string(),
    )
}

/// Builds `ViTForImageClassification` with `num_labels` outputs from the model's checkpoint,
/// applying `plan`, on `device`, frozen weights in `dtype`. The classifier is trainable; it
/// starts from the checkpoint's when that has `num_labels` classes, else it is new.
pub fn vit_image_classifier(
    files: &ModelFiles,
    plan: TuningPlan,
    num_labels: usize,
    device: &Device,
    dtype: DType,
) -> Result<ViTForImageClassification> {
    let cfg = read_vit_config(files)?;
    let builder = ModelBuilder::new(vit_weights(&files.weights)?, plan, dtype, device.clone())?;
    let model = ViTForImageClassification::new(&cfg, num_labels, builder)?;
    if let Some((w, b)) = checkpoint_head(&files.weights, num_labels, cfg.hidden_size)? {
        model.set_classifier(&w, &b)?;
    }
    Ok(model)
}
