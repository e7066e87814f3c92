//! Custom ops whose backward computes no gradient for frozen operands, with CPU fast paths.

mod dropout;
mod frozen_linear;
mod gelu;
mod layer_norm;
mod softmax;

pub use dropout::{Dropout, DropoutRng};
pub use frozen_linear::frozen_linear;
pub use gelu::gelu;
pub use layer_norm::layer_norm;
pub use softmax::masked_softmax;
