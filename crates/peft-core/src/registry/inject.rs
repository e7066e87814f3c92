//! Injecting a new adapter: each method's pieces built at every site it targets, checked, then
//! attached together (so a refused adapter leaves no piece behind).

use std::sync::Arc;

use rand::SeedableRng;

use super::{config_error, list_or_none, AdapterEntry, Registry};
use crate::conv::TunableConv2d;
use crate::embedding::TunableEmbedding;
use crate::error::Result;
use crate::linear::TunableLinear;
use crate::methods::bottleneck::{BottleneckHook, BottleneckLayer};
use crate::methods::lora_conv::LoraConv2d;
use crate::methods::lora_embedding::LoraEmbedding;
use crate::methods::prompt::{PromptSite, VirtualTokens};
use crate::methods::{AdapterConfig, LayerContext, LinearAdapter};
use crate::params::ParamStore;

/// A linear layer, its new adapter, and the base weight the adapter replaces (PiSSA).
type LinearPiece = (
    Arc<TunableLinear>,
    Arc<dyn LinearAdapter>,
    Option<candle_core::Tensor>,
);

/// The parts of one new adapter, before they are attached.
enum Pieces {
    Linear(
        Vec<LinearPiece>,
        Vec<(Arc<TunableEmbedding>, Arc<LoraEmbedding>)>,
        Vec<(Arc<TunableConv2d>, Arc<LoraConv2d>)>,
    ),
    Hooks(Vec<(Arc<BottleneckHook>, Arc<BottleneckLayer>)>),
    Virtual(Arc<PromptSite>, Arc<VirtualTokens>),
}

fn name_seed(seed: u64, name: &str) -> u64 {
    // FNV-1a over the adapter name, so that two adapters of one model start differently.
    name.bytes().fold(seed ^ 0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

impl Registry {
    /// Injects a new adapter `name` into every layer `config` targets and returns its tensors.
    /// The first adapter of a model becomes the active one.
    pub fn add_adapter(&self, name: &str, config: &AdapterConfig) -> Result<ParamStore> {
        if name.is_empty() || name.contains(['.', '/']) {
            return Err(config_error(
                "adapter",
                &format!("`{name}` is not a valid adapter name (non-empty, no `.` or `/`)"),
            ));
        }
        if self.lock().adapters.contains_key(name) {
            return Err(config_error(
                "adapter",
                &format!(
                    "an adapter named `{name}` already exists (the model has: {})",
                    list_or_none(&self.adapter_names())
                ),
            ));
        }
        config.validate()?;
        self.refuse_while_merged("add an adapter")?;
        if let AdapterConfig::Lora(c) = config {
            if c.init == crate::methods::LoraInit::Pissa && !self.adapter_names().is_empty() {
                return Err(config_error(
                    "adapter.init",
                    "PiSSA replaces the base weights: add it before any other adapter",
                ));
            }
        }
        let mut rng = rand::rngs::StdRng::seed_from_u64(name_seed(self.ctx.seed, name));
        let pieces = self.build_pieces(config, &mut rng)?;
        let params = ParamStore::default();
        let add = |path: &str, named: Vec<(String, candle_core::Var)>| -> Result<()> {
            for (key, var) in named {
                let full = if path.is_empty() {
                    key
                } else {
                    format!("{path}.{key}")
                };
                params.insert(&full, var)?;
            }
            Ok(())
        };
        match &pieces {
            Pieces::Linear(layers, embeddings, convs) => {
                for (l, a, _) in layers {
                    add(l.path(), a.named_params())?;
                }
                for (e, a) in embeddings {
                    add(e.path(), a.named_params())?;
                }
                for (c, a) in convs {
                    add(c.path(), a.named_params())?;
                }
            }
            Pieces::Hooks(hooks) => {
                for (h, a) in hooks {
                    add(h.site.path(), a.named_params())?;
                }
            }
            Pieces::Virtual(_, tokens) => add("", tokens.named_params())?,
        }
        match pieces {
            Pieces::Linear(layers, embeddings, convs) => {
                for (l, a, new_base) in layers {
                    l.insert_adapter(name, a, new_base);
                }
                for (e, a) in embeddings {
                    e.insert_adapter(name, a);
                }
                for (c, a) in convs {
                    c.insert_adapter(name, a);
                }
            }
            Pieces::Hooks(hooks) => {
                for (h, a) in hooks {
                    h.site.insert(name, a);
                }
            }
            Pieces::Virtual(site, tokens) => site.site.insert(name, tokens),
        }
        self.lock().adapters.insert(
            name.to_string(),
            AdapterEntry {
                config: config.clone(),
                params: params.clone(),
            },
        );
        if self.switch.selected().is_none() {
            self.switch.select(Some(name.to_string()));
        } else {
            // A new adapter starts with a copy of the current heads.
            let live = self.base_trainables();
            self.heads.stash(name, &live)?;
        }
        Ok(params)
    }

    /// Builds the new adapter's parts for every place `config` targets, or an error that says
    /// what the model offers when it targets nothing.
    fn build_pieces(&self, config: &AdapterConfig, rng: &mut rand::rngs::StdRng) -> Result<Pieces> {
        let device = &self.ctx.device;
        match config {
            AdapterConfig::Lora(_) | AdapterConfig::Ia3(_) => {
                let targets = config
                    .linear_targets()?
                    .expect("linear methods have targets");
                let mut layers = vec![];
                for linear in self.linears() {
                    if !targets.matches(linear.path(), linear.is_head()) {
                        continue;
                    }
                    let weight = linear.weight();
                    let mut ctx = LayerContext {
                        path: linear.path(),
                        weight: &weight,
                        rng: &mut *rng,
                        dropout_rng: self.ctx.dropout_rng.clone(),
                        device,
                        new_base_weight: None,
                    };
                    let layer = config.linear_layer(&mut ctx)?;
                    let new_base = ctx.new_base_weight.take();
                    layers.push((linear.clone(), Arc::from(layer), new_base));
                }
                let mut embeddings = vec![];
                if let AdapterConfig::Lora(c) = config {
                    for e in self.embeddings() {
                        if !targets.matches_non_linear(e.path()) {
                            continue;
                        }
                        if c.use_dora {
                            return Err(config_error(
                                e.path(),
                                "DoRA on an embedding is not supported",
                            ));
                        }
                        let (vocab, dim) = e.table().dims2()?;
                        let lora = LoraEmbedding::new(c, vocab, dim, rng, device)?;
                        embeddings.push((e, Arc::new(lora)));
                    }
                }
                let mut convs = vec![];
                if let AdapterConfig::Lora(c) = config {
                    for conv in self.convs() {
                        if !targets.matches_non_linear(conv.path()) {
                            continue;
                        }
                        if c.use_dora || c.init != crate::methods::LoraInit::Kaiming {
                            return Err(config_error(
                                conv.path(),
                                "DoRA, gaussian and PiSSA init are not supported on a Conv2d",
                            ));
                        }
                        if conv.geometry().groups > 1 {
                            return Err(config_error(
                                conv.path(),
                                "LoRA on a grouped (e.g. depthwise) convolution is not supported: \
                                 narrow target_modules to the ungrouped convolutions",
                            ));
                        }
                        let dropout =
                            crate::ops::Dropout::new(c.lora_dropout, self.ctx.dropout_rng.clone());
                        let dims = conv.weight().dims().to_vec();
                        let lora =
                            LoraConv2d::new(c, &dims, conv.geometry(), dropout, rng, device)?;
                        convs.push((conv, Arc::new(lora)));
                    }
                }
                if layers.is_empty() && embeddings.is_empty() && convs.is_empty() {
                    let paths: Vec<String> = self
                        .linears()
                        .iter()
                        .filter(|l| !l.is_head())
                        .take(8)
                        .map(|l| l.path().to_string())
                        .collect();
                    return Err(config_error(
                        "adapter.target_modules",
                        &format!(
                            "matched no layer of the model (its linear layers include: {})",
                            list_or_none(&paths)
                        ),
                    ));
                }
                Ok(Pieces::Linear(layers, embeddings, convs))
            }
            AdapterConfig::Bottleneck(c) => {
                let hooks: Vec<Arc<BottleneckHook>> = self.lock().hooks.values().cloned().collect();
                let mut pieces = vec![];
                for hook in hooks {
                    if c.wants(hook.point, hook.site.path())? {
                        let layer = BottleneckLayer::new(c, hook.dim, rng, device)?;
                        pieces.push((hook, Arc::new(layer)));
                    }
                }
                if pieces.is_empty() {
                    return Err(config_error(
                        "adapter",
                        "the model offers no hook point for this bottleneck placement and layers",
                    ));
                }
                Ok(Pieces::Hooks(pieces))
            }
            AdapterConfig::PromptTuning(_) | AdapterConfig::PrefixTuning(_) => {
                let site = self.lock().prompt.clone().ok_or_else(|| {
                    config_error(
                        "adapter",
                        &format!(
                            "this model does not read virtual tokens ({})",
                            config.peft_type()
                        ),
                    )
                })?;
                let tokens = match config {
                    AdapterConfig::PromptTuning(c) => VirtualTokens::prompt(c, &site.table, rng)?,
                    AdapterConfig::PrefixTuning(c) => {
                        VirtualTokens::prefix(c, site.layers, site.table.dim(1)?, rng, device)?
                    }
                    _ => unreachable!("matched above"),
                };
                Ok(Pieces::Virtual(site, Arc::new(tokens)))
            }
        }
    }
}
