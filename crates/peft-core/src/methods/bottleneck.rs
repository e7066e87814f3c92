//! Bottleneck adapters (Houlsby et al. 2019, Pfeiffer et al. 2021, parallel adapters of He et
//! al. 2022): a small MLP `up(act(down(·)))` with `dim / reduction_factor` hidden units, added at
//! fixed hook points that the model offers. Not a Python peft method: the folder peft-rs writes
//! for it says `peft_type = "BOTTLENECK"`, which Python peft does not read.
//!
//! - `houlsby`: after the attention output projection and after the FFN output projection
//!   (before each residual + LayerNorm): `h ← h + up(act(down(h)))`.
//! - `pfeiffer`: the same after the FFN only.
//! - `parallel`: beside the FFN, from its input: `h_ffn ← h_ffn + s·up(act(down(x)))`.
//!
//! `up` starts at zero, so the model starts at the base output. Not mergeable (non-linear).

use candle_core::{DType, Tensor, Var};
use rand::Rng;
use serde::{Deserialize, Serialize};

use super::use_param;
use crate::error::{PeftError, Result};
use crate::site::Site;
use crate::target::{TargetMatcher, TargetModules};

/// Where a bottleneck adapter goes in each layer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Placement {
    /// After the attention block and after the FFN.
    Houlsby,
    /// After the FFN only.
    #[default]
    Pfeiffer,
    /// Beside the FFN, reading the FFN's input.
    Parallel,
}

/// The adapter MLP's non-linearity.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    /// `max(0, x)`.
    #[default]
    Relu,
    /// Exact (erf) GELU.
    Gelu,
    /// `x·σ(x)`.
    Swish,
    /// `tanh`.
    Tanh,
}

impl Activation {
    fn apply(self, x: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Self::Relu => x.relu()?,
            Self::Gelu => x.gelu_erf()?,
            Self::Swish => x.silu()?,
            Self::Tanh => x.tanh()?,
        })
    }
}

fn default_reduction() -> usize {
    16
}
fn default_true() -> bool {
    true
}
fn default_scaling() -> f64 {
    1.0
}

/// Bottleneck adapter settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BottleneckConfig {
    /// Which hook points get an adapter.
    #[serde(default)]
    pub placement: Placement,
    /// `dim / reduction_factor` hidden units.
    #[serde(default = "default_reduction")]
    pub reduction_factor: usize,
    /// The non-linearity between `down` and `up`.
    #[serde(default)]
    pub non_linearity: Activation,
    /// Sequential adapters add their input back (`h + f(h)`); without it they replace `h` by
    /// `f(h)` and the model no longer starts at the base output.
    #[serde(default = "default_true")]
    pub residual: bool,
    /// Multiplies the adapter's output (parallel adapters use 1 to 4).
    #[serde(default = "default_scaling")]
    pub scaling: f64,
    /// Restrict to these layer indices.
    #[serde(default)]
    pub layers_to_transform: Option<Vec<usize>>,
}

impl BottleneckConfig {
    /// Checks ranges that serde cannot.
    pub fn validate(&self) -> Result<()> {
        if self.reduction_factor == 0 {
            return Err(PeftError::Config {
                key: "adapter.reduction_factor".into(),
                message: "must be at least 1".into(),
            });
        }
        if !self.scaling.is_finite() {
            return Err(PeftError::Config {
                key: "adapter.scaling".into(),
                message: "expected a finite number".into(),
            });
        }
        Ok(())
    }

    /// Whether this config puts an adapter at `point` of the layer at `path`.
    pub fn wants(&self, point: HookPoint, path: &str) -> Result<bool> {
        let placed = match (self.placement, point) {
            (Placement::Houlsby, _) => true,
            (_, HookPoint::FeedForwardOutput) => true,
            (_, HookPoint::AttentionOutput) => false,
        };
        let layers = TargetMatcher::new(
            &TargetModules::Pattern(".*".into()),
            self.layers_to_transform.as_deref(),
            &[],
        )?;
        // The layer index is found before a dot: match on a child path of the hook.
        Ok(placed && layers.matches(&format!("{path}.adapter"), false))
    }
}

/// The hook points a transformer layer offers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HookPoint {
    /// After the attention output projection (and its dropout), before residual + LayerNorm.
    AttentionOutput,
    /// After the FFN output projection (and its dropout), before residual + LayerNorm.
    FeedForwardOutput,
}

/// One bottleneck MLP.
#[derive(Debug)]
pub struct BottleneckLayer {
    down_w: Var,
    down_b: Var,
    up_w: Var,
    up_b: Var,
    act: Activation,
    residual: bool,
    parallel: bool,
    scaling: f64,
}

impl BottleneckLayer {
    /// A fresh adapter for width `dim`: `down` ~ N(0, 0.01²), `up` and biases zero.
    pub fn new(
        cfg: &BottleneckConfig,
        dim: usize,
        rng: &mut impl Rng,
        device: &candle_core::Device,
    ) -> Result<Self> {
        let hidden = (dim / cfg.reduction_factor).max(1);
        let down: Vec<f32> = (0..hidden * dim)
            .map(|_| (crate::weights::standard_normal(rng) * 0.01) as f32)
            .collect();
        Ok(Self {
            down_w: Var::from_tensor(&Tensor::from_vec(down, (hidden, dim), device)?)?,
            down_b: Var::zeros(hidden, DType::F32, device)?,
            up_w: Var::zeros((dim, hidden), DType::F32, device)?,
            up_b: Var::zeros(dim, DType::F32, device)?,
            act: cfg.non_linearity,
            residual: cfg.residual,
            parallel: cfg.placement == Placement::Parallel,
            scaling: cfg.scaling,
        })
    }

    /// The trainable tensors with their keys under the hook's path.
    pub fn named_params(&self) -> Vec<(String, Var)> {
        vec![
            ("adapter_down.weight".into(), self.down_w.clone()),
            ("adapter_down.bias".into(), self.down_b.clone()),
            ("adapter_up.weight".into(), self.up_w.clone()),
            ("adapter_up.bias".into(), self.up_b.clone()),
        ]
    }

    /// The hook's output for the block output `h` and, for parallel adapters, the block input
    /// `x`; both `(..., dim)`.
    pub fn forward(&self, h: &Tensor, x: &Tensor, train: bool) -> Result<Tensor> {
        let dtype = h.dtype();
        let p = |v: &Var| use_param(v, train).to_dtype(dtype);
        let src = if self.parallel { x } else { h };
        let z = src
            .broadcast_matmul(&p(&self.down_w)?.t()?)?
            .broadcast_add(&p(&self.down_b)?)?;
        let z = self
            .act
            .apply(&z)?
            .broadcast_matmul(&p(&self.up_w)?.t()?)?
            .broadcast_add(&p(&self.up_b)?)?;
        let z = (z * self.scaling)?;
        Ok(if self.parallel || self.residual {
            (h + z)?
        } else {
            z
        })
    }
}

/// A hook point of one layer, where bottleneck adapters attach.
#[derive(Debug)]
pub struct BottleneckHook {
    /// The adapters added here.
    pub site: Site<BottleneckLayer>,
    /// Which point of the layer this is.
    pub point: HookPoint,
    /// The hidden width.
    pub dim: usize,
}

impl BottleneckHook {
    /// `h` through the active adapter at this hook (unchanged without one); `x` is the block's
    /// input, read by parallel adapters.
    pub fn forward(&self, h: &Tensor, x: &Tensor, train: bool) -> Result<Tensor> {
        match self.site.active() {
            Some(a) => a.forward(h, x, train),
            None => Ok(h.clone()),
        }
    }
}

impl BottleneckConfig {
    /// Reads the fields peft-rs writes for `BOTTLENECK`.
    pub fn from_peft(j: &crate::adapter_io::PeftJson) -> Result<Self> {
        let mut map = serde_json::Map::new();
        for key in [
            "placement",
            "reduction_factor",
            "non_linearity",
            "residual",
            "scaling",
            "layers_to_transform",
        ] {
            if let Some(v) = j.get::<serde_json::Value>(key)? {
                map.insert(key.into(), v);
            }
        }
        serde_json::from_value(serde_json::Value::Object(map))
            .map_err(|e| j.error(format!("bottleneck settings: {e}")))
    }

    /// This config's fields for `adapter_config.json`.
    pub fn to_peft(&self) -> serde_json::Map<String, serde_json::Value> {
        match serde_json::to_value(self) {
            Ok(serde_json::Value::Object(m)) => m,
            _ => serde_json::Map::new(),
        }
    }
}
