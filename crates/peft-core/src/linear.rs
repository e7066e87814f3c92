//! The tunable linear: a frozen (or fully trainable) base plus the adapters added at its path,
//! of which the model-wide switch picks the active one; mergeable into the base and back.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use candle_core::Tensor;

use crate::error::{PeftError, Result};
use crate::methods::{BaseLinear, LinearAdapter};
use crate::switch::AdapterSwitch;

struct LinearState {
    weight: Tensor,
    bias: Option<Tensor>,
    adapters: BTreeMap<String, Arc<dyn LinearAdapter>>,
    /// The adapter folded into `weight`/`bias`, if any.
    merged: Option<String>,
}

/// A linear layer at a known module path. Model code builds it with
/// [`crate::ModelBuilder::linear`] and never names an adapter method.
pub struct TunableLinear {
    path: String,
    is_head: bool,
    state: RwLock<LinearState>,
    switch: AdapterSwitch,
}

impl std::fmt::Debug for TunableLinear {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = self.state();
        f.debug_struct("TunableLinear")
            .field("path", &self.path)
            .field("adapters", &s.adapters.keys().collect::<Vec<_>>())
            .field("merged", &s.merged)
            .finish()
    }
}

impl TunableLinear {
    /// A linear at `path` with `weight` (`out × in`) and optional `bias`, following `switch`.
    pub(crate) fn new(
        path: String,
        weight: Tensor,
        bias: Option<Tensor>,
        is_head: bool,
        switch: AdapterSwitch,
    ) -> Self {
        Self {
            path,
            is_head,
            state: RwLock::new(LinearState {
                weight,
                bias,
                adapters: BTreeMap::new(),
                merged: None,
            }),
            switch,
        }
    }

    fn state(&self) -> RwLockReadGuard<'_, LinearState> {
        self.state.read().unwrap_or_else(|e| e.into_inner())
    }

    fn state_mut(&self) -> RwLockWriteGuard<'_, LinearState> {
        self.state.write().unwrap_or_else(|e| e.into_inner())
    }

    /// The module path (Hugging Face name).
    pub fn path(&self) -> &str {
        &self.path
    }

    /// Whether this is a task head (excluded from `all-linear`).
    pub fn is_head(&self) -> bool {
        self.is_head
    }

    /// The adapter `name` at this layer, if any.
    pub fn adapter(&self, name: &str) -> Option<Arc<dyn LinearAdapter>> {
        self.state().adapters.get(name).cloned()
    }

    /// The adapter the switch makes active here, if any (none while disabled).
    pub fn active_adapter(&self) -> Option<Arc<dyn LinearAdapter>> {
        self.switch.active().and_then(|name| self.adapter(&name))
    }

    /// The names of the adapters at this layer.
    pub fn adapter_names(&self) -> Vec<String> {
        self.state().adapters.keys().cloned().collect()
    }

    /// The current base weight (with an adapter folded in while merged).
    pub fn weight(&self) -> Tensor {
        self.state().weight.clone()
    }

    /// The current bias, if any.
    pub fn bias(&self) -> Option<Tensor> {
        self.state().bias.clone()
    }

    /// The adapter currently folded into the weight, if any.
    pub fn merged_adapter(&self) -> Option<String> {
        self.state().merged.clone()
    }

    /// `(in, out)` features.
    pub fn dims(&self) -> (usize, usize) {
        let d = self.state().weight.dims().to_vec();
        (d[1], d[0])
    }

    /// Adds adapter `name`; `new_weight` replaces the base weight for methods that change it.
    pub(crate) fn insert_adapter(
        &self,
        name: &str,
        adapter: Arc<dyn LinearAdapter>,
        new_weight: Option<Tensor>,
    ) {
        let mut state = self.state_mut();
        if let Some(w) = new_weight {
            state.weight = w;
        }
        state.adapters.insert(name.to_string(), adapter);
    }

    /// Removes adapter `name`, putting back the base weight it replaced, if any.
    pub(crate) fn remove_adapter(&self, name: &str) -> Result<()> {
        let mut state = self.state_mut();
        if let Some(adapter) = state.adapters.remove(name) {
            if let Some(w) = adapter.restored_base(&state.weight)? {
                state.weight = w;
            }
        }
        Ok(())
    }

    /// Applies the layer to `x` of shape `(..., in)`.
    pub fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let state = self.state();
        // At evaluation every parameter is used detached, so that no autograd graph (and no
        // activation it would keep alive) is built for trainable weights.
        let (w, bias) = if train {
            (state.weight.clone(), state.bias.clone())
        } else {
            (
                state.weight.detach(),
                state.bias.as_ref().map(Tensor::detach),
            )
        };
        let base = BaseLinear {
            weight: &w,
            bias: bias.as_ref(),
            trainable: train && (w.is_variable() || bias.as_ref().is_some_and(|b| b.is_variable())),
        };
        let adapter = match (&state.merged, self.switch.active()) {
            (None, Some(name)) => state.adapters.get(&name).cloned(),
            _ => None,
        };
        drop(state);
        match adapter {
            Some(a) => a.forward(x, &base, train),
            None => base.forward(x),
        }
    }

    /// Folds adapter `name` into the base weight. A no-op where the layer has no such adapter.
    pub(crate) fn merge(&self, name: &str) -> Result<()> {
        let mut state = self.state_mut();
        let Some(adapter) = state.adapters.get(name).cloned() else {
            return Ok(());
        };
        if let Some(m) = &state.merged {
            return Err(self.fold_error(format!("adapter `{m}` is already merged")));
        }
        if state.weight.is_variable() {
            return Err(self.fold_error(
                "cannot merge an adapter into a base weight that is itself trained".into(),
            ));
        }
        let (w, b) = adapter.merged(&state.weight, state.bias.as_ref())?;
        state.weight = w;
        state.bias = b;
        state.merged = Some(name.to_string());
        Ok(())
    }

    /// Undoes [`Self::merge`]. A no-op when nothing is merged.
    pub(crate) fn unmerge(&self) -> Result<()> {
        let mut state = self.state_mut();
        let Some(name) = state.merged.clone() else {
            return Ok(());
        };
        let adapter = state
            .adapters
            .get(&name)
            .cloned()
            .ok_or_else(|| self.fold_error(format!("merged adapter `{name}` is gone")))?;
        let (w, b) = adapter.unmerged(&state.weight, state.bias.as_ref())?;
        state.weight = w;
        state.bias = b;
        state.merged = None;
        Ok(())
    }

    fn fold_error(&self, message: String) -> PeftError {
        PeftError::Config {
            key: self.path.clone(),
            message,
        }
    }
}
