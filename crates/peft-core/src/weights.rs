//! Where frozen base weights come from: mmapped safetensors checkpoints, an in-memory map, or
//! seeded random values (for benchmarks and tests without a checkpoint).

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Shape, Tensor};
use rand::SeedableRng;

use crate::error::{PeftError, Result};

/// How a parameter is initialised when no checkpoint provides it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Init {
    /// Normal with mean 0 and this standard deviation.
    Normal(f64),
    /// All ones (LayerNorm gains).
    Ones,
    /// All zeros (biases).
    Zeros,
}

/// The source of base weights.
pub enum WeightSource {
    /// Safetensors files, memory-mapped.
    Safetensors {
        /// The mmapped tensors.
        tensors: MmapedSafetensors,
        /// The files, for error messages.
        files: Vec<PathBuf>,
    },
    /// Tensors held in memory (tests, converted checkpoints).
    Map(HashMap<String, Tensor>),
    /// Seeded random values drawn from each parameter's [`Init`].
    Random(u64),
    /// Values computed from each tensor's name and shape (synthetic weights shared with a
    /// reference implementation by formula, so that parity fixtures need not hold them).
    Generated(TensorFn),
}

/// A function from a tensor's name and shape to its values.
pub type TensorFn = std::sync::Arc<dyn Fn(&str, &Shape) -> Result<Tensor> + Send + Sync>;

impl WeightSource {
    /// Memory-maps safetensors files; a truncated or corrupt file is reported by name.
    pub fn from_safetensors(files: &[PathBuf]) -> Result<Self> {
        for f in files {
            if !f.is_file() {
                return Err(PeftError::io(f, "weights file not found"));
            }
        }
        // SAFETY: the files are mapped read-only; modifying them while mapped is undefined, as
        // for any mmapped checkpoint (the same contract as candle's VarBuilder).
        let tensors = unsafe { MmapedSafetensors::multi(files) }.map_err(|e| {
            PeftError::io(
                files.first().cloned().unwrap_or_default(),
                format!("not a valid safetensors file (truncated or corrupt?): {e}"),
            )
        })?;
        Ok(Self::Safetensors {
            tensors,
            files: files.to_vec(),
        })
    }

    /// Whether the source holds a tensor called `name` (a random source holds every name).
    pub fn contains(&self, name: &str) -> bool {
        match self {
            Self::Safetensors { tensors, .. } => tensors.get(name).is_ok(),
            Self::Map(m) => m.contains_key(name),
            Self::Random(_) | Self::Generated(_) => true,
        }
    }

    /// A description of the source for error messages.
    pub fn describe(&self) -> String {
        match self {
            Self::Safetensors { files, .. } => files
                .iter()
                .map(|f| f.display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
            Self::Map(_) => "in-memory weights".into(),
            Self::Random(seed) => format!("random weights (seed {seed})"),
            Self::Generated(_) => "generated weights".into(),
        }
    }

    /// Checkpoint tensor `key` as stored, on the CPU (no shape check, no conversion): merging
    /// copies the base tensors a model did not change. Random and generated weights have none.
    pub fn load_stored(&self, key: &str) -> Result<Tensor> {
        match self {
            Self::Safetensors { .. } | Self::Map(_) if !self.contains(key) => {
                Err(PeftError::MissingTensor {
                    files: self.describe(),
                    name: key.into(),
                    path: key.into(),
                })
            }
            Self::Safetensors { tensors, files } => tensors.load(key, &Device::Cpu).map_err(|e| {
                PeftError::candle(format!("loading `{key}` from {}", files[0].display()), e)
            }),
            Self::Map(m) => Ok(m[key].clone()),
            Self::Random(_) | Self::Generated(_) => Err(PeftError::Config {
                key: key.into(),
                message: format!("{} hold no stored tensors", self.describe()),
            }),
        }
    }

    /// Loads `name` with the expected shape, converted to `dtype` on `device`.
    pub fn load(
        &self,
        name: &str,
        shape: &Shape,
        init: Init,
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor> {
        let t = match self {
            Self::Safetensors { tensors, files } => tensors.load(name, device).map_err(|e| {
                PeftError::candle(format!("loading `{name}` from {}", files[0].display()), e)
            })?,
            Self::Map(m) => m
                .get(name)
                .ok_or_else(|| PeftError::MissingTensor {
                    files: self.describe(),
                    name: name.into(),
                    path: name.into(),
                })?
                .to_device(device)?,
            Self::Random(seed) => random_tensor(*seed, name, shape, init, device)?,
            Self::Generated(f) => f(name, shape)?.to_device(device)?,
        };
        if t.shape() != shape {
            return Err(PeftError::ShapeMismatch {
                name: name.into(),
                file: self.describe(),
                expected: shape.dims().to_vec(),
                found: t.dims().to_vec(),
            });
        }
        Ok(t.to_dtype(dtype)?)
    }
}

/// A tensor drawn from `init` with a seed derived from the base seed and the name, so that the
/// same model gets the same weights whatever the construction order.
pub fn random_tensor(
    seed: u64,
    name: &str,
    shape: &Shape,
    init: Init,
    device: &Device,
) -> Result<Tensor> {
    let n = shape.elem_count();
    let values: Vec<f32> = match init {
        Init::Ones => vec![1.0; n],
        Init::Zeros => vec![0.0; n],
        Init::Normal(std) => {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ fnv1a(name));
            (0..n)
                .map(|_| (std * standard_normal(&mut rng)) as f32)
                .collect()
        }
    };
    Ok(Tensor::from_vec(values, shape.clone(), device)?)
}

/// FNV-1a hash of a string: a stable per-name seed offset.
fn fnv1a(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    })
}

/// One draw from N(0, 1) by the Box-Muller transform.
pub fn standard_normal(rng: &mut impl rand::Rng) -> f64 {
    let u1: f64 = rng.gen::<f64>().max(f64::MIN_POSITIVE);
    let u2: f64 = rng.gen();
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
}
