//! The path-aware model builder: it knows the dotted module path (the Hugging Face name) of the
//! layer being built, loads frozen weights by that name and gives each layer what the tuning plan
//! says: frozen, fully trainable, or frozen with an adapter.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Shape, Tensor, Var};
use rand::SeedableRng;
use sha2::{Digest, Sha256};

use crate::batch_norm::{BatchNorm2d, BatchNormMode};
use crate::conv::{ConvGeometry, TunableConv2d};
use crate::embedding::TunableEmbedding;
use crate::error::{PeftError, Result};
use crate::layers::LayerNorm;
use crate::linear::TunableLinear;
use crate::methods::{BottleneckHook, HookPoint, PromptSite};
use crate::ops::{Dropout, DropoutRng};
use crate::params::ParamStore;
use crate::plan::{CompiledPlan, TuningPlan};
use crate::registry::Registry;
use crate::site::Site;
use crate::weights::{random_tensor, Init, WeightSource};

struct Shared {
    weights: WeightSource,
    plan: CompiledPlan,
    params: ParamStore,
    registry: Registry,
    dtype: DType,
    device: Device,
    /// Checkpoint names may lack the task model's prefix (`bert.`): a `BertModel` checkpoint
    /// loads into `BertForTokenClassification` as in transformers.
    strip_prefix: Option<String>,
    dropout_rng: DropoutRng,
    init_rng: Mutex<rand::rngs::StdRng>,
    /// Digest and checkpoint key of every base tensor loaded, by model name.
    fingerprint: Mutex<BTreeMap<String, ([u8; 32], String)>>,
    /// Whether the plan's adapter has been injected (by the first [`ModelBuilder::parts`]).
    injected: Mutex<bool>,
}

/// Builds a model layer by layer; cheap to clone, each clone at its own path.
#[derive(Clone)]
pub struct ModelBuilder {
    shared: Arc<Shared>,
    path: Vec<String>,
}

/// What construction leaves behind for training, saving and merging.
#[derive(Clone, Debug)]
pub struct TunedParts {
    /// The trainable parameters: the plan's adapter (named `default`), unfrozen base parameters
    /// and task heads.
    pub params: ParamStore,
    /// Every tunable layer by path, and the model's named adapters.
    pub registry: Registry,
    /// A digest of the frozen base weights the model was built on.
    pub base_fingerprint: String,
    /// The plan the model was built with.
    pub plan: TuningPlan,
    /// The seeded stream shared by every dropout layer.
    pub dropout_rng: DropoutRng,
    /// Every base tensor the model loaded: its model name and its key in the checkpoint, sorted.
    pub base_tensors: Vec<(String, String)>,
}

impl ModelBuilder {
    /// A builder over `weights`, applying `plan`.
    pub fn new(
        weights: WeightSource,
        plan: TuningPlan,
        dtype: DType,
        device: Device,
    ) -> Result<Self> {
        let seed = plan.seed;
        let plan = CompiledPlan::new(plan)?;
        let dropout_rng = DropoutRng::new(seed.wrapping_add(1));
        let params = ParamStore::default();
        Ok(Self {
            shared: Arc::new(Shared {
                weights,
                plan,
                params: params.clone(),
                registry: Registry::new(seed, dropout_rng.clone(), device.clone(), params),
                dtype,
                device,
                strip_prefix: None,
                dropout_rng,
                init_rng: Mutex::new(rand::rngs::StdRng::seed_from_u64(seed)),
                fingerprint: Mutex::new(BTreeMap::new()),
                injected: Mutex::new(false),
            }),
            path: vec![],
        })
    }

    /// Lets checkpoint names omit `prefix.` (set before building any layer).
    pub fn with_optional_prefix(mut self, prefix: &str) -> Self {
        if let Some(shared) = Arc::get_mut(&mut self.shared) {
            shared.strip_prefix = Some(format!("{prefix}."));
        }
        self
    }

    /// A builder one level down, at `self.path + "." + name`.
    pub fn pp(&self, name: impl ToString) -> Self {
        let mut path = self.path.clone();
        path.push(name.to_string());
        Self {
            shared: self.shared.clone(),
            path,
        }
    }

    /// The dotted module path of this builder.
    pub fn path(&self) -> String {
        self.path.join(".")
    }

    fn full_name(&self, name: &str) -> String {
        if self.path.is_empty() {
            name.to_string()
        } else {
            format!("{}.{name}", self.path())
        }
    }

    /// The device layers are built on.
    pub fn device(&self) -> &Device {
        &self.shared.device
    }

    /// The dtype of frozen weights.
    pub fn dtype(&self) -> DType {
        self.shared.dtype
    }

    /// The checkpoint key holding the model's tensor `name` (`name` itself, or without the
    /// optional prefix).
    pub fn checkpoint_key(&self, name: &str) -> String {
        let s = &self.shared;
        if !s.weights.contains(name) {
            if let Some(stripped) = s.strip_prefix.as_deref().and_then(|p| name.strip_prefix(p)) {
                if s.weights.contains(stripped) {
                    return stripped.to_string();
                }
            }
        }
        name.to_string()
    }

    fn load_base(&self, name: &str, shape: &Shape, init: Init) -> Result<Tensor> {
        let s = &self.shared;
        let key = self.checkpoint_key(name);
        if !s.weights.contains(&key) {
            return Err(PeftError::MissingTensor {
                files: s.weights.describe(),
                name: key,
                path: name.into(),
            });
        }
        let t = s.weights.load(&key, shape, init, s.dtype, &s.device)?;
        let digest = tensor_digest(name, &t)?;
        s.fingerprint
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(name.into(), (digest, key));
        Ok(t)
    }

    /// A base parameter `name` under this path: a frozen tensor, or a trainable `Var` (registered
    /// in the parameter store) when the plan unfreezes it.
    pub fn param(&self, name: &str, shape: impl Into<Shape>, init: Init) -> Result<Tensor> {
        let full = self.full_name(name);
        let t = self.load_base(&full, &shape.into(), init)?;
        if self.shared.plan.is_unfrozen(&full) {
            let var = Var::from_tensor(&t.to_dtype(DType::F32)?)?;
            self.shared.params.insert(&full, var.clone())?;
            Ok(var.as_tensor().clone())
        } else {
            Ok(t)
        }
    }

    /// A new trainable parameter that no checkpoint holds (a task head), seeded from the plan.
    pub fn new_param(&self, name: &str, shape: impl Into<Shape>, init: Init) -> Result<Tensor> {
        let full = self.full_name(name);
        let seed = rand::Rng::gen::<u64>(
            &mut *self
                .shared
                .init_rng
                .lock()
                .unwrap_or_else(|e| e.into_inner()),
        );
        let t = random_tensor(seed, &full, &shape.into(), init, &self.shared.device)?;
        let var = Var::from_tensor(&t)?;
        self.shared.params.insert(&full, var.clone())?;
        Ok(var.as_tensor().clone())
    }

    /// The base linear `name` (`weight` `out × in`, optional `bias`), with the adapter the plan
    /// assigns to its path.
    pub fn linear(
        &self,
        in_dim: usize,
        out_dim: usize,
        bias: bool,
        name: &str,
    ) -> Result<Arc<TunableLinear>> {
        let b = self.pp(name);
        let weight = b.param("weight", (out_dim, in_dim), Init::Normal(0.02))?;
        let bias = if bias {
            Some(b.param("bias", out_dim, Init::Zeros)?)
        } else {
            None
        };
        b.finish_linear(weight, bias, false)
    }

    /// A new, fully trainable linear that no checkpoint holds (a task head), initialised as
    /// transformers does (normal with std 0.02, zero bias).
    pub fn new_linear(
        &self,
        in_dim: usize,
        out_dim: usize,
        name: &str,
    ) -> Result<Arc<TunableLinear>> {
        let b = self.pp(name);
        let weight = b.new_param("weight", (out_dim, in_dim), Init::Normal(0.02))?;
        let bias = b.new_param("bias", out_dim, Init::Zeros)?;
        b.finish_linear(weight, Some(bias), true)
    }

    fn finish_linear(
        &self,
        weight: Tensor,
        bias: Option<Tensor>,
        is_head: bool,
    ) -> Result<Arc<TunableLinear>> {
        let registry = &self.shared.registry;
        let linear = Arc::new(TunableLinear::new(
            self.path(),
            weight,
            bias,
            is_head,
            registry.switch(),
        ));
        registry.insert(linear.clone())?;
        Ok(linear)
    }

    /// The base 2-D convolution `name` (`weight` `out × in × k × k`, optional `bias`), with the
    /// adapters the plan assigns to its path.
    pub fn conv2d(
        &self,
        in_channels: usize,
        out_channels: usize,
        kernel: usize,
        geometry: ConvGeometry,
        bias: bool,
        name: &str,
    ) -> Result<Arc<TunableConv2d>> {
        let b = self.pp(name);
        let groups = geometry.groups.max(1);
        if !in_channels.is_multiple_of(groups) || !out_channels.is_multiple_of(groups) {
            return Err(PeftError::Config {
                key: b.path(),
                message: format!(
                    "{in_channels} input and {out_channels} output channels do not split into {groups} groups"
                ),
            });
        }
        let fan_in = (in_channels / groups * kernel * kernel) as f64;
        let weight = b.param(
            "weight",
            (out_channels, in_channels / groups, kernel, kernel),
            Init::Normal(1.0 / fan_in.sqrt()),
        )?;
        let bias = if bias {
            Some(b.param("bias", out_channels, Init::Zeros)?)
        } else {
            None
        };
        let registry = &self.shared.registry;
        let conv = Arc::new(TunableConv2d::new(
            b.path(),
            weight,
            bias,
            geometry,
            registry.switch(),
        ));
        registry.insert_conv(conv.clone())?;
        Ok(conv)
    }

    /// The base BatchNorm `name` over `channels` (`weight`, `bias`, `running_mean`,
    /// `running_var`; `num_batches_tracked` is not needed), doing `mode` while training.
    pub fn batch_norm2d(
        &self,
        channels: usize,
        eps: f64,
        momentum: f64,
        mode: BatchNormMode,
        name: &str,
    ) -> Result<Arc<BatchNorm2d>> {
        let b = self.pp(name);
        let stat = |n: &str, init| -> Result<Tensor> {
            let full = b.full_name(n);
            Ok(b.load_base(&full, &Shape::from(channels), init)?
                .to_dtype(DType::F32)?)
        };
        let bn = Arc::new(
            BatchNorm2d::new(
                b.path(),
                b.param("weight", channels, Init::Ones)?,
                b.param("bias", channels, Init::Zeros)?,
                stat("running_mean", Init::Zeros)?,
                stat("running_var", Init::Ones)?,
                eps,
                momentum,
                mode,
            )
            .with_switch(self.shared.registry.switch()),
        );
        self.shared.registry.insert_batch_norm(bn.clone())?;
        Ok(bn)
    }

    /// The base embedding `name` (`weight` `vocab × dim`), with the adapters the plan assigns
    /// to its path; lookups come out in the model's dtype.
    pub fn embedding(&self, vocab: usize, dim: usize, name: &str) -> Result<Arc<TunableEmbedding>> {
        let b = self.pp(name);
        let table = b.param("weight", (vocab, dim), Init::Normal(0.02))?;
        let registry = &self.shared.registry;
        let e = Arc::new(TunableEmbedding::new(
            b.path(),
            table,
            self.dtype(),
            registry.switch(),
        ));
        registry.insert_embedding(e.clone())?;
        Ok(e)
    }

    /// The base LayerNorm `name` (`weight` and `bias` of size `dim`).
    pub fn layer_norm(&self, dim: usize, eps: f64, name: &str) -> Result<LayerNorm> {
        let b = self.pp(name);
        Ok(LayerNorm::new(
            b.param("weight", dim, Init::Ones)?,
            b.param("bias", dim, Init::Zeros)?,
            eps,
        ))
    }

    /// A bottleneck-adapter hook point at this builder's path (the module after which the
    /// adapter acts), for hidden states of width `dim`.
    pub fn bottleneck_hook(&self, dim: usize, point: HookPoint) -> Result<Arc<BottleneckHook>> {
        let registry = &self.shared.registry;
        let hook = Arc::new(BottleneckHook {
            site: Site::new(self.path(), registry.switch()),
            point,
            dim,
        });
        registry.insert_hook(hook.clone())?;
        Ok(hook)
    }

    /// The model's virtual-token input for prompt and prefix tuning: `table` is the word
    /// embedding table (`vocab × dim`), `layers` the number of attention layers.
    pub fn prompt_site(&self, table: &Tensor, layers: usize) -> Result<Arc<PromptSite>> {
        let registry = &self.shared.registry;
        let site = Arc::new(PromptSite {
            site: Site::new(self.path(), registry.switch()),
            table: table.detach(),
            layers,
        });
        registry.set_prompt_site(site.clone())?;
        Ok(site)
    }

    /// A dropout layer drawing from the model's seeded stream.
    pub fn dropout(&self, p: f32) -> Dropout {
        Dropout::new(p, self.shared.dropout_rng.clone())
    }

    /// What the model needs after construction: parameters, registry and base fingerprint. The
    /// first call injects the plan's adapter (as `default`) into the layers built so far.
    pub fn parts(&self) -> Result<TunedParts> {
        let s = &self.shared;
        let mut injected = s.injected.lock().unwrap_or_else(|e| e.into_inner());
        if let (Some(adapter), false) = (&s.plan.plan.adapter, *injected) {
            let adapter_params = s.registry.add_adapter("default", adapter)?;
            for (name, var) in adapter_params.named_vars() {
                s.params.insert(&name, var)?;
            }
        }
        *injected = true;
        drop(injected);
        let fp = self
            .shared
            .fingerprint
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let mut h = Sha256::new();
        for (name, (digest, _)) in fp.iter() {
            h.update(name.as_bytes());
            h.update(digest);
        }
        Ok(TunedParts {
            params: self.shared.params.clone(),
            registry: self.shared.registry.clone(),
            base_fingerprint: format!("sha256:{:x}", h.finalize()),
            plan: self.shared.plan.plan.clone(),
            dropout_rng: self.shared.dropout_rng.clone(),
            base_tensors: fp
                .iter()
                .map(|(n, (_, k))| (n.clone(), k.clone()))
                .collect(),
        })
    }
}

/// A digest of one base tensor: its shape, its first and last 64 values and its sum, in f32.
/// Cheap on a 100 MB checkpoint, and any retrained or different model changes it.
fn tensor_digest(name: &str, t: &Tensor) -> Result<[u8; 32]> {
    let flat = t.flatten_all()?.to_dtype(DType::F32)?;
    let n = flat.elem_count();
    let k = n.min(64);
    let mut h = Sha256::new();
    h.update(name.as_bytes());
    for d in t.dims() {
        h.update((*d as u64).to_le_bytes());
    }
    for part in [flat.narrow(0, 0, k)?, flat.narrow(0, n - k, k)?] {
        for v in part.to_vec1::<f32>()? {
            h.update(v.to_le_bytes());
        }
    }
    let sum = flat.to_dtype(DType::F64)?.sum_all()?.to_scalar::<f64>()?;
    h.update(format!("{sum:.6e}").as_bytes());
    Ok(h.finalize().into())
}
