//! The model-wide adapter switch: which named adapter is active, or none (base output). Every
//! tunable layer holds a clone and reads it on each forward pass.

use std::sync::{Arc, RwLock};

#[derive(Debug, Default)]
struct SwitchState {
    active: Option<String>,
    disabled: bool,
}

/// The active adapter of a model; cheap to clone, all clones shared.
#[derive(Clone, Debug, Default)]
pub struct AdapterSwitch(Arc<RwLock<SwitchState>>);

impl AdapterSwitch {
    /// The adapter layers apply now: the active one unless adapters are disabled.
    pub fn active(&self) -> Option<String> {
        let s = self.0.read().unwrap_or_else(|e| e.into_inner());
        if s.disabled {
            None
        } else {
            s.active.clone()
        }
    }

    /// The selected adapter, whether or not adapters are disabled.
    pub fn selected(&self) -> Option<String> {
        self.0
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .active
            .clone()
    }

    /// Whether adapters are disabled (the base model's output).
    pub fn is_disabled(&self) -> bool {
        self.0.read().unwrap_or_else(|e| e.into_inner()).disabled
    }

    pub(crate) fn select(&self, name: Option<String>) {
        self.0.write().unwrap_or_else(|e| e.into_inner()).active = name;
    }

    pub(crate) fn set_disabled(&self, disabled: bool) {
        self.0.write().unwrap_or_else(|e| e.into_inner()).disabled = disabled;
    }
}
