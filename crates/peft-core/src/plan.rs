//! The tuning plan: which adapter goes where, and which base parameters are trained outright.

use regex::Regex;

use crate::error::Result;
use crate::methods::AdapterConfig;
use crate::target::full_match_regex;

/// Everything that decides which weights train: the adapter, whole parameters unfrozen by
/// pattern, and the seed for adapter initialisation and dropout.
#[derive(Clone, Debug, Default)]
pub struct TuningPlan {
    /// The adapter to inject as `default`, if any (none = only unfrozen parameters and heads
    /// train).
    pub adapter: Option<AdapterConfig>,
    /// Full-match regular expressions over parameter names (`classifier\..*`, `.*\.bias`).
    pub unfreeze: Vec<String>,
    /// Seed for adapter initialisation and dropout.
    pub seed: u64,
}

/// A tuning plan with its patterns compiled.
#[derive(Clone, Debug)]
pub struct CompiledPlan {
    /// The plan as given.
    pub plan: TuningPlan,
    unfreeze: Vec<Regex>,
}

impl CompiledPlan {
    /// Checks the adapter and compiles the plan's patterns, with errors naming the key.
    pub fn new(plan: TuningPlan) -> Result<Self> {
        if let Some(adapter) = &plan.adapter {
            adapter.validate()?;
            adapter.linear_targets()?;
        }
        let unfreeze = plan
            .unfreeze
            .iter()
            .map(|p| full_match_regex(p, "tuning.unfreeze"))
            .collect::<Result<_>>()?;
        Ok(Self { plan, unfreeze })
    }

    /// Whether the base parameter `name` is trained outright.
    pub fn is_unfrozen(&self, name: &str) -> bool {
        self.unfreeze.iter().any(|re| re.is_match(name))
    }
}
