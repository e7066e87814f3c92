//! Tasks: what to batch, what loss to minimise and how to score, for the one trainer loop.

pub mod token_classification;
