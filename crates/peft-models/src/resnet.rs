//! ResNet-18/34/50/101 in torchvision's layout (`conv1`, `bn1`, `layerN.M.conv1`, `downsample.0`,
//! `fc`), so torchvision checkpoints load unchanged and peft's conv/linear keys line up.
//! Activations run channels-last (see [`crate::cnn`]).

use std::sync::Arc;

use candle_core::Tensor;
use peft_core::{
    BatchNormMode, ConvGeometry, ModelBuilder, PeftError, Result, TunableLinear, TunedParts,
};

use crate::cnn::{
    channels_last_input, global_average_pool, same, Activation, ConvBn, ConvSpec, ImageModelOptions,
};

/// Which residual block a ResNet stacks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Block {
    /// Two 3×3 convolutions (ResNet-18/34).
    Basic,
    /// 1×1, 3×3, 1×1 with 4× expansion (ResNet-50/101/152).
    Bottleneck,
}

impl Block {
    fn expansion(self) -> usize {
        match self {
            Self::Basic => 1,
            Self::Bottleneck => 4,
        }
    }
}

/// The depth of a torchvision ResNet: block kind and blocks per stage.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ResNetDepth {
    /// Block kind.
    pub block: Block,
    /// Blocks in each of the four stages.
    pub layers: [usize; 4],
}

impl ResNetDepth {
    /// The depth named `resnet18`, `resnet34`, `resnet50`, `resnet101` or `resnet152`.
    pub fn from_name(name: &str) -> Result<Self> {
        let (block, layers) = match name {
            "resnet18" => (Block::Basic, [2, 2, 2, 2]),
            "resnet34" => (Block::Basic, [3, 4, 6, 3]),
            "resnet50" => (Block::Bottleneck, [3, 4, 6, 3]),
            "resnet101" => (Block::Bottleneck, [3, 4, 23, 3]),
            "resnet152" => (Block::Bottleneck, [3, 8, 36, 3]),
            other => {
                return Err(PeftError::Config {
                    key: "model.architecture".into(),
                    message: format!(
                        "unknown ResNet `{other}` (expected resnet18, resnet34, resnet50, resnet101 or resnet152)"
                    ),
                })
            }
        };
        Ok(Self { block, layers })
    }
}

struct Residual {
    convs: Vec<ConvBn>,
    downsample: Option<ConvBn>,
}

impl Residual {
    fn new(
        b: &ModelBuilder,
        block: Block,
        inp: usize,
        planes: usize,
        stride: usize,
        mode: BatchNormMode,
    ) -> Result<Self> {
        let out = planes * block.expansion();
        let spec = |inp, out, kernel, stride| ConvSpec {
            inp,
            out,
            kernel,
            geometry: same(kernel, stride),
        };
        let specs = match block {
            Block::Basic => vec![spec(inp, planes, 3, stride), spec(planes, planes, 3, 1)],
            Block::Bottleneck => vec![
                spec(inp, planes, 1, 1),
                spec(planes, planes, 3, stride),
                spec(planes, out, 1, 1),
            ],
        };
        let last = specs.len();
        let convs = specs
            .into_iter()
            .enumerate()
            .map(|(i, s)| {
                let act = if i + 1 == last {
                    Activation::Identity
                } else {
                    Activation::Relu
                };
                ConvBn::new(
                    b,
                    s,
                    &format!("conv{}", i + 1),
                    &format!("bn{}", i + 1),
                    mode,
                    act,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        let downsample = if stride != 1 || inp != out {
            let s = ConvSpec {
                inp,
                out,
                kernel: 1,
                geometry: ConvGeometry::new(0, stride),
            };
            Some(ConvBn::new(
                b,
                s,
                "downsample.0",
                "downsample.1",
                mode,
                Activation::Identity,
            )?)
        } else {
            None
        };
        Ok(Self { convs, downsample })
    }

    fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let mut h = x.clone();
        for c in &self.convs {
            h = c.forward(&h, train)?;
        }
        let identity = match &self.downsample {
            Some(d) => d.forward(x, train)?,
            None => x.clone(),
        };
        Activation::Relu.forward(&(h + identity)?)
    }
}

/// A torchvision ResNet with a classification head `fc`.
pub struct ResNet {
    stem: ConvBn,
    stages: Vec<Vec<Residual>>,
    fc: Arc<TunableLinear>,
    /// Trainable parameters, registry and base fingerprint.
    pub parts: TunedParts,
    /// How it was built.
    pub options: ImageModelOptions,
}

impl ResNet {
    /// Builds the model; the base weights come from `builder` (e.g. torchvision's
    /// `resnet50-0676ba61.pth`).
    pub fn new(
        builder: ModelBuilder,
        depth: ResNetDepth,
        options: ImageModelOptions,
    ) -> Result<Self> {
        let b = &builder;
        let mode = options.batch_norm;
        let stem_spec = ConvSpec {
            inp: 3,
            out: 64,
            kernel: 7,
            geometry: same(7, 2),
        };
        let stem = ConvBn::new(b, stem_spec, "conv1", "bn1", mode, Activation::Relu)?;
        let mut inp = 64;
        let mut stages = Vec::new();
        for (i, (&n, planes)) in depth.layers.iter().zip([64, 128, 256, 512]).enumerate() {
            let layer = b.pp(format!("layer{}", i + 1));
            let mut blocks = Vec::new();
            for j in 0..n {
                let stride = if i > 0 && j == 0 { 2 } else { 1 };
                blocks.push(Residual::new(
                    &layer.pp(j),
                    depth.block,
                    inp,
                    planes,
                    stride,
                    mode,
                )?);
                inp = planes * depth.block.expansion();
            }
            stages.push(blocks);
        }
        let fc = if options.pretrained_head {
            b.linear(inp, options.num_labels, true, "fc")?
        } else {
            b.new_linear(inp, options.num_labels, "fc")?
        };
        Ok(Self {
            stem,
            stages,
            fc,
            parts: builder.parts()?,
            options,
        })
    }

    /// The output of `layer1`, channels-last (for parity checks).
    pub fn layer1(&self, pixels: &Tensor, train: bool) -> Result<Tensor> {
        let mut h = self.stem_pool(pixels, train)?;
        for block in &self.stages[0] {
            h = block.forward(&h, train)?;
        }
        Ok(h)
    }

    fn stem_pool(&self, pixels: &Tensor, train: bool) -> Result<Tensor> {
        let x = channels_last_input(pixels, 3, "ResNet")?;
        let h = self.stem.forward(&x, train)?;
        // 3×3 max-pool, stride 2, padding 1: after the ReLU every value is ≥ 0, so zero padding
        // gives the same maximum as PyTorch's −∞ padding.
        let nchw = h
            .permute((0, 3, 1, 2))?
            .pad_with_zeros(2, 1, 1)?
            .pad_with_zeros(3, 1, 1)?;
        let pooled = nchw.max_pool2d_with_stride(3, 2)?;
        Ok(pooled.permute((0, 2, 3, 1))?.contiguous()?)
    }

    /// The pooled features `(batch, 512·expansion)`.
    pub fn features(&self, pixels: &Tensor, train: bool) -> Result<Tensor> {
        let mut h = self.stem_pool(pixels, train)?;
        for block in self.stages.iter().flatten() {
            h = block.forward(&h, train)?;
        }
        global_average_pool(&h)
    }

    /// Class logits `(batch, num_labels)`.
    pub fn forward(&self, pixels: &Tensor, train: bool) -> Result<Tensor> {
        self.fc.forward(&self.features(pixels, train)?, train)
    }
}
