//! Helpers for tests that compare tensors (as `candle_core::test_utils`): shared by the crates'
//! test suites so that every parity check measures its difference the same way.

use candle_core::{DType, Tensor};

/// The largest absolute elementwise difference between `a` and `b`, in f32.
///
/// # Panics
/// When the shapes differ or a tensor cannot be read: this is for tests.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    let diff = || -> candle_core::Result<f32> {
        let d = (a.to_dtype(DType::F32)? - b.to_dtype(DType::F32)?)?;
        d.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()
    };
    diff().expect("comparing tensors")
}
