//! Tracking the best evaluation metric, for best-checkpoint saving and early stopping.
//!
//! Follows Hugging Face's `EarlyStoppingCallback`: a value improves when it is better than the
//! best so far by more than `min_delta`; after `patience` evaluations in a row without
//! improvement, training should stop.

use serde::{Deserialize, Serialize};

/// Whether larger or smaller metric values are better.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Larger is better (F1, accuracy).
    Max,
    /// Smaller is better (loss).
    Min,
}

/// The outcome of one evaluation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// The value is the new best: save the best checkpoint.
    Improved,
    /// No improvement, but patience is not yet exhausted.
    NoImprovement,
    /// No improvement for `patience` evaluations in a row: stop training.
    Stop,
}

/// The best value seen so far and the count of evaluations since it.
///
/// Serializable, so that a resumed run keeps its early-stopping state.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BestTracker {
    mode: Mode,
    patience: Option<usize>,
    min_delta: f64,
    best: Option<f64>,
    best_index: Option<usize>,
    evaluations: usize,
    bad_evaluations: usize,
}

impl BestTracker {
    /// A tracker that stops after `patience` evaluations without improvement
    /// (`None`: never stop, only track the best).
    pub fn new(mode: Mode, patience: Option<usize>) -> Self {
        Self {
            mode,
            patience,
            min_delta: 0.0,
            best: None,
            best_index: None,
            evaluations: 0,
            bad_evaluations: 0,
        }
    }

    /// Requires an improvement to exceed `min_delta` (Hugging Face's
    /// `early_stopping_threshold`). Negative or non-finite values count as 0.
    pub fn with_min_delta(mut self, min_delta: f64) -> Self {
        self.min_delta = if min_delta.is_finite() {
            min_delta.max(0.0)
        } else {
            0.0
        };
        self
    }

    /// Records one evaluation result. A NaN never improves.
    pub fn update(&mut self, value: f64) -> Verdict {
        let index = self.evaluations;
        self.evaluations += 1;
        if self.is_improvement(value) {
            self.best = Some(value);
            self.best_index = Some(index);
            self.bad_evaluations = 0;
            return Verdict::Improved;
        }
        self.bad_evaluations += 1;
        match self.patience {
            Some(p) if self.bad_evaluations >= p => Verdict::Stop,
            _ => Verdict::NoImprovement,
        }
    }

    /// Whether `value` would improve on the best so far.
    pub fn is_improvement(&self, value: f64) -> bool {
        if value.is_nan() {
            return false;
        }
        match self.best {
            None => true,
            Some(best) => match self.mode {
                Mode::Max => value > best && value - best > self.min_delta,
                Mode::Min => value < best && best - value > self.min_delta,
            },
        }
    }

    /// The best value so far.
    pub fn best(&self) -> Option<f64> {
        self.best
    }

    /// The 0-based index of the evaluation that gave the best value.
    pub fn best_index(&self) -> Option<usize> {
        self.best_index
    }

    /// Evaluations in a row without improvement.
    pub fn bad_evaluations(&self) -> usize {
        self.bad_evaluations
    }

    /// The comparison direction.
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// The configured patience.
    pub fn patience(&self) -> Option<usize> {
        self.patience
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn max_mode_with_patience() {
        let mut t = BestTracker::new(Mode::Max, Some(2));
        assert_eq!(t.update(0.5), Verdict::Improved);
        assert_eq!(t.update(0.7), Verdict::Improved);
        assert_eq!(t.update(0.7), Verdict::NoImprovement);
        assert_eq!(t.update(0.9), Verdict::Improved);
        assert_eq!(t.update(0.8), Verdict::NoImprovement);
        assert_eq!(t.update(0.1), Verdict::Stop);
        assert_eq!(t.best(), Some(0.9));
        assert_eq!(t.best_index(), Some(3));
        assert_eq!(t.bad_evaluations(), 2);
    }

    #[test]
    fn min_mode_and_min_delta() {
        let mut t = BestTracker::new(Mode::Min, Some(1)).with_min_delta(0.1);
        assert_eq!(t.update(1.0), Verdict::Improved);
        assert_eq!(t.update(0.95), Verdict::Stop);
        assert_eq!(t.update(0.8), Verdict::Improved);
        assert_eq!(t.best(), Some(0.8));
    }

    #[test]
    fn nan_never_improves_and_no_patience_never_stops() {
        let mut t = BestTracker::new(Mode::Max, None);
        assert_eq!(t.update(f64::NAN), Verdict::NoImprovement);
        assert_eq!(t.best(), None);
        for _ in 0..10 {
            assert_eq!(t.update(f64::NAN), Verdict::NoImprovement);
        }
        assert_eq!(t.update(0.0), Verdict::Improved);
        let mut t = BestTracker::new(Mode::Min, Some(0));
        assert_eq!(t.update(1.0), Verdict::Improved);
        assert_eq!(t.update(1.0), Verdict::Stop);
    }

    #[test]
    fn state_round_trips_through_json() {
        let mut t = BestTracker::new(Mode::Max, Some(3));
        t.update(0.4);
        t.update(0.3);
        let json = serde_json::to_string(&t).unwrap();
        let back: BestTracker = serde_json::from_str(&json).unwrap();
        assert_eq!(back, t);
    }
}
