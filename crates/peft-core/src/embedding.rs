//! The tunable embedding: a lookup table (frozen, or trainable when unfrozen) plus the LoRA
//! adapters added at its path, of which the model-wide switch picks the active one.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock, RwLockReadGuard};

use candle_core::{DType, Tensor};

use crate::error::{PeftError, Result};
use crate::methods::lora_embedding::LoraEmbedding;
use crate::switch::AdapterSwitch;

struct EmbeddingState {
    table: Tensor,
    adapters: BTreeMap<String, Arc<LoraEmbedding>>,
    merged: Option<String>,
}

/// A lookup table `(vocab, dim)` at a known module path.
pub struct TunableEmbedding {
    path: String,
    state: RwLock<EmbeddingState>,
    dtype: DType,
    switch: AdapterSwitch,
}

impl std::fmt::Debug for TunableEmbedding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TunableEmbedding")
            .field("path", &self.path)
            .finish()
    }
}

impl TunableEmbedding {
    /// Wraps `table`; lookups come out in `dtype` (the model's compute dtype).
    pub(crate) fn new(path: String, table: Tensor, dtype: DType, switch: AdapterSwitch) -> Self {
        Self {
            path,
            state: RwLock::new(EmbeddingState {
                table,
                adapters: BTreeMap::new(),
                merged: None,
            }),
            dtype,
            switch,
        }
    }

    fn state(&self) -> RwLockReadGuard<'_, EmbeddingState> {
        self.state.read().unwrap_or_else(|e| e.into_inner())
    }

    /// The module path.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// The dtype lookups come out in (the model's compute dtype).
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The current table (with an adapter folded in while merged).
    pub fn table(&self) -> Tensor {
        self.state().table.clone()
    }

    /// The adapter `name` here.
    pub fn adapter(&self, name: &str) -> Option<Arc<LoraEmbedding>> {
        self.state().adapters.get(name).cloned()
    }

    /// The adapter currently folded into the table.
    pub fn merged_adapter(&self) -> Option<String> {
        self.state().merged.clone()
    }

    pub(crate) fn insert_adapter(&self, name: &str, a: Arc<LoraEmbedding>) {
        let mut s = self.state.write().unwrap_or_else(|e| e.into_inner());
        s.adapters.insert(name.into(), a);
    }

    pub(crate) fn remove_adapter(&self, name: &str) {
        let mut s = self.state.write().unwrap_or_else(|e| e.into_inner());
        s.adapters.remove(name);
    }

    /// Looks up `ids` of any shape; the result gains a trailing `dim` axis.
    pub fn forward(&self, ids: &Tensor, train: bool) -> Result<Tensor> {
        let state = self.state();
        let table = if train {
            state.table.clone()
        } else {
            state.table.detach()
        };
        let adapter = match (&state.merged, self.switch.active()) {
            (None, Some(name)) => state.adapters.get(&name).cloned(),
            _ => None,
        };
        drop(state);
        let mut dims = ids.dims().to_vec();
        dims.push(table.dim(1)?);
        let flat = ids.flatten_all()?;
        let mut out = table.index_select(&flat, 0)?.to_dtype(self.dtype)?;
        if let Some(a) = adapter {
            out = (out + a.delta(&flat, self.dtype, train)?)?;
        }
        Ok(out.reshape(dims)?)
    }

    pub(crate) fn merge(&self, name: &str) -> Result<()> {
        let mut s = self.state.write().unwrap_or_else(|e| e.into_inner());
        let Some(a) = s.adapters.get(name).cloned() else {
            return Ok(());
        };
        if s.table.is_variable() || s.merged.is_some() {
            return Err(PeftError::Config {
                key: self.path.clone(),
                message: "cannot merge into a trained or already merged table".into(),
            });
        }
        let delta = a.delta_weight()?.to_dtype(s.table.dtype())?;
        s.table = (&s.table + delta)?;
        s.merged = Some(name.into());
        Ok(())
    }

    pub(crate) fn unmerge(&self) -> Result<()> {
        let mut s = self.state.write().unwrap_or_else(|e| e.into_inner());
        let Some(name) = s.merged.clone() else {
            return Ok(());
        };
        if let Some(a) = s.adapters.get(&name).cloned() {
            let delta = a.delta_weight()?.to_dtype(s.table.dtype())?;
            s.table = (&s.table - delta)?;
        }
        s.merged = None;
        Ok(())
    }
}
