//! MobileNetV2 in torchvision's layout (`features.N.conv.M`, `classifier.1`), so torchvision's
//! ImageNet checkpoint loads unchanged and peft's keys for LoRA on its convolutions line up.
//!
//! Activations run channels-last (see [`crate::cnn`]); the expand and project convolutions are
//! 1×1 and take LoRA through the fused linear op, the depthwise ones run as one op each.

use std::sync::Arc;

use candle_core::Tensor;
use peft_core::ops::Dropout;
use peft_core::{BatchNormMode, ConvGeometry, ModelBuilder, Result, TunableLinear, TunedParts};

use crate::cnn::{
    channels_last_input, global_average_pool, same, Activation, ConvBn, ConvSpec, ImageModelOptions,
};

/// torchvision's inverted-residual settings: expansion t, channels c, repeats n, first stride s.
const SETTINGS: [(usize, usize, usize, usize); 7] = [
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
];
/// Channels after the last 1×1 convolution.
pub const LAST_CHANNELS: usize = 1280;
/// ImageNet normalisation of torchvision's weights (mean, std per RGB channel).
pub const IMAGENET_MEAN_STD: ([f32; 3], [f32; 3]) = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]);

/// One inverted-residual block: optional 1×1 expansion, 3×3 depthwise, 1×1 linear projection.
struct InvertedResidual {
    expand: Option<ConvBn>,
    depthwise: ConvBn,
    project: ConvBn,
    residual: bool,
}

impl InvertedResidual {
    fn new(
        b: &ModelBuilder,
        inp: usize,
        out: usize,
        stride: usize,
        t: usize,
        mode: BatchNormMode,
    ) -> Result<Self> {
        let hidden = inp * t;
        let c = b.pp("conv");
        let mut at = 0;
        let expand = if t != 1 {
            let spec = ConvSpec {
                inp,
                out: hidden,
                kernel: 1,
                geometry: ConvGeometry::default(),
            };
            at += 1;
            Some(ConvBn::new(
                &c,
                spec,
                "0.0",
                "0.1",
                mode,
                Activation::Relu6,
            )?)
        } else {
            None
        };
        let dw = ConvSpec {
            inp: hidden,
            out: hidden,
            kernel: 3,
            geometry: ConvGeometry::depthwise(1, stride, hidden),
        };
        let depthwise = ConvBn::new(
            &c,
            dw,
            &format!("{at}.0"),
            &format!("{at}.1"),
            mode,
            Activation::Relu6,
        )?;
        let pw = ConvSpec {
            inp: hidden,
            out,
            kernel: 1,
            geometry: ConvGeometry::default(),
        };
        let project = ConvBn::new(
            &c,
            pw,
            &format!("{}", at + 1),
            &format!("{}", at + 2),
            mode,
            Activation::Identity,
        )?;
        Ok(Self {
            expand,
            depthwise,
            project,
            residual: stride == 1 && inp == out,
        })
    }

    fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let h = match &self.expand {
            Some(e) => e.forward(x, train)?,
            None => x.clone(),
        };
        let y = self
            .project
            .forward(&self.depthwise.forward(&h, train)?, train)?;
        Ok(if self.residual { (x + y)? } else { y })
    }
}

/// torchvision's `mobilenet_v2()` (width 1.0) with a classification head.
pub struct MobileNetV2 {
    stem: ConvBn,
    blocks: Vec<InvertedResidual>,
    last: ConvBn,
    dropout: Dropout,
    classifier: Arc<TunableLinear>,
    /// Trainable parameters, registry and base fingerprint.
    pub parts: TunedParts,
    /// How it was built.
    pub options: ImageModelOptions,
}

impl MobileNetV2 {
    /// Builds the model; the base weights come from `builder` (e.g. torchvision's
    /// `mobilenet_v2-b0353104.pth`).
    pub fn new(builder: ModelBuilder, options: ImageModelOptions) -> Result<Self> {
        let f = builder.pp("features");
        let mode = options.batch_norm;
        let stem_spec = ConvSpec {
            inp: 3,
            out: 32,
            kernel: 3,
            geometry: same(3, 2),
        };
        let stem = ConvBn::new(&f, stem_spec, "0.0", "0.1", mode, Activation::Relu6)?;
        let mut blocks = Vec::new();
        let mut inp = 32;
        for (t, c, n, s) in SETTINGS {
            for i in 0..n {
                let stride = if i == 0 { s } else { 1 };
                blocks.push(InvertedResidual::new(
                    &f.pp(blocks.len() + 1),
                    inp,
                    c,
                    stride,
                    t,
                    mode,
                )?);
                inp = c;
            }
        }
        let last_spec = ConvSpec {
            inp,
            out: LAST_CHANNELS,
            kernel: 1,
            geometry: ConvGeometry::default(),
        };
        let last = ConvBn::new(
            &f,
            last_spec,
            &format!("{}.0", blocks.len() + 1),
            &format!("{}.1", blocks.len() + 1),
            mode,
            Activation::Relu6,
        )?;
        let c = builder.pp("classifier");
        let classifier = if options.pretrained_head {
            c.linear(LAST_CHANNELS, options.num_labels, true, "1")?
        } else {
            c.new_linear(LAST_CHANNELS, options.num_labels, "1")?
        };
        Ok(Self {
            stem,
            blocks,
            last,
            dropout: builder.dropout(options.dropout),
            classifier,
            parts: builder.parts()?,
            options,
        })
    }

    /// The pooled features `(batch, 1280)` of images `(batch, 3, h, w)`, normalised as
    /// [`IMAGENET_MEAN_STD`].
    pub fn features(&self, pixels: &Tensor, train: bool) -> Result<Tensor> {
        let x = channels_last_input(pixels, 3, "MobileNetV2")?;
        let mut h = self.stem.forward(&x, train)?;
        for block in &self.blocks {
            h = block.forward(&h, train)?;
        }
        global_average_pool(&self.last.forward(&h, train)?)
    }

    /// Class logits `(batch, num_labels)`.
    pub fn forward(&self, pixels: &Tensor, train: bool) -> Result<Tensor> {
        let h = self.features(pixels, train)?;
        self.classifier
            .forward(&self.dropout.forward(&h, train)?, train)
    }
}
