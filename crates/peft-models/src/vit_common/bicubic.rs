//! torch's bicubic resizing (`F.interpolate(mode="bicubic", align_corners=False,
//! antialias=False)`), by output size or scale factor, as two small matrices.

use candle_core::Tensor;
use peft_core::Result;

use super::config_error;

/// How [`interpolate_bicubic`] sizes its output, as `F.interpolate` takes it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Resize {
    /// `size=(height, width)`: the source step is `in / out`.
    Size(usize, usize),
    /// `scale_factor=(sh, sw)` (`recompute_scale_factor` unset): the output is
    /// `floor(in · s)` and the source step `1 / s`.
    Scale(f64, f64),
}

/// torch's `F.interpolate(x, mode="bicubic", align_corners=False, antialias=False)` for `x` of
/// shape `(..., height, width)`: Keys' cubic convolution with `A = −0.75`, source coordinate
/// `(dst + 0.5)·step − 0.5`, out-of-range taps clamped to the border (as torch's CPU kernel,
/// with its `float` arithmetic). Separable: `Wh · x · Wwᵀ`, so gradients reach `x`.
pub fn interpolate_bicubic(x: &Tensor, resize: Resize) -> Result<Tensor> {
    let dims = x.dims();
    if dims.len() < 2 {
        return Err(config_error(
            "interpolate",
            format!("expected (..., h, w), got {dims:?}"),
        ));
    }
    let (ih, iw) = (dims[dims.len() - 2], dims[dims.len() - 1]);
    let ((oh, sh), (ow, sw)) = match resize {
        Resize::Size(h, w) => ((h, None), (w, None)),
        Resize::Scale(a, b) => (
            ((ih as f64 * a).floor() as usize, Some(a)),
            ((iw as f64 * b).floor() as usize, Some(b)),
        ),
    };
    if oh == 0 || ow == 0 || ih == 0 || iw == 0 {
        return Err(config_error(
            "interpolate",
            format!("cannot resize {ih}×{iw} to {oh}×{ow}"),
        ));
    }
    let dev = x.device();
    let wh = Tensor::from_vec(cubic_matrix(ih, oh, sh), (oh, ih), dev)?.to_dtype(x.dtype())?;
    let ww = Tensor::from_vec(cubic_matrix(iw, ow, sw), (ow, iw), dev)?.to_dtype(x.dtype())?;
    Ok(wh
        .broadcast_matmul(&x.contiguous()?)?
        .broadcast_matmul(&ww.t()?.contiguous()?)?)
}

/// The `out × in` matrix of 1-D bicubic resizing, as torch's `HelperInterpCubic` computes its
/// indices and weights (in `float`): taps `i0 − 1 … i0 + 2` clamped to `[0, in − 1]`.
fn cubic_matrix(input: usize, output: usize, scale_factor: Option<f64>) -> Vec<f32> {
    const A: f32 = -0.75;
    let conv1 = |x: f32| ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0;
    let conv2 = |x: f32| ((A * x - 5.0 * A) * x + 8.0 * A) * x - 4.0 * A;
    let step = match scale_factor {
        Some(s) if s > 0.0 => (1.0 / s) as f32,
        _ => input as f32 / output as f32,
    };
    let mut m = vec![0f32; output * input];
    for dst in 0..output {
        let real = step * (dst as f32 + 0.5) - 0.5;
        let i0 = (real.floor() as i64).min(input as i64 - 1);
        let t = (real - i0 as f32).clamp(0.0, 1.0);
        let weights = [conv2(t + 1.0), conv1(t), conv1(1.0 - t), conv2(2.0 - t)];
        for (j, wt) in weights.into_iter().enumerate() {
            let src = (i0 - 1 + j as i64).clamp(0, input as i64 - 1) as usize;
            m[dst * input + src] += wt;
        }
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    #[test]
    fn same_size_is_identity_and_constants_stay() -> Result<()> {
        let x = Tensor::arange(0f32, 20., &Device::Cpu)?.reshape((1, 1, 4, 5))?;
        let y = interpolate_bicubic(&x, Resize::Size(4, 5))?;
        let d = (y - &x)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(d < 1e-6, "{d}");
        let ones = Tensor::ones((2, 3, 3), DType::F32, &Device::Cpu)?;
        for r in [Resize::Size(7, 2), Resize::Scale(1.5, 0.5)] {
            let y = interpolate_bicubic(&ones, r)?;
            let d = (y.ones_like()? - y)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(d < 1e-6, "{r:?}: {d}");
        }
        Ok(())
    }
}
