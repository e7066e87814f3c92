//! What ViT and DINOv2 share, as transformers 5.24 writes them: the patch embedding (a Conv2d
//! with kernel = stride = patch, built with the builder's `conv2d` so LoRA on
//! `patch_embeddings.projection` is optional and follows peft's LoRA Conv2d), the self-attention
//! (`attention.{q,k,v,o}_proj`), the GELU MLP (`mlp.fc1`, `mlp.fc2`) and the position table
//! fitted to the input's patch grid; [`bicubic`] resizes as torch's `F.interpolate(mode=
//! "bicubic", align_corners=False)`, `io` reads configs (every refusal naming its key) and
//! checkpoints, `keys` renames checkpoint keys between transformers 4's layout and 5.24's (both
//! ways: loading, and writing merged checkpoints).

use std::sync::Arc;

use candle_core::{DType, Tensor};
use peft_core::ops::{attention, gelu, AttentionSpec, Dropout};
use peft_core::{ConvGeometry, ModelBuilder, Result, TunableConv2d, TunableLinear};

pub mod bicubic;
mod io;
mod keys;

pub use bicubic::{interpolate_bicubic, Resize};
pub(crate) use io::{
    check_common, checkpoint_head, config_error, load_checkpoint, read_text, set_head, ConfigReader,
};
pub(crate) use keys::{convert_sublayer, legacy_sublayer, split_legacy_layer, split_vit_layer};

/// `patch_embeddings`: the Conv2d projection (kernel = stride = patch) and the input checks.
pub(crate) struct PatchEmbeddings {
    projection: Arc<TunableConv2d>,
    channels: usize,
    patch: usize,
    dtype: DType,
}

impl PatchEmbeddings {
    /// The projection at `b.projection`.
    pub(crate) fn new(
        b: &ModelBuilder,
        channels: usize,
        hidden: usize,
        patch: usize,
    ) -> Result<Self> {
        let geometry = ConvGeometry::new(0, patch);
        Ok(Self {
            projection: b.conv2d(channels, hidden, patch, geometry, true, "projection")?,
            channels,
            patch,
            dtype: b.dtype(),
        })
    }

    /// `(batch, height, width)` of `pixels`, refused unless it is `(batch, num_channels, h, w)`
    /// with both sides multiples of the patch.
    pub(crate) fn check(&self, pixels: &Tensor) -> Result<(usize, usize, usize)> {
        let (c, p) = (self.channels, self.patch);
        let &[batch, channels, h, w] = pixels.dims() else {
            return Err(config_error(
                "pixel_values",
                format!(
                    "expected (batch, {c}, height, width), got {:?}",
                    pixels.dims()
                ),
            ));
        };
        if channels != c {
            return Err(config_error(
                "pixel_values",
                format!(
                    "expected {c} channels (num_channels), got {channels} in {:?}",
                    pixels.dims()
                ),
            ));
        }
        if h == 0 || w == 0 || !h.is_multiple_of(p) || !w.is_multiple_of(p) {
            return Err(config_error(
                "pixel_values",
                format!("height and width must be positive multiples of the patch size {p} (patch_size), got {h}×{w}"),
            ));
        }
        Ok((batch, h, w))
    }

    /// The patch tokens `(batch, (h/p)·(w/p), hidden)` of checked `pixels`, in the model's dtype.
    pub(crate) fn forward(&self, pixels: &Tensor, train: bool) -> Result<Tensor> {
        let y = self
            .projection
            .forward(&pixels.to_dtype(self.dtype)?, train)?;
        Ok(y.flatten_from(2)?.transpose(1, 2)?.contiguous()?)
    }
}

/// Self-attention at `attention`: `q_proj`, `k_proj`, `v_proj` (bias per `qkv_bias`) and
/// `o_proj`, scale `head_dim^-0.5`, no mask.
pub(crate) struct SelfAttention {
    q: Arc<TunableLinear>,
    k: Arc<TunableLinear>,
    v: Arc<TunableLinear>,
    o: Arc<TunableLinear>,
    heads: usize,
    dropout: Dropout,
}

impl SelfAttention {
    pub(crate) fn new(
        b: &ModelBuilder,
        hidden: usize,
        heads: usize,
        qkv_bias: bool,
        dropout: f32,
    ) -> Result<Self> {
        Ok(Self {
            q: b.linear(hidden, hidden, qkv_bias, "q_proj")?,
            k: b.linear(hidden, hidden, qkv_bias, "k_proj")?,
            v: b.linear(hidden, hidden, qkv_bias, "v_proj")?,
            o: b.linear(hidden, hidden, true, "o_proj")?,
            heads,
            dropout: b.dropout(dropout),
        })
    }

    pub(crate) fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let hidden = x.dim(2)?;
        let spec = AttentionSpec {
            heads: self.heads,
            scale: 1.0 / ((hidden / self.heads) as f64).sqrt(),
            mask: None,
            dropout: self.dropout.next_seed(train),
        };
        let ctx = attention(
            &self.q.forward(x, train)?,
            &self.k.forward(x, train)?,
            &self.v.forward(x, train)?,
            &spec,
        )?;
        self.o.forward(&ctx, train)
    }
}

/// `mlp`: `fc2(gelu(fc1(x)))`.
pub(crate) struct Mlp {
    fc1: Arc<TunableLinear>,
    fc2: Arc<TunableLinear>,
}

impl Mlp {
    pub(crate) fn new(b: &ModelBuilder, hidden: usize, inner: usize) -> Result<Self> {
        Ok(Self {
            fc1: b.linear(hidden, inner, true, "fc1")?,
            fc2: b.linear(inner, hidden, true, "fc2")?,
        })
    }

    pub(crate) fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        self.fc2
            .forward(&gelu(&self.fc1.forward(x, train)?)?, train)
    }
}

/// `[cls; patches] + positions`: `cls` is `(1, 1, hidden)`, `positions` `(1, 1 + n, hidden)`.
pub(crate) fn with_cls_and_positions(
    patches: &Tensor,
    cls: &Tensor,
    positions: &Tensor,
) -> Result<Tensor> {
    let (batch, _, hidden) = patches.dims3()?;
    let dt = patches.dtype();
    let cls = cls.to_dtype(dt)?.broadcast_as((batch, 1, hidden))?;
    let x = Tensor::cat(&[&cls, patches], 1)?;
    Ok(x.broadcast_add(&positions.to_dtype(dt)?)?)
}

/// transformers' `interpolate_pos_encoding` (ViT and DINOv2 alike in 5.24): the table
/// `(1, 1 + s², hidden)` unchanged when the image is square and has `s²` patches, otherwise its
/// patch part, as an `s × s` grid, resized bicubically to `grid` (`size=`, align_corners=False,
/// no antialias), in f32 and back to the table's dtype.
pub(crate) fn position_table(table: &Tensor, grid: (usize, usize), square: bool) -> Result<Tensor> {
    let (_, n, dim) = table.dims3()?;
    let positions = n - 1;
    let (h, w) = grid;
    if h * w == positions && square {
        return Ok(table.clone());
    }
    let side = (positions as f64).sqrt().round() as usize;
    let patches = table
        .narrow(1, 1, positions)?
        .reshape((1, side, side, dim))?
        .permute((0, 3, 1, 2))?;
    let resized = interpolate_bicubic(&patches.to_dtype(DType::F32)?, Resize::Size(h, w))?
        .permute((0, 2, 3, 1))?
        .reshape((1, h * w, dim))?
        .to_dtype(table.dtype())?;
    Ok(Tensor::cat(&[&table.narrow(1, 0, 1)?, &resized], 1)?)
}
