//! Inverted dropout with a seeded, shareable random stream, so that runs are reproducible.

use std::sync::{Arc, Mutex};

use candle_core::Tensor;
use rand::{Rng, SeedableRng};

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

    /// Applies dropout when `train` is true and `p > 0`.
    pub fn forward(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        if !train || self.p <= 0.0 {
            return Ok(x.clone());
        }
        let keep = 1.0 - self.p;
        let scale = 1.0 / keep;
        let n = x.elem_count();
        let mask: Vec<f32> = {
            let mut rng = self.rng.0.lock().unwrap_or_else(|e| e.into_inner());
            (0..n)
                .map(|_| if rng.gen::<f32>() < keep { scale } else { 0.0 })
                .collect()
        };
        let mask = Tensor::from_vec(mask, x.shape(), x.device())?.to_dtype(x.dtype())?;
        x.mul(&mask)
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
        let again = Dropout::new(0.1, DropoutRng::new(7)).forward(&x, true)?;
        assert_eq!(
            (y - again)?.abs()?.sum_all()?.to_scalar::<f32>()?,
            0.0,
            "seeded"
        );
        Ok(())
    }
}
