//! The trainable parameters of a model: named `Var`s, the only thing the optimizer sees and the
//! only thing an adapter file stores.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

use candle_core::Var;

use crate::error::{PeftError, Result};

/// Named trainable parameters, shared by the builder, the layers and the trainer.
#[derive(Clone, Debug, Default)]
pub struct ParamStore {
    vars: Arc<Mutex<BTreeMap<String, Var>>>,
}

impl ParamStore {
    fn lock(&self) -> MutexGuard<'_, BTreeMap<String, Var>> {
        self.vars.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds a parameter; a second one under the same name is an error.
    pub fn insert(&self, name: &str, var: Var) -> Result<()> {
        let mut vars = self.lock();
        if vars.contains_key(name) {
            return Err(PeftError::Config {
                key: name.into(),
                message: "a trainable parameter with this name already exists".into(),
            });
        }
        vars.insert(name.to_string(), var);
        Ok(())
    }

    /// All parameters, sorted by name.
    pub fn named_vars(&self) -> Vec<(String, Var)> {
        self.lock()
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    /// The parameter called `name`.
    pub fn get(&self, name: &str) -> Option<Var> {
        self.lock().get(name).cloned()
    }

    /// Number of parameters.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether there is none.
    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }

    /// Total number of scalar values over all parameters.
    pub fn num_elements(&self) -> usize {
        self.lock().values().map(|v| v.elem_count()).sum()
    }
}
