//! Per-adapter copies of the model's trainable base parameters (task heads, unfrozen layers), as
//! peft's `modules_to_save` keeps one copy per adapter: the live `Var`s hold the selected
//! adapter's values, and every other adapter's values wait in a bank until it is selected.

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};

use candle_core::{Tensor, Var};

use crate::error::Result;
use crate::params::ParamStore;

/// The banks of head values, by adapter name.
#[derive(Clone, Debug, Default)]
pub(crate) struct HeadBanks {
    /// The model's trainable parameters (adapters' and base ones).
    store: ParamStore,
    banks: Arc<Mutex<BTreeMap<String, BTreeMap<String, Tensor>>>>,
}

impl HeadBanks {
    pub fn new(store: ParamStore) -> Self {
        Self {
            store,
            banks: Arc::default(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<String, BTreeMap<String, Tensor>>> {
        self.banks.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The live trainable base parameters: the store without the tensors of `adapter_params`.
    pub fn live(&self, adapter_params: &HashSet<String>) -> Vec<(String, Var)> {
        self.store
            .named_vars()
            .into_iter()
            .filter(|(n, _)| !adapter_params.contains(n))
            .collect()
    }

    /// Keeps a copy of the live values for adapter `name`.
    pub fn stash(&self, name: &str, live: &[(String, Var)]) -> Result<()> {
        let values = live
            .iter()
            .map(|(n, v)| Ok((n.clone(), v.as_tensor().copy()?)))
            .collect::<Result<_>>()?;
        self.lock().insert(name.to_string(), values);
        Ok(())
    }

    /// Puts adapter `name`'s banked values into the live `Var`s (a no-op without a bank).
    pub fn restore(&self, name: &str, live: &[(String, Var)]) -> Result<()> {
        let Some(bank) = self.lock().remove(name) else {
            return Ok(());
        };
        for (n, v) in live {
            if let Some(t) = bank.get(n) {
                v.set(t)?;
            }
        }
        Ok(())
    }

    /// Adapter `name`'s bank, to write values into while it is not selected.
    pub fn bank_vars(&self, name: &str, live: &[(String, Var)]) -> Result<Vec<(String, Var)>> {
        // Banked tensors are exposed as fresh Vars; `stash` writes them back into the bank.
        let lock = self.lock();
        let bank = lock.get(name);
        live.iter()
            .map(|(n, v)| {
                let t = match bank.and_then(|b| b.get(n)) {
                    Some(t) => t.clone(),
                    None => v.as_tensor().copy()?,
                };
                Ok((n.clone(), Var::from_tensor(&t)?))
            })
            .collect()
    }

    /// Forgets adapter `name`'s bank.
    pub fn drop_bank(&self, name: &str) {
        self.lock().remove(name);
    }
}
