//! Weighted combinations of LoRA adapters into a new adapter, as peft's `add_weighted_adapter`
//! defines them (`linear` and `cat`). With `wᵢ` the weights and `sᵢ` the adapters' scalings:
//! - `linear` (equal ranks): `A = Σ sign(wᵢ)·√|wᵢsᵢ|·Aᵢ`, `B = Σ √|wᵢsᵢ|·Bᵢ`; note that `B·A`
//!   then has cross terms: it is not `Σ wᵢ·ΔWᵢ` unless one adapter covers the module.
//! - `cat`: `A = [w₁s₁A₁; w₂s₂A₂; …]`, `B = [B₁ B₂ …]`, so `B·A = Σ wᵢ·ΔWᵢ` exactly; rank
//!   `Σ rᵢ` (rows of adapters absent at a module stay zero).
//!
//! The new adapter takes the first one's settings with `r` the new rank, `lora_alpha = r` and
//! the union of the target modules.

use candle_core::{Tensor, D};

use super::{AdapterConfig, LoraConfig};
use crate::error::{PeftError, Result};
use crate::params::ParamStore;
use crate::registry::Registry;
use crate::target::TargetModules;

/// How [`add_weighted_adapter`] combines adapters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Combination {
    /// Weighted sums of the `A`s and of the `B`s (equal ranks).
    Linear,
    /// Concatenation along the rank: the exact weighted sum of the updates.
    Cat,
}

fn error(message: String) -> PeftError {
    PeftError::Config {
        key: "add_weighted_adapter".into(),
        message,
    }
}

fn union(targets: &[&TargetModules]) -> Result<TargetModules> {
    match targets.first() {
        Some(TargetModules::Names(_)) => {
            let mut names: Vec<String> = vec![];
            for t in targets {
                let TargetModules::Names(n) = t else {
                    return Err(error(
                        "the adapters mix a list and a regular expression in target_modules".into(),
                    ));
                };
                for name in n {
                    if !names.contains(name) {
                        names.push(name.clone());
                    }
                }
            }
            Ok(TargetModules::Names(names))
        }
        Some(TargetModules::Pattern(_)) => {
            let mut parts = vec![];
            for t in targets {
                let TargetModules::Pattern(p) = t else {
                    return Err(error(
                        "the adapters mix a list and a regular expression in target_modules".into(),
                    ));
                };
                parts.push(format!("({p})"));
            }
            Ok(TargetModules::Pattern(parts.join("|")))
        }
        None => Err(error("no adapters to combine".into())),
    }
}

/// Adds adapter `name`, the combination of the LoRA adapters `sources` (name, weight), to the
/// model and returns its tensors. Refused with the model unchanged when a source is missing, not
/// plain LoRA (DoRA's magnitudes do not combine), or, for `linear`, of another rank.
pub fn add_weighted_adapter(
    registry: &Registry,
    sources: &[(&str, f64)],
    name: &str,
    combination: Combination,
) -> Result<ParamStore> {
    let mut configs: Vec<LoraConfig> = vec![];
    for (source, _) in sources {
        match registry.adapter(source).map(|e| e.config) {
            Some(AdapterConfig::Lora(c)) if !c.use_dora && c.init != super::LoraInit::Pissa => {
                configs.push(c)
            }
            Some(other) => {
                return Err(error(format!(
                    "adapter `{source}` is {}{}: only plain LoRA adapters combine",
                    other.peft_type(),
                    if matches!(other, AdapterConfig::Lora(_)) {
                        " with DoRA"
                    } else {
                        ""
                    }
                )))
            }
            None => {
                return Err(error(format!(
                    "the model has no adapter `{source}` (it has: {})",
                    registry.adapter_names().join(", ")
                )))
            }
        }
    }
    let first = configs
        .first()
        .ok_or_else(|| error("no adapters to combine".into()))?;
    let ranks: Vec<usize> = configs.iter().map(|c| c.r).collect();
    let new_rank = match combination {
        Combination::Linear if ranks.iter().any(|r| *r != ranks[0]) => {
            return Err(error(format!(
                "`linear` needs adapters of one rank, got ranks {ranks:?} (use `cat`)"
            )))
        }
        Combination::Linear => ranks[0],
        Combination::Cat => ranks.iter().sum(),
    };
    let mut config = first.clone();
    config.r = new_rank;
    config.lora_alpha = new_rank as f64;
    config.target_modules = union(
        &configs
            .iter()
            .map(|c| &c.target_modules)
            .collect::<Vec<_>>(),
    )?;
    let params = registry.add_adapter(name, &AdapterConfig::Lora(config))?;
    let filled = (|| -> Result<()> {
        for linear in registry.linears() {
            let Some(target) = linear.adapter(name) else {
                continue;
            };
            let target = target.as_lora().expect("a LoRA adapter was just added");
            let pairs = sources
                .iter()
                .filter_map(|(s, w)| {
                    let a = linear.adapter(s)?;
                    let l = a.as_lora()?;
                    Some((
                        l.a.as_tensor().detach(),
                        l.b.as_tensor().detach(),
                        l.scaling,
                        *w,
                    ))
                })
                .collect();
            let (a, b) = combine(pairs, combination, new_rank)?;
            target.a.set(&a)?;
            target.b.set(&b)?;
        }
        for table in registry.embeddings() {
            let Some(target) = table.adapter(name) else {
                continue;
            };
            let pairs = sources
                .iter()
                .filter_map(|(s, w)| {
                    let l = table.adapter(s)?;
                    Some((
                        l.a.as_tensor().detach(),
                        l.b.as_tensor().detach(),
                        l.scaling,
                        *w,
                    ))
                })
                .collect();
            let (a, b) = combine(pairs, combination, new_rank)?;
            target.a.set(&a)?;
            target.b.set(&b)?;
        }
        Ok(())
    })();
    if let Err(e) = filled {
        registry.delete_adapter(name)?;
        return Err(e);
    }
    Ok(params)
}

/// The combined `(A, B)` at one layer from its sources' `(A, B, scaling, weight)`, `A` of
/// `new_rank` rows.
fn combine(
    sources: Vec<(Tensor, Tensor, f64, f64)>,
    combination: Combination,
    new_rank: usize,
) -> Result<(Tensor, Tensor)> {
    let mut parts_a = vec![];
    let mut parts_b = vec![];
    for (a, b, scaling, weight) in sources {
        let ws = weight * scaling;
        match combination {
            Combination::Linear => {
                let root = ws.abs().sqrt();
                parts_a.push((a * (root * ws.signum()))?);
                parts_b.push((b * root)?);
            }
            Combination::Cat => {
                parts_a.push((a * ws)?);
                parts_b.push(b);
            }
        }
    }
    let (a, b) = match combination {
        Combination::Linear => {
            let sum = |v: Vec<Tensor>| -> Result<Tensor> {
                let mut it = v.into_iter();
                let first = it
                    .next()
                    .ok_or_else(|| error("no adapter at a layer".into()))?;
                it.try_fold(first, |acc, t| Ok((acc + t)?))
            };
            (sum(parts_a)?, sum(parts_b)?)
        }
        Combination::Cat => (Tensor::cat(&parts_a, 0)?, Tensor::cat(&parts_b, D::Minus1)?),
    };
    let filled = a.dim(0)?;
    if filled < new_rank {
        // peft zero-fills the rows (and columns) of adapters that do not cover this module.
        let missing = new_rank - filled;
        let zeros_a = Tensor::zeros((missing, a.dim(1)?), a.dtype(), a.device())?;
        let zeros_b = Tensor::zeros((b.dim(0)?, missing), b.dtype(), b.device())?;
        let (a, b) = (
            Tensor::cat(&[a, zeros_a], 0)?,
            Tensor::cat(&[b, zeros_b], 1)?,
        );
        return Ok((a, b));
    }
    Ok((a, b))
}
