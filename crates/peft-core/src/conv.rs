//! The tunable 2-D convolution: a frozen (or trainable) kernel plus the LoRA adapters added at
//! its path, of which the model-wide switch picks the active one; mergeable into the kernel.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock, RwLockReadGuard};

use candle_core::Tensor;

use crate::error::{PeftError, Result};
use crate::methods::lora_conv::LoraConv2d;
use crate::switch::AdapterSwitch;

/// Padding, stride and groups of a convolution (symmetric, as candle's `conv2d`; no dilation).
/// Only ungrouped convolutions take adapters; a depthwise one (`groups` = channels) is a fast
/// frozen or fully trained layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvGeometry {
    /// Zero padding on each side.
    pub padding: usize,
    /// Step between windows.
    pub stride: usize,
    /// Channel groups (1: an ordinary convolution).
    pub groups: usize,
}

impl Default for ConvGeometry {
    fn default() -> Self {
        Self {
            padding: 0,
            stride: 1,
            groups: 1,
        }
    }
}

impl ConvGeometry {
    /// Ungrouped, with this padding and stride.
    pub fn new(padding: usize, stride: usize) -> Self {
        Self {
            padding,
            stride,
            groups: 1,
        }
    }

    /// A depthwise convolution (one group per channel) with this padding and stride.
    pub fn depthwise(padding: usize, stride: usize, channels: usize) -> Self {
        Self {
            padding,
            stride,
            groups: channels,
        }
    }
}

struct ConvState {
    weight: Tensor,
    bias: Option<Tensor>,
    adapters: BTreeMap<String, Arc<LoraConv2d>>,
    merged: Option<String>,
}

/// A 2-D convolution at a known module path, kernel `out × in × kh × kw`.
pub struct TunableConv2d {
    path: String,
    geometry: ConvGeometry,
    state: RwLock<ConvState>,
    switch: AdapterSwitch,
}

impl std::fmt::Debug for TunableConv2d {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TunableConv2d")
            .field("path", &self.path)
            .field("geometry", &self.geometry)
            .finish()
    }
}

impl TunableConv2d {
    pub(crate) fn new(
        path: String,
        weight: Tensor,
        bias: Option<Tensor>,
        geometry: ConvGeometry,
        switch: AdapterSwitch,
    ) -> Self {
        Self {
            path,
            geometry,
            state: RwLock::new(ConvState {
                weight,
                bias,
                adapters: BTreeMap::new(),
                merged: None,
            }),
            switch,
        }
    }

    fn state(&self) -> RwLockReadGuard<'_, ConvState> {
        self.state.read().unwrap_or_else(|e| e.into_inner())
    }

    /// The module path.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// Padding and stride.
    pub fn geometry(&self) -> ConvGeometry {
        self.geometry
    }

    /// The current kernel (with an adapter folded in while merged).
    pub fn weight(&self) -> Tensor {
        self.state().weight.clone()
    }

    /// The bias, if any.
    pub fn bias(&self) -> Option<Tensor> {
        self.state().bias.clone()
    }

    /// The adapter `name` here.
    pub fn adapter(&self, name: &str) -> Option<Arc<LoraConv2d>> {
        self.state().adapters.get(name).cloned()
    }

    /// The adapter currently folded into the kernel.
    pub fn merged_adapter(&self) -> Option<String> {
        self.state().merged.clone()
    }

    pub(crate) fn insert_adapter(&self, name: &str, a: Arc<LoraConv2d>) {
        let mut s = self.state.write().unwrap_or_else(|e| e.into_inner());
        s.adapters.insert(name.into(), a);
    }

    pub(crate) fn remove_adapter(&self, name: &str) {
        let mut s = self.state.write().unwrap_or_else(|e| e.into_inner());
        s.adapters.remove(name);
    }

    /// The kernel and bias (detached at evaluation, so no graph is built for trainable ones) and
    /// the active adapter unless one is merged.
    fn operands(&self, train: bool) -> (Tensor, Option<Tensor>, Option<Arc<LoraConv2d>>) {
        let state = self.state();
        let (w, bias) = if train {
            (state.weight.clone(), state.bias.clone())
        } else {
            (
                state.weight.detach(),
                state.bias.as_ref().map(Tensor::detach),
            )
        };
        let adapter = match (&state.merged, self.switch.active()) {
            (None, Some(name)) => state.adapters.get(&name).cloned(),
            _ => None,
        };
        (w, bias, adapter)
    }

    /// Applies the convolution to `x` of shape `(batch, in, h, w)`.
    pub fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let (w, bias, adapter) = self.operands(train);
        let g = self.geometry;
        let mut y = x.conv2d(&w.to_dtype(x.dtype())?, g.padding, g.stride, 1, g.groups)?;
        if let Some(b) = bias {
            y = y.broadcast_add(&b.to_dtype(x.dtype())?.reshape((1, (), 1, 1))?)?;
        }
        if let Some(a) = adapter {
            y = (y + a.delta(x, train)?)?;
        }
        Ok(y)
    }

    /// Applies the convolution to channels-last `x` of shape `(batch, h, w, in)`, giving
    /// `(batch, h', w', out)`. A 1×1 convolution runs as a linear layer over channels (the
    /// frozen-weight and fused LoRA ops, no weight gradient unless trainable), a depthwise one as
    /// [`crate::ops::depthwise_conv2d`]; others go through candle's `conv2d`.
    pub fn forward_channels_last(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let (w, bias, adapter) = self.operands(train);
        let g = self.geometry;
        let (out, inp, kh, kw) = w.dims4()?;
        let channels = x.dim(3)?;
        if channels != inp * g.groups {
            return Err(PeftError::Config {
                key: self.path.clone(),
                message: format!("expects {} input channels, got {channels}", inp * g.groups),
            });
        }
        let dt = x.dtype();
        if (kh, kw, g.stride, g.padding, g.groups) == (1, 1, 1, 0, 1) {
            let w2 = w.to_dtype(dt)?.reshape((out, inp))?;
            let b = bias.as_ref().map(|b| b.to_dtype(dt)).transpose()?;
            if let Some(a) = adapter {
                return a.pointwise(x, &w2, b.as_ref(), train);
            }
            if w2.is_variable() || w.is_variable() || b.as_ref().is_some_and(Tensor::is_variable) {
                let y = x.broadcast_matmul(&w2.t()?)?;
                return Ok(match b {
                    Some(b) => y.broadcast_add(&b)?,
                    None => y,
                });
            }
            return Ok(crate::ops::frozen_linear(x, &w2, b.as_ref())?);
        }
        if g.groups > 1 && g.groups == channels && out == channels && inp == 1 && adapter.is_none()
        {
            let y = crate::ops::depthwise_conv2d(x, &w, g.stride, g.padding)?;
            return Ok(match bias {
                Some(b) => y.broadcast_add(&b.to_dtype(dt)?)?,
                None => y,
            });
        }
        let nchw = x.permute((0, 3, 1, 2))?.contiguous()?;
        let y = self.forward(&nchw, train)?;
        Ok(y.permute((0, 2, 3, 1))?.contiguous()?)
    }

    pub(crate) fn merge(&self, name: &str) -> Result<()> {
        let mut s = self.state.write().unwrap_or_else(|e| e.into_inner());
        let Some(a) = s.adapters.get(name).cloned() else {
            return Ok(());
        };
        if s.weight.is_variable() || s.merged.is_some() {
            return Err(PeftError::Config {
                key: self.path.clone(),
                message: "cannot merge into a trained or already merged kernel".into(),
            });
        }
        let delta = a.delta_weight()?.to_dtype(s.weight.dtype())?;
        s.weight = (&s.weight + delta)?;
        s.merged = Some(name.into());
        Ok(())
    }

    pub(crate) fn unmerge(&self) -> Result<()> {
        let mut s = self.state.write().unwrap_or_else(|e| e.into_inner());
        let Some(name) = s.merged.clone() else {
            return Ok(());
        };
        if let Some(a) = s.adapters.get(&name).cloned() {
            let delta = a.delta_weight()?.to_dtype(s.weight.dtype())?;
            s.weight = (&s.weight - delta)?;
        }
        s.merged = None;
        Ok(())
    }
}
