//! Every tunable linear of a built model, reachable by its module path, so that adapters can be
//! merged, unmerged and inspected without rebuilding the model.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use crate::error::{PeftError, Result};
use crate::linear::TunableLinear;

/// Tunable linears by module path.
#[derive(Clone, Debug, Default)]
pub struct Registry {
    linears: Arc<Mutex<BTreeMap<String, Arc<TunableLinear>>>>,
}

impl Registry {
    /// Registers a layer; two layers at one path are an error.
    pub fn insert(&self, linear: Arc<TunableLinear>) -> Result<()> {
        let mut map = self.linears.lock().unwrap_or_else(|e| e.into_inner());
        if map.contains_key(linear.path()) {
            return Err(PeftError::Config {
                key: linear.path().into(),
                message: "two layers were built at the same module path".into(),
            });
        }
        map.insert(linear.path().to_string(), linear);
        Ok(())
    }

    /// All layers, sorted by path.
    pub fn linears(&self) -> Vec<Arc<TunableLinear>> {
        self.linears
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect()
    }

    /// The module paths that carry an adapter.
    pub fn adapted_paths(&self) -> Vec<String> {
        self.linears()
            .iter()
            .filter(|l| l.lora().is_some())
            .map(|l| l.path().to_string())
            .collect()
    }

    /// Folds every adapter into its base weight.
    pub fn merge_all(&self) -> Result<()> {
        self.linears().iter().try_for_each(|l| l.merge())
    }

    /// Undoes [`Self::merge_all`].
    pub fn unmerge_all(&self) -> Result<()> {
        self.linears().iter().try_for_each(|l| l.unmerge())
    }
}
