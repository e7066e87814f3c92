//! Every tunable layer of a built model, reachable by its module path, and the named adapters
//! injected into them: add, select, disable, delete, merge and unmerge on a built model, without
//! rebuilding it. Operations check everything first, so a refused one leaves the model as it was.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

use candle_core::Device;

mod inject;

use crate::batch_norm::BatchNorm2d;
use crate::conv::TunableConv2d;
use crate::embedding::TunableEmbedding;
use crate::error::{PeftError, Result};
use crate::heads::HeadBanks;
use crate::linear::TunableLinear;
use crate::methods::bottleneck::BottleneckHook;
use crate::methods::prompt::PromptSite;
use crate::methods::AdapterConfig;
use crate::ops::DropoutRng;
use crate::params::ParamStore;
use crate::switch::AdapterSwitch;

/// One named adapter of a model: its settings and its trainable tensors (named by peft's keys
/// without the `base_model.model.` prefix).
#[derive(Clone, Debug)]
pub struct AdapterEntry {
    /// The method and its settings.
    pub config: AdapterConfig,
    /// The adapter's tensors.
    pub params: ParamStore,
}

#[derive(Default)]
struct Inner {
    linears: BTreeMap<String, Arc<TunableLinear>>,
    embeddings: BTreeMap<String, Arc<TunableEmbedding>>,
    convs: BTreeMap<String, Arc<TunableConv2d>>,
    batch_norms: BTreeMap<String, Arc<BatchNorm2d>>,
    hooks: BTreeMap<String, Arc<BottleneckHook>>,
    prompt: Option<Arc<PromptSite>>,
    adapters: BTreeMap<String, AdapterEntry>,
}

/// One adapter's copy of the trainable base parameters (see [`Registry::heads_of`]).
pub struct HeadsOf {
    /// The tensors by name.
    pub vars: Vec<(String, candle_core::Var)>,
    bank: Option<String>,
}

/// Where new adapters draw their initial values and dropout masks from.
#[derive(Clone, Debug)]
struct InjectionContext {
    seed: u64,
    dropout_rng: DropoutRng,
    device: Device,
}

/// Tunable layers by path and adapters by name; cheap to clone, all clones shared.
#[derive(Clone)]
pub struct Registry {
    inner: Arc<Mutex<Inner>>,
    switch: AdapterSwitch,
    ctx: InjectionContext,
    heads: HeadBanks,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("adapters", &self.adapter_names())
            .field("active", &self.switch.active())
            .finish()
    }
}

impl Registry {
    /// An empty registry whose adapters initialise from `seed` and drop out with `dropout_rng`.
    /// `params` is the model's store of trainable tensors: the registry keeps one copy of its
    /// non-adapter tensors (task heads, unfrozen layers) per adapter.
    pub(crate) fn new(
        seed: u64,
        dropout_rng: DropoutRng,
        device: Device,
        params: ParamStore,
    ) -> Self {
        Self {
            inner: Arc::default(),
            switch: AdapterSwitch::default(),
            ctx: InjectionContext {
                seed,
                dropout_rng,
                device,
            },
            heads: HeadBanks::new(params),
        }
    }

    fn adapter_param_names(&self) -> std::collections::HashSet<String> {
        self.lock()
            .adapters
            .values()
            .flat_map(|e| e.params.named_vars().into_iter().map(|(n, _)| n))
            .collect()
    }

    /// The model's trainable tensors that belong to no adapter (task heads, unfrozen base
    /// parameters), as the selected adapter sees them. Each adapter has its own copy, as peft's
    /// `modules_to_save`: selecting another adapter swaps the values in.
    pub fn base_trainables(&self) -> Vec<(String, candle_core::Var)> {
        self.heads.live(&self.adapter_param_names())
    }

    /// Adapter `name`'s copy of [`Self::base_trainables`], to read or load values into: the live
    /// tensors when `name` is selected, else tensors that `finish` writes back to its copy.
    pub fn heads_of(&self, name: &str) -> Result<HeadsOf> {
        let live = self.base_trainables();
        if self.switch.selected().as_deref() == Some(name) {
            return Ok(HeadsOf {
                vars: live,
                bank: None,
            });
        }
        Ok(HeadsOf {
            vars: self.heads.bank_vars(name, &live)?,
            bank: Some(name.to_string()),
        })
    }

    /// Writes values loaded into [`Self::heads_of`]'s tensors back to the adapter's copy.
    pub fn finish_heads(&self, heads: HeadsOf) -> Result<()> {
        match heads.bank {
            Some(name) => self.heads.stash(&name, &heads.vars),
            None => Ok(()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn switch(&self) -> AdapterSwitch {
        self.switch.clone()
    }

    /// Registers a layer; two layers at one path are an error.
    pub(crate) fn insert(&self, linear: Arc<TunableLinear>) -> Result<()> {
        let mut inner = self.lock();
        if inner.linears.contains_key(linear.path()) {
            return Err(config_error(
                linear.path(),
                "two layers were built at the same module path",
            ));
        }
        inner.linears.insert(linear.path().to_string(), linear);
        Ok(())
    }

    /// Registers an embedding; two at one path are an error.
    pub(crate) fn insert_embedding(&self, e: Arc<TunableEmbedding>) -> Result<()> {
        let mut inner = self.lock();
        if inner.embeddings.contains_key(e.path()) {
            return Err(config_error(
                e.path(),
                "two embeddings were built at the same module path",
            ));
        }
        inner.embeddings.insert(e.path().to_string(), e);
        Ok(())
    }

    /// Registers a convolution; two at one path are an error.
    pub(crate) fn insert_conv(&self, c: Arc<TunableConv2d>) -> Result<()> {
        let mut inner = self.lock();
        if inner.convs.contains_key(c.path()) {
            return Err(config_error(
                c.path(),
                "two convolutions were built at the same module path",
            ));
        }
        inner.convs.insert(c.path().to_string(), c);
        Ok(())
    }

    /// All convolutions, sorted by path.
    pub fn convs(&self) -> Vec<Arc<TunableConv2d>> {
        self.lock().convs.values().cloned().collect()
    }

    pub(crate) fn insert_batch_norm(&self, bn: Arc<BatchNorm2d>) -> Result<()> {
        let mut inner = self.lock();
        if inner.batch_norms.contains_key(bn.path()) {
            return Err(config_error(
                bn.path(),
                "two BatchNorms were built at the same module path",
            ));
        }
        inner.batch_norms.insert(bn.path().to_string(), bn);
        Ok(())
    }

    /// All BatchNorm layers, sorted by path.
    pub fn batch_norms(&self) -> Vec<Arc<BatchNorm2d>> {
        self.lock().batch_norms.values().cloned().collect()
    }

    /// All embeddings, sorted by path.
    pub fn embeddings(&self) -> Vec<Arc<TunableEmbedding>> {
        self.lock().embeddings.values().cloned().collect()
    }

    /// Registers a bottleneck hook point; two at one path are an error.
    pub(crate) fn insert_hook(&self, hook: Arc<BottleneckHook>) -> Result<()> {
        let mut inner = self.lock();
        let path = hook.site.path().to_string();
        if inner.hooks.contains_key(&path) {
            return Err(config_error(
                &path,
                "two hooks were built at the same module path",
            ));
        }
        inner.hooks.insert(path, hook);
        Ok(())
    }

    /// Registers the model's virtual-token input; a model has at most one.
    pub(crate) fn set_prompt_site(&self, site: Arc<PromptSite>) -> Result<()> {
        let mut inner = self.lock();
        if inner.prompt.is_some() {
            return Err(config_error(
                site.site.path(),
                "a model has one prompt site",
            ));
        }
        inner.prompt = Some(site);
        Ok(())
    }

    /// The tensors a file stores for adapter `name`, by name without peft's key prefix: its
    /// parameters, except that prefix tuning's MLP is replaced by its output.
    pub fn tensors_to_save(&self, name: &str) -> Result<Vec<(String, candle_core::Tensor)>> {
        let entry = self.adapter(name).ok_or_else(|| self.unknown(name))?;
        let prompt = self.lock().prompt.clone();
        if let Some(tokens) = prompt.and_then(|p| p.site.get(name)) {
            return tokens.tensors_to_save();
        }
        if !matches!(entry.config, AdapterConfig::Lora(_) | AdapterConfig::Ia3(_)) {
            return Ok(entry
                .params
                .named_vars()
                .into_iter()
                .map(|(n, v)| (n, v.as_tensor().clone()))
                .collect());
        }
        let mut out = vec![];
        for l in self.linears() {
            if let Some(a) = l.adapter(name) {
                for (key, t) in a.tensors_to_save()? {
                    out.push((format!("{}.{key}", l.path()), t));
                }
            }
        }
        for e in self.embeddings() {
            if let Some(a) = e.adapter(name) {
                for (key, v) in a.named_params() {
                    out.push((format!("{}.{key}", e.path()), v.as_tensor().clone()));
                }
            }
        }
        for c in self.convs() {
            if let Some(a) = c.adapter(name) {
                for (key, v) in a.named_params() {
                    out.push((format!("{}.{key}", c.path()), v.as_tensor().clone()));
                }
            }
        }
        Ok(out)
    }

    /// All linear layers, sorted by path.
    pub fn linears(&self) -> Vec<Arc<TunableLinear>> {
        self.lock().linears.values().cloned().collect()
    }

    /// The linear at `path`.
    pub fn linear(&self, path: &str) -> Option<Arc<TunableLinear>> {
        self.lock().linears.get(path).cloned()
    }

    /// The names of the model's adapters, sorted.
    pub fn adapter_names(&self) -> Vec<String> {
        self.lock().adapters.keys().cloned().collect()
    }

    /// The adapter called `name`.
    pub fn adapter(&self, name: &str) -> Option<AdapterEntry> {
        self.lock().adapters.get(name).cloned()
    }

    /// The selected adapter, applied unless adapters are disabled.
    pub fn selected(&self) -> Option<String> {
        self.switch.selected()
    }

    /// The adapter the model applies now (`None` without adapters or while disabled).
    pub fn active(&self) -> Option<String> {
        self.switch.active()
    }

    /// The module paths that carry the active adapter.
    pub fn adapted_paths(&self) -> Vec<String> {
        let Some(name) = self.switch.selected() else {
            return vec![];
        };
        let mut paths: Vec<String> = self
            .linears()
            .iter()
            .filter(|l| l.adapter(&name).is_some())
            .map(|l| l.path().to_string())
            .collect();
        paths.extend(
            self.embeddings()
                .iter()
                .filter(|e| e.adapter(&name).is_some())
                .map(|e| e.path().to_string()),
        );
        paths.extend(
            self.convs()
                .iter()
                .filter(|c| c.adapter(&name).is_some())
                .map(|c| c.path().to_string()),
        );
        paths
    }

    fn merged_adapter(&self) -> Option<String> {
        self.linears()
            .iter()
            .find_map(|l| l.merged_adapter())
            .or_else(|| self.embeddings().iter().find_map(|e| e.merged_adapter()))
            .or_else(|| self.convs().iter().find_map(|c| c.merged_adapter()))
    }

    fn refuse_while_merged(&self, what: &str) -> Result<()> {
        match self.merged_adapter() {
            Some(m) => Err(config_error(
                "adapters",
                &format!("cannot {what} while adapter `{m}` is merged: unmerge it first"),
            )),
            None => Ok(()),
        }
    }

    fn unknown(&self, name: &str) -> PeftError {
        config_error(
            "adapter",
            &format!(
                "the model has no adapter `{name}` (it has: {})",
                list_or_none(&self.adapter_names())
            ),
        )
    }

    /// Makes `name` the active adapter (and enables adapters).
    pub fn set_active(&self, name: &str) -> Result<()> {
        if self.adapter(name).is_none() {
            return Err(self.unknown(name));
        }
        self.refuse_while_merged("switch adapters")?;
        let selected = self.switch.selected();
        if selected.as_deref() != Some(name) {
            let live = self.base_trainables();
            if let Some(old) = selected {
                self.heads.stash(&old, &live)?;
            }
            self.heads.restore(name, &live)?;
            self.switch.select(Some(name.to_string()));
        }
        self.switch.set_disabled(false);
        Ok(())
    }

    /// Turns every adapter off: the model gives the base model's output.
    pub fn disable(&self) -> Result<()> {
        self.refuse_while_merged("disable adapters")?;
        self.switch.set_disabled(true);
        Ok(())
    }

    /// Undoes [`Self::disable`].
    pub fn enable(&self) {
        self.switch.set_disabled(false);
    }

    /// Whether adapters are disabled.
    pub fn is_disabled(&self) -> bool {
        self.switch.is_disabled()
    }

    /// Removes adapter `name` from every layer. When it was active, no adapter is active after.
    pub fn delete_adapter(&self, name: &str) -> Result<()> {
        if self.adapter(name).is_none() {
            return Err(self.unknown(name));
        }
        if self.merged_adapter().as_deref() == Some(name) {
            return Err(config_error(
                "adapter",
                &format!("cannot delete adapter `{name}` while it is merged: unmerge it first"),
            ));
        }
        for l in self.linears() {
            l.remove_adapter(name)?;
        }
        for e in self.embeddings() {
            e.remove_adapter(name);
        }
        for c in self.convs() {
            c.remove_adapter(name);
        }
        for bn in self.batch_norms() {
            bn.remove_adapter(name);
        }
        let mut inner = self.lock();
        for h in inner.hooks.values() {
            h.site.remove(name);
        }
        if let Some(p) = &inner.prompt {
            p.site.remove(name);
        }
        inner.adapters.remove(name);
        drop(inner);
        self.heads.drop_bank(name);
        if self.switch.selected().as_deref() == Some(name) {
            self.switch.select(None);
        }
        Ok(())
    }

    /// Folds the active adapter into the base weights. Refused (with the model unchanged) for
    /// methods that have no merge.
    pub fn merge(&self) -> Result<()> {
        let Some(name) = self.switch.active() else {
            return Ok(());
        };
        let entry = self.adapter(&name).ok_or_else(|| self.unknown(&name))?;
        if !entry.config.is_mergeable() {
            return Err(config_error(
                "merge",
                &format!(
                    "adapter `{name}` ({}) cannot be merged into the base weights",
                    entry.config.peft_type()
                ),
            ));
        }
        if self.merged_adapter().as_deref() == Some(name.as_str()) {
            return Ok(());
        }
        self.refuse_while_merged("merge")?;
        let merged = self
            .linears()
            .iter()
            .try_for_each(|l| l.merge(&name))
            .and_then(|()| self.embeddings().iter().try_for_each(|e| e.merge(&name)))
            .and_then(|()| self.convs().iter().try_for_each(|c| c.merge(&name)));
        if let Err(e) = merged {
            self.unmerge()?;
            return Err(e);
        }
        Ok(())
    }

    /// Undoes [`Self::merge`].
    pub fn unmerge(&self) -> Result<()> {
        self.linears().iter().try_for_each(|l| l.unmerge())?;
        self.embeddings().iter().try_for_each(|e| e.unmerge())?;
        self.convs().iter().try_for_each(|c| c.unmerge())
    }

    /// [`Self::merge`] (kept for callers that merge "everything").
    pub fn merge_all(&self) -> Result<()> {
        self.merge()
    }

    /// [`Self::unmerge`].
    pub fn unmerge_all(&self) -> Result<()> {
        self.unmerge()
    }
}

fn config_error(key: &str, message: &str) -> PeftError {
    PeftError::Config {
        key: key.into(),
        message: message.into(),
    }
}

fn list_or_none(names: &[String]) -> String {
    if names.is_empty() {
        "none".into()
    } else {
        names.join(", ")
    }
}
