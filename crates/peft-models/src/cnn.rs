//! Building blocks shared by the convolutional models: convolution + BatchNorm + activation over
//! channels-last activations, the classification head options, and input checks.
//!
//! Activations flow as `(batch, h, w, channels)`: 1×1 convolutions are then linear layers over
//! the contiguous channel dimension (the frozen-weight and fused LoRA ops), BatchNorm and the
//! depthwise kernels vectorise over channels. Module paths stay torchvision's.

use std::sync::Arc;

use candle_core::Tensor;
use peft_core::ops::{clamp_activation, ClampAct};
use peft_core::{
    BatchNorm2d, BatchNormMode, ConvGeometry, ModelBuilder, PeftError, Result, TunableConv2d,
};

/// The activation after a convolution block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    /// None (the linear bottleneck of MobileNetV2).
    Identity,
    /// `max(x, 0)`.
    Relu,
    /// `min(max(x, 0), 6)`.
    Relu6,
}

impl Activation {
    /// The same activation as the fused ops take it.
    pub fn as_clamp(self) -> ClampAct {
        match self {
            Self::Identity => ClampAct::Identity,
            Self::Relu => ClampAct::Clamp(f32::INFINITY),
            Self::Relu6 => ClampAct::Clamp(6.0),
        }
    }

    /// Applies the activation.
    pub fn forward(self, x: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Self::Identity => x.clone(),
            Self::Relu => clamp_activation(x, f32::INFINITY)?,
            Self::Relu6 => clamp_activation(x, 6.0)?,
        })
    }
}

/// What the classification models are built with besides their checkpoint.
#[derive(Clone, Copy, Debug)]
pub struct ImageModelOptions {
    /// Classes of the task: a new head of this size is created (trainable, seeded), unless
    /// `pretrained_head` is set.
    pub num_labels: usize,
    /// Keep the checkpoint's classifier (its class count must equal `num_labels`).
    pub pretrained_head: bool,
    /// What BatchNorm layers do while training.
    pub batch_norm: BatchNormMode,
    /// Dropout before the classifier (torchvision's MobileNetV2 uses 0.2).
    pub dropout: f32,
}

/// A convolution, its BatchNorm and an activation (torchvision's `Conv2dNormActivation`).
pub struct ConvBn {
    /// The convolution.
    pub conv: Arc<TunableConv2d>,
    /// The BatchNorm after it.
    pub bn: Arc<BatchNorm2d>,
    act: Activation,
}

/// Shape of a convolution block.
#[derive(Clone, Copy, Debug)]
pub struct ConvSpec {
    /// Input channels.
    pub inp: usize,
    /// Output channels.
    pub out: usize,
    /// Kernel size.
    pub kernel: usize,
    /// Padding, stride and groups.
    pub geometry: ConvGeometry,
}

impl ConvBn {
    /// The block at `conv_path` with its BatchNorm at `bn_path` (both relative to `b`).
    pub fn new(
        b: &ModelBuilder,
        spec: ConvSpec,
        conv_path: &str,
        bn_path: &str,
        mode: BatchNormMode,
        act: Activation,
    ) -> Result<Self> {
        let conv = b.conv2d(
            spec.inp,
            spec.out,
            spec.kernel,
            spec.geometry,
            false,
            conv_path,
        )?;
        let bn = b.batch_norm2d(spec.out, 1e-5, 0.1, mode, bn_path)?;
        Ok(Self { conv, bn, act })
    }

    /// Applies the block to channels-last `x`.
    pub fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let y = self.conv.forward_channels_last(x, train)?;
        self.bn.forward_act(&y, train, self.act.as_clamp())
    }
}

/// Checks `pixels` is `(batch, channels, h, w)` with the expected channel count and turns it
/// channels-last.
pub fn channels_last_input(pixels: &Tensor, channels: usize, model: &str) -> Result<Tensor> {
    let dims = pixels.dims();
    if dims.len() != 4 || dims[1] != channels {
        return Err(PeftError::Config {
            key: "pixel_values".into(),
            message: format!(
                "{model} expects images as (batch, {channels}, height, width), got {dims:?}"
            ),
        });
    }
    Ok(pixels.permute((0, 2, 3, 1))?.contiguous()?)
}

/// The mean over the spatial positions of channels-last `x`: `(batch, channels)`.
pub fn global_average_pool(x: &Tensor) -> Result<Tensor> {
    let (b, h, w, c) = x.dims4()?;
    Ok(x.reshape((b, h * w, c))?.mean(1)?)
}

/// `(padding, stride)` of a `k × k` convolution keeping the size at stride 1.
pub fn same(kernel: usize, stride: usize) -> ConvGeometry {
    ConvGeometry::new((kernel - 1) / 2, stride)
}
