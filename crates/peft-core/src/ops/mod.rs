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

/// The f32 values of a contiguous CPU tensor, or an error naming `op`.
fn contiguous_f32<'a>(
    s: &'a candle_core::CpuStorage,
    l: &candle_core::Layout,
    op: &str,
) -> candle_core::Result<&'a [f32]> {
    let candle_core::CpuStorage::F32(v) = s else {
        candle_core::bail!("{op}: only f32 is supported on the CPU path")
    };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&v[a..b]),
        None => candle_core::bail!("{op}: input must be contiguous"),
    }
}
