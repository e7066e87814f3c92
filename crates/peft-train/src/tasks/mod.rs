//! Tasks: what to batch, what loss to minimise and how to score, for the one trainer loop.

pub mod image_classification;
pub mod token_classification;

/// A candle result with the context a task failed in.
fn candle<T>(what: &str, r: candle_core::Result<T>) -> crate::error::Result<T> {
    r.map_err(|e| crate::error::TrainError::candle(what, e))
}
