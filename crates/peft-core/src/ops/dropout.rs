//! Inverted dropout with a seeded, shareable random stream, so that runs are reproducible.
//!
//! Each call draws one 64-bit seed from the stream and derives the keep-mask from it with a
//! counter-based generator (splitmix64 of seed and element index), so a mask is a pure function
//! of (seed, element index) and the CPU and the CUDA kernel (`dropout_apply` in
//! kernels/peft_ops.cu) draw exactly the same one.

use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Shape, Tensor};
use rand::{Rng, SeedableRng};
use rayon::prelude::*;

use super::vmath::simd_kernel;

/// A seeded random stream shared by every dropout layer of a model.
#[derive(Clone, Debug)]
pub struct DropoutRng(Arc<Mutex<rand::rngs::StdRng>>);

impl DropoutRng {
    /// A stream seeded with `seed`.
    pub fn new(seed: u64) -> Self {
        Self(Arc::new(Mutex::new(rand::rngs::StdRng::seed_from_u64(
            seed,
        ))))
    }

    /// Reseeds the stream (e.g. at the start of each epoch, for exact resume).
    pub fn reseed(&self, seed: u64) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = rand::rngs::StdRng::seed_from_u64(seed);
    }

    fn next_seed(&self) -> u64 {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).gen()
    }
}

/// Elements per parallel CPU task.
const CHUNK: usize = 1 << 14;

#[inline(always)]
fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The scaled keep-mask for element `i`: `1/keep` with probability `keep`, else 0.
#[inline(always)]
fn mask_value(seed: u64, i: u64, keep: f32) -> f32 {
    let u = (splitmix64(seed ^ i.wrapping_mul(0xd134_2543_de82_ef95)) >> 40) as f32
        * (1.0 / 16_777_216.0);
    if u < keep {
        1.0 / keep
    } else {
        0.0
    }
}

simd_kernel! {
    /// `y = x ⊙ mask(seed)` for elements `first..first + x.len()` of a tensor.
    pub(super) fn dropout_block(y: &mut [f32], x: &[f32], seed: u64, first: u64, keep: f32) {
        for (i, (y, &x)) in y.iter_mut().zip(x).enumerate() {
            *y = x * mask_value(seed, first + i as u64, keep);
        }
    }
}

/// The dropout mask for `seed` with `shape`, computed where `device` is: the dropout op applied to
/// ones, so that a mask and the op that applies one never disagree.
pub fn dropout_mask(
    seed: u64,
    keep: f32,
    shape: &Shape,
    dtype: DType,
    device: &Device,
) -> candle_core::Result<Tensor> {
    let op = DropoutOp { seed, keep };
    if super::fused_for(dtype, device) {
        return Tensor::ones(shape, dtype, device)?.apply_op1_no_bwd(&op);
    }
    Tensor::ones(shape, DType::F32, &Device::Cpu)?
        .apply_op1_no_bwd(&op)?
        .to_dtype(dtype)?
        .to_device(device)
}

/// A dropout layer: identity at evaluation, `x · mask / (1 − p)` in training.
#[derive(Clone, Debug)]
pub struct Dropout {
    p: f32,
    rng: DropoutRng,
}

impl Dropout {
    /// Dropout with probability `p` drawing from `rng`.
    pub fn new(p: f32, rng: DropoutRng) -> Self {
        Self { p, rng }
    }

    /// The drop probability.
    pub fn p(&self) -> f32 {
        self.p
    }

    /// The next scaled keep-mask for a tensor like `x`, or `None` when dropout is off (`!train`
    /// or `p = 0`).
    pub fn mask_for(&self, x: &Tensor, train: bool) -> candle_core::Result<Option<Tensor>> {
        self.next_seed(train)
            .map(|(seed, keep)| dropout_mask(seed, keep, x.shape(), x.dtype(), x.device()))
            .transpose()
    }

    /// The `(seed, keep probability)` of the next mask, or `None` when dropout is off (`!train`
    /// or `p = 0`). For ops that apply dropout inside themselves (attention).
    pub fn next_seed(&self, train: bool) -> Option<(u64, f32)> {
        (train && self.p > 0.0).then(|| (self.rng.next_seed(), 1.0 - self.p))
    }

    /// Applies dropout when `train` is true and `p > 0`. Where the fused kernels exist (f32 CPU,
    /// f32/bf16 CUDA) this is one op whose backward re-derives the mask from its seed: no mask
    /// tensor is stored and no gradient is computed for one.
    pub fn forward(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        match self.next_seed(train) {
            Some((seed, keep)) => apply_seeded_dropout(x, seed, keep),
            None => Ok(x.clone()),
        }
    }
}

/// `x ⊙ mask(seed)`: the dropout of [`Dropout::forward`] for a given seed.
pub fn apply_seeded_dropout(x: &Tensor, seed: u64, keep: f32) -> candle_core::Result<Tensor> {
    if super::fused_kernels(x) {
        return x.contiguous()?.apply_op1(DropoutOp { seed, keep });
    }
    x.mul(&dropout_mask(seed, keep, x.shape(), x.dtype(), x.device())?)
}

/// `x ⊙ mask(seed)`; its backward is the same op on the gradient.
#[derive(Clone, Copy)]
struct DropoutOp {
    seed: u64,
    keep: f32,
}

impl candle_core::CustomOp1 for DropoutOp {
    fn name(&self) -> &'static str {
        "dropout"
    }

    fn cpu_fwd(
        &self,
        s: &candle_core::CpuStorage,
        l: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, Shape)> {
        let x = super::contiguous_f32(s, l, self.name())?;
        // SAFETY: the chunks of y pair with equal chunks of x; dropout_block writes every element.
        let y = unsafe {
            super::written_f32(x.len(), |y| {
                y.par_chunks_mut(CHUNK)
                    .zip(x.par_chunks(CHUNK))
                    .enumerate()
                    .for_each(|(c, (y, x))| {
                        dropout_block(y, x, self.seed, (c * CHUNK) as u64, self.keep)
                    })
            })
        };
        Ok((candle_core::CpuStorage::F32(y), l.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        crate::ops::cuda_ops::dropout_apply(s, l, self.seed, self.keep)
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(grad.contiguous()?.apply_op1_no_bwd(self)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn identity_at_eval_and_unbiased_in_training() -> candle_core::Result<()> {
        let x = Tensor::ones((200, 100), candle_core::DType::F32, &Device::Cpu)?;
        let d = Dropout::new(0.1, DropoutRng::new(7));
        assert_eq!(
            d.forward(&x, false)?.sum_all()?.to_scalar::<f32>()?,
            20_000.0
        );
        let y = d.forward(&x, true)?;
        let mean = y.mean_all()?.to_scalar::<f32>()?;
        assert!((mean - 1.0).abs() < 0.02, "mean {mean}");
        let zeros = y
            .eq(0f32)?
            .to_dtype(candle_core::DType::F32)?
            .mean_all()?
            .to_scalar::<f32>()?;
        assert!((zeros - 0.1).abs() < 0.01, "dropped fraction {zeros}");
        // The fused op and the mask tensor agree (same seed stream, same mask function).
        let mask = Dropout::new(0.1, DropoutRng::new(7))
            .mask_for(&x, true)?
            .expect("train");
        assert_eq!((&y - &mask)?.abs()?.sum_all()?.to_scalar::<f32>()?, 0.0);
        let xv = candle_core::Var::randn(0f32, 1., (7, 11), &Device::Cpu)?;
        let d = Dropout::new(0.3, DropoutRng::new(3));
        let out = d.forward(xv.as_tensor(), true)?;
        let grads = out.sum_all()?.backward()?;
        let dx = grads.get(xv.as_tensor()).expect("dx");
        let m = Dropout::new(0.3, DropoutRng::new(3))
            .mask_for(xv.as_tensor(), true)?
            .expect("train");
        assert_eq!(
            (dx - &m)?.abs()?.sum_all()?.to_scalar::<f32>()?,
            0.0,
            "backward is the mask"
        );
        let again = Dropout::new(0.1, DropoutRng::new(7)).forward(&x, true)?;
        assert_eq!(
            (y - again)?.abs()?.sum_all()?.to_scalar::<f32>()?,
            0.0,
            "seeded"
        );
        Ok(())
    }

    /// The parallel, vectorised op draws exactly the per-element formula (the CUDA kernel's too),
    /// across chunk boundaries.
    #[test]
    fn op_is_the_per_element_formula_across_chunks() -> candle_core::Result<()> {
        let n = 2 * CHUNK + 1234;
        let values: Vec<f32> = (0..n).map(|i| (i % 97) as f32 - 48.0).collect();
        let x = Tensor::from_vec(values.clone(), n, &Device::Cpu)?;
        let (seed, keep) = (0x1234_5678_9abc_def0, 0.9);
        let y = apply_seeded_dropout(&x, seed, keep)?.to_vec1::<f32>()?;
        for (i, (&y, &x)) in y.iter().zip(&values).enumerate() {
            assert_eq!(y, x * mask_value(seed, i as u64, keep), "element {i}");
        }
        Ok(())
    }
}
