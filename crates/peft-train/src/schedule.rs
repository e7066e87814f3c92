//! Learning-rate schedules, with the exact formulas of Hugging Face transformers.
//!
//! A schedule is step-indexed like PyTorch's `LambdaLR`: the learning rate for optimizer step
//! `k` (counting from 0) is `base_lr * factor(k)`. The trainer sets it before each step.

use serde::{Deserialize, Serialize};

use crate::error::{Result, TrainError};

/// The schedule as written in a recipe, e.g. `{ type = "linear", warmup_ratio = 0.1 }`.
///
/// Warmup may be given as `warmup_steps` or `warmup_ratio` (a fraction of the total steps,
/// rounded up like `TrainingArguments.get_warmup_steps`), not both.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum ScheduleConfig {
    /// The base learning rate throughout (`get_constant_schedule`).
    Constant {},
    /// Linear warmup, then constant (`get_constant_schedule_with_warmup`).
    ConstantWithWarmup {
        /// Warmup length in optimizer steps.
        warmup_steps: Option<usize>,
        /// Warmup length as a fraction of the total steps.
        warmup_ratio: Option<f64>,
    },
    /// Linear warmup, then linear decay to 0 (`get_linear_schedule_with_warmup`).
    Linear {
        /// Warmup length in optimizer steps.
        warmup_steps: Option<usize>,
        /// Warmup length as a fraction of the total steps.
        warmup_ratio: Option<f64>,
    },
    /// Linear warmup, then cosine decay (`get_cosine_schedule_with_warmup`).
    Cosine {
        /// Warmup length in optimizer steps.
        warmup_steps: Option<usize>,
        /// Warmup length as a fraction of the total steps.
        warmup_ratio: Option<f64>,
        /// Number of cosine waves; the default 0.5 decays from the peak to 0 once.
        #[serde(default = "half_cycle")]
        num_cycles: f64,
    },
    /// PyTorch's `OneCycleLR` (two phases, cosine annealing): from `lr/div_factor` up to `lr`
    /// over the first `pct_start` of the steps, then down to `lr/(div_factor·final_div_factor)`;
    /// with `cycle_momentum`, Adam's β₁ goes the other way between `max_momentum` and
    /// `base_momentum` (PyTorch's defaults: 0.3, 25, 1e4, 0.85, 0.95).
    OneCycle {
        /// Fraction of the steps spent increasing the rate.
        #[serde(default = "pct_start")]
        pct_start: f64,
        /// Initial rate = lr / div_factor.
        #[serde(default = "div_factor")]
        div_factor: f64,
        /// Final rate = initial rate / final_div_factor.
        #[serde(default = "final_div_factor")]
        final_div_factor: f64,
        /// Cycle β₁ inversely to the rate.
        #[serde(default = "yes")]
        cycle_momentum: bool,
        /// β₁ at the peak rate.
        #[serde(default = "base_momentum")]
        base_momentum: f64,
        /// β₁ at the start and the end.
        #[serde(default = "max_momentum")]
        max_momentum: f64,
    },
}

fn pct_start() -> f64 {
    0.3
}
fn div_factor() -> f64 {
    25.0
}
fn final_div_factor() -> f64 {
    1e4
}
fn yes() -> bool {
    true
}
fn base_momentum() -> f64 {
    0.85
}
fn max_momentum() -> f64 {
    0.95
}

fn half_cycle() -> f64 {
    0.5
}

impl Default for ScheduleConfig {
    /// Linear decay without warmup, the Hugging Face `Trainer` default.
    fn default() -> Self {
        Self::Linear {
            warmup_steps: None,
            warmup_ratio: None,
        }
    }
}

/// The shape of a resolved schedule.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum ScheduleKind {
    /// Factor 1 throughout.
    Constant,
    /// Warmup, then factor 1.
    ConstantWithWarmup,
    /// Warmup, then linear decay to 0 at the last step.
    Linear,
    /// Warmup, then cosine decay with the given number of cycles.
    Cosine {
        /// Number of cosine waves.
        num_cycles: f64,
    },
    /// PyTorch's one-cycle policy.
    OneCycle {
        /// Fraction of the steps spent increasing the rate.
        pct_start: f64,
        /// Initial rate = lr / div_factor.
        div_factor: f64,
        /// Final rate = initial rate / final_div_factor.
        final_div_factor: f64,
        /// β₁ at the peak and at the ends, when cycled.
        momentum: Option<(f64, f64)>,
    },
}

/// PyTorch's cosine annealing from `start` to `end` at fraction `pct`.
fn anneal_cos(start: f64, end: f64, pct: f64) -> f64 {
    end + (start - end) / 2.0 * ((std::f64::consts::PI * pct).cos() + 1.0)
}

/// A schedule resolved against the base learning rate and the total number of optimizer steps.
#[derive(Clone, Debug, PartialEq)]
pub struct LrSchedule {
    kind: ScheduleKind,
    base_lr: f64,
    warmup_steps: usize,
    total_steps: usize,
}

impl ScheduleConfig {
    /// Resolves the warmup and builds the schedule for `total_steps` optimizer steps.
    pub fn build(&self, base_lr: f64, total_steps: usize) -> Result<LrSchedule> {
        if !base_lr.is_finite() || base_lr < 0.0 {
            return Err(TrainError::config(
                "learning_rate",
                format!("expected a finite value >= 0, found {base_lr}"),
            ));
        }
        let (kind, warmup) = match *self {
            Self::Constant {} => (ScheduleKind::Constant, 0),
            Self::ConstantWithWarmup {
                warmup_steps,
                warmup_ratio,
            } => (
                ScheduleKind::ConstantWithWarmup,
                resolve_warmup(warmup_steps, warmup_ratio, total_steps)?,
            ),
            Self::Linear {
                warmup_steps,
                warmup_ratio,
            } => (
                ScheduleKind::Linear,
                resolve_warmup(warmup_steps, warmup_ratio, total_steps)?,
            ),
            Self::Cosine {
                warmup_steps,
                warmup_ratio,
                num_cycles,
            } => {
                if !num_cycles.is_finite() || num_cycles < 0.0 {
                    return Err(TrainError::config(
                        "schedule.num_cycles",
                        format!("expected a finite value >= 0, found {num_cycles}"),
                    ));
                }
                (
                    ScheduleKind::Cosine { num_cycles },
                    resolve_warmup(warmup_steps, warmup_ratio, total_steps)?,
                )
            }
            Self::OneCycle {
                pct_start,
                div_factor,
                final_div_factor,
                cycle_momentum,
                base_momentum,
                max_momentum,
            } => {
                if !(pct_start > 0.0 && pct_start < 1.0) {
                    return Err(TrainError::config(
                        "schedule.pct_start",
                        format!("expected a value in (0, 1), found {pct_start}"),
                    ));
                }
                if !(div_factor > 0.0 && final_div_factor > 0.0) {
                    return Err(TrainError::config(
                        "schedule.div_factor",
                        "div_factor and final_div_factor must be positive",
                    ));
                }
                let momentum = cycle_momentum.then_some((base_momentum, max_momentum));
                (
                    ScheduleKind::OneCycle {
                        pct_start,
                        div_factor,
                        final_div_factor,
                        momentum,
                    },
                    0,
                )
            }
        };
        Ok(LrSchedule {
            kind,
            base_lr,
            warmup_steps: warmup,
            total_steps,
        })
    }
}

/// Warmup steps from steps or ratio: `ceil(total * ratio)` as in Hugging Face.
fn resolve_warmup(steps: Option<usize>, ratio: Option<f64>, total: usize) -> Result<usize> {
    match (steps, ratio) {
        (Some(_), Some(_)) => Err(TrainError::config(
            "schedule.warmup_steps",
            "give either warmup_steps or warmup_ratio, not both",
        )),
        (Some(s), None) => Ok(s),
        (None, Some(r)) if !(0.0..=1.0).contains(&r) => Err(TrainError::config(
            "schedule.warmup_ratio",
            format!("expected a value in [0, 1], found {r}"),
        )),
        (None, Some(r)) => Ok((total as f64 * r).ceil() as usize),
        (None, None) => Ok(0),
    }
}

impl LrSchedule {
    /// The multiplier of the base learning rate at optimizer step `step` (0-based).
    pub fn factor(&self, step: usize) -> f64 {
        let (s, w, t) = (
            step as f64,
            self.warmup_steps as f64,
            self.total_steps as f64,
        );
        if self.kind != ScheduleKind::Constant && step < self.warmup_steps {
            return s / w.max(1.0);
        }
        match self.kind {
            ScheduleKind::OneCycle {
                div_factor,
                final_div_factor,
                ..
            } => {
                let initial = 1.0 / div_factor;
                let (phase, pct) = self.one_cycle_phase(step);
                if phase == 0 {
                    anneal_cos(initial, 1.0, pct)
                } else {
                    anneal_cos(1.0, initial / final_div_factor, pct)
                }
            }
            ScheduleKind::Constant | ScheduleKind::ConstantWithWarmup => 1.0,
            ScheduleKind::Linear => ((t - s) / (t - w).max(1.0)).max(0.0),
            ScheduleKind::Cosine { num_cycles } => {
                let progress = (s - w) / (t - w).max(1.0);
                let cos = (std::f64::consts::PI * num_cycles * 2.0 * progress).cos();
                (0.5 * (1.0 + cos)).max(0.0)
            }
        }
    }

    /// Which one-cycle phase `step` is in (0 rising, 1 falling) and how far, as PyTorch computes
    /// it (phase ends at step `pct_start·total − 1` and `total − 1`).
    fn one_cycle_phase(&self, step: usize) -> (usize, f64) {
        let ScheduleKind::OneCycle { pct_start, .. } = self.kind else {
            return (1, 0.0);
        };
        let s = step as f64;
        let up_end = pct_start * self.total_steps as f64 - 1.0;
        let down_end = self.total_steps as f64 - 1.0;
        if s <= up_end {
            (0, if up_end > 0.0 { s / up_end } else { 1.0 })
        } else {
            (1, ((s - up_end) / (down_end - up_end).max(1e-12)).min(1.0))
        }
    }

    /// Adam's β₁ at `step` when the schedule cycles it (one-cycle), else `None`.
    pub fn beta1_at(&self, step: usize) -> Option<f64> {
        let ScheduleKind::OneCycle { momentum, .. } = self.kind else {
            return None;
        };
        let (base, max) = momentum?;
        let (phase, pct) = self.one_cycle_phase(step);
        Some(if phase == 0 {
            anneal_cos(max, base, pct)
        } else {
            anneal_cos(base, max, pct)
        })
    }

    /// The learning rate at optimizer step `step` (0-based): `base_lr * factor(step)`.
    pub fn lr_at(&self, step: usize) -> f64 {
        self.base_lr * self.factor(step)
    }

    /// The base (peak) learning rate.
    pub fn base_lr(&self) -> f64 {
        self.base_lr
    }

    /// The resolved number of warmup steps.
    pub fn warmup_steps(&self) -> usize {
        self.warmup_steps
    }

    /// The total number of optimizer steps the schedule was built for.
    pub fn total_steps(&self) -> usize {
        self.total_steps
    }

    /// The shape of the schedule.
    pub fn kind(&self) -> ScheduleKind {
        self.kind
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> std::result::Result<ScheduleConfig, serde_json::Error> {
        serde_json::from_str(json)
    }

    /// Values printed by torch 2.15's `OneCycleLR(opt, max_lr=1e-3, total_steps=10)` with Adam
    /// (defaults: pct_start 0.3, div 25, final div 1e4, betas cycled 0.95 → 0.85 → 0.95).
    #[test]
    fn one_cycle_matches_pytorch() {
        let s = parse(r#"{"type": "one_cycle"}"#)
            .unwrap()
            .build(1e-3, 10)
            .unwrap();
        let want_lr = [
            4e-05,
            0.00052,
            0.001,
            0.000950484632013,
            0.00081174565395,
            0.000611262021936,
            0.000388741978064,
            0.00018825834605,
            4.95193679865e-05,
            4e-09,
        ];
        let want_beta = [
            0.95,
            0.9,
            0.85,
            0.854951557,
            0.86882551,
            0.888873953,
            0.911126047,
            0.93117449,
            0.945048443,
            0.95,
        ];
        for (k, (lr, b)) in want_lr.iter().zip(want_beta).enumerate() {
            assert!(
                (s.lr_at(k) - lr).abs() < 1e-14 + 1e-10 * lr,
                "lr at {k}: {} vs {lr}",
                s.lr_at(k)
            );
            assert!((s.beta1_at(k).unwrap() - b).abs() < 1e-8, "beta1 at {k}");
        }
    }

    #[test]
    fn constant_is_flat() {
        let s = ScheduleConfig::Constant {}.build(2e-4, 10).unwrap();
        for k in [0, 1, 9, 10, 100] {
            assert_eq!(s.lr_at(k), 2e-4);
        }
    }

    #[test]
    fn linear_matches_hf_at_boundaries() {
        // HF: step < w: step / max(1, w); else max(0, (T - step) / max(1, T - w)).
        let cfg = parse(r#"{"type":"linear","warmup_steps":4}"#).unwrap();
        let s = cfg.build(1.0, 20).unwrap();
        assert_eq!(s.factor(0), 0.0);
        assert_eq!(s.factor(1), 0.25);
        assert_eq!(s.factor(3), 0.75);
        assert_eq!(s.factor(4), 1.0);
        assert_eq!(s.factor(5), 15.0 / 16.0);
        assert_eq!(s.factor(12), 0.5);
        assert_eq!(s.factor(19), 1.0 / 16.0);
        assert_eq!(s.factor(20), 0.0);
        assert_eq!(s.factor(25), 0.0);
        let s = ScheduleConfig::default().build(3e-4, 10).unwrap();
        assert_eq!(s.lr_at(0), 3e-4);
        assert_eq!(s.lr_at(5), 3e-4 * 0.5);
    }

    #[test]
    fn cosine_matches_hf_at_boundaries() {
        let cfg = parse(r#"{"type":"cosine","warmup_steps":2}"#).unwrap();
        let s = cfg.build(1.0, 10).unwrap();
        assert_eq!(s.factor(0), 0.0);
        assert_eq!(s.factor(1), 0.5);
        assert_eq!(s.factor(2), 1.0);
        // Halfway through the decay: progress 0.5, cos(pi/2) = 6.1e-17.
        let half = 0.5 * (1.0 + (std::f64::consts::PI * 0.5).cos());
        assert_eq!(s.factor(6), half);
        assert!((s.factor(6) - 0.5).abs() < 1e-15);
        // progress 0.25: 0.5 * (1 + cos(pi/4)).
        let q = 0.5 * (1.0 + (std::f64::consts::PI * 0.25).cos());
        assert_eq!(s.factor(4), q);
        assert!(s.factor(10).abs() < 1e-15);
        // Past the last step HF does not clamp progress: the cosine rises again.
        let past = 0.5 * (1.0 + (std::f64::consts::PI * 1.25).cos());
        assert_eq!(s.factor(12), past);
    }

    #[test]
    fn constant_with_warmup() {
        let cfg = parse(r#"{"type":"constant_with_warmup","warmup_steps":3}"#).unwrap();
        let s = cfg.build(1.0, 10).unwrap();
        assert_eq!(s.factor(0), 0.0);
        assert_eq!(s.factor(2), 2.0 / 3.0);
        assert_eq!(s.factor(3), 1.0);
        assert_eq!(s.factor(1000), 1.0);
    }

    #[test]
    fn warmup_ratio_rounds_up() {
        let cfg = parse(r#"{"type":"linear","warmup_ratio":0.1}"#).unwrap();
        assert_eq!(cfg.build(1.0, 95).unwrap().warmup_steps(), 10);
        assert_eq!(cfg.build(1.0, 100).unwrap().warmup_steps(), 10);
        assert_eq!(cfg.build(1.0, 0).unwrap().warmup_steps(), 0);
    }

    #[test]
    fn zero_total_steps_does_not_divide_by_zero() {
        let s = ScheduleConfig::default().build(1.0, 0).unwrap();
        assert_eq!(s.factor(0), 0.0);
        let s = parse(r#"{"type":"cosine"}"#)
            .unwrap()
            .build(1.0, 0)
            .unwrap();
        assert_eq!(s.factor(0), 1.0);
    }

    #[test]
    fn config_rejects_bad_input() {
        assert!(parse(r#"{"type":"linear","warmup":3}"#).is_err());
        assert!(parse(r#"{"type":"constant","warmup_steps":3}"#).is_err());
        assert!(parse(r#"{"type":"step"}"#).is_err());
        let both = parse(r#"{"type":"linear","warmup_steps":3,"warmup_ratio":0.1}"#).unwrap();
        let err = both.build(1.0, 10).unwrap_err().to_string();
        assert!(err.contains("warmup"), "{err}");
        let bad = parse(r#"{"type":"cosine","warmup_ratio":1.5}"#).unwrap();
        assert!(bad.build(1.0, 10).is_err());
        assert!(ScheduleConfig::Constant {}.build(f64::NAN, 10).is_err());
        let cfg = parse(r#"{"type":"cosine","num_cycles":1.0}"#).unwrap();
        assert_eq!(
            cfg.build(1.0, 4).unwrap().kind(),
            ScheduleKind::Cosine { num_cycles: 1.0 }
        );
    }
}
