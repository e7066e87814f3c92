//! Tasks: what to batch, what loss to minimise and how to score, for the one trainer loop.

pub mod image_classification;
pub mod token_classification;
