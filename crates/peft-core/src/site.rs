//! A place in a model where block-level adapters attach (a bottleneck hook, the input prompt):
//! the adapters added there by name, of which the model-wide switch picks the active one.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use crate::switch::AdapterSwitch;

/// Adapters of one kind at one module path.
pub struct Site<T: ?Sized> {
    path: String,
    adapters: RwLock<BTreeMap<String, Arc<T>>>,
    switch: AdapterSwitch,
}

impl<T: ?Sized> std::fmt::Debug for Site<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Site").field("path", &self.path).finish()
    }
}

impl<T: ?Sized> Site<T> {
    pub(crate) fn new(path: String, switch: AdapterSwitch) -> Self {
        Self {
            path,
            adapters: RwLock::new(BTreeMap::new()),
            switch,
        }
    }

    /// The module path of the site.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// The active adapter here, if the active adapter has a part at this site.
    pub fn active(&self) -> Option<Arc<T>> {
        let name = self.switch.active()?;
        self.get(&name)
    }

    /// The adapter `name` here.
    pub fn get(&self, name: &str) -> Option<Arc<T>> {
        self.adapters
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .cloned()
    }

    pub(crate) fn insert(&self, name: &str, adapter: Arc<T>) {
        self.adapters
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(name.to_string(), adapter);
    }

    pub(crate) fn remove(&self, name: &str) {
        self.adapters
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(name);
    }
}
