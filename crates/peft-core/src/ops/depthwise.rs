//! Depthwise 2-D convolution on channels-last (`batch × h × w × c`) activations, as one op.
//!
//! candle runs a grouped convolution as one convolution per group (`chunk` + `cat`): for the
//! depthwise layers of MobileNetV2 (up to 960 groups of one channel) that is hundreds of tiny
//! convolutions per layer, forward and backward. This op loops over the `k × k` window with the
//! channel dimension innermost (contiguous, vectorised), in parallel over images, and computes
//! the kernel's gradient only when the kernel is trainable. [`depthwise_conv2d_reference`] is the
//! same function from candle's grouped `conv2d`, for the tests.

use candle_core::{CpuStorage, CustomOp2, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::{contiguous_f32, with_f32};

/// Stride and zero padding of a depthwise convolution.
#[derive(Clone, Copy, Debug)]
struct Window {
    k: usize,
    stride: usize,
    padding: usize,
}

impl Window {
    fn out_size(&self, n: usize) -> usize {
        (n + 2 * self.padding - self.k) / self.stride + 1
    }

    /// The input index read by output `o` at kernel offset `t`, if inside the image.
    fn input_index(&self, o: usize, t: usize, n: usize) -> Option<usize> {
        let i = (o * self.stride + t).checked_sub(self.padding)?;
        (i < n).then_some(i)
    }
}

struct Depthwise {
    window: Window,
    weight_grad: bool,
}

/// Dimensions of one call: input `b × h × w × c`, output `b × oh × ow × c`.
#[derive(Clone, Copy)]
struct Dims {
    b: usize,
    h: usize,
    w: usize,
    c: usize,
    oh: usize,
    ow: usize,
}

impl Depthwise {
    fn dims(&self, x_l: &Layout, k_l: &Layout) -> candle_core::Result<Dims> {
        let (b, h, w, c) = x_l.shape().dims4()?;
        let (kk, kc) = k_l.shape().dims2()?;
        let k = self.window.k;
        if kk != k * k || kc != c {
            candle_core::bail!(
                "depthwise: kernel {:?} does not fit {k}×{k} over {c} channels",
                k_l.dims()
            )
        }
        if h + 2 * self.window.padding < k || w + 2 * self.window.padding < k {
            candle_core::bail!("depthwise: a {h}×{w} input is smaller than the {k}×{k} window")
        }
        Ok(Dims {
            b,
            h,
            w,
            c,
            oh: self.window.out_size(h),
            ow: self.window.out_size(w),
        })
    }
}

/// `out[oy, ox, :] = Σ kernel[ky·k + kx, :] ⊙ x[iy, ix, :]` for one image.
fn forward_image(x: &[f32], kernel: &[f32], out: &mut [f32], d: Dims, win: Window) {
    let c = d.c;
    for oy in 0..d.oh {
        for ox in 0..d.ow {
            let o = &mut out[(oy * d.ow + ox) * c..][..c];
            for ky in 0..win.k {
                let Some(iy) = win.input_index(oy, ky, d.h) else {
                    continue;
                };
                for kx in 0..win.k {
                    let Some(ix) = win.input_index(ox, kx, d.w) else {
                        continue;
                    };
                    let xi = &x[(iy * d.w + ix) * c..][..c];
                    let wk = &kernel[(ky * win.k + kx) * c..][..c];
                    for ((o, x), w) in o.iter_mut().zip(xi).zip(wk) {
                        *o += x * w;
                    }
                }
            }
        }
    }
}

/// The input gradient of one image (`dx` zeroed) and, if asked, its kernel gradient.
fn backward_image(
    x: &[f32],
    kernel: &[f32],
    g: &[f32],
    dx: &mut [f32],
    mut dk: Option<&mut [f32]>,
    d: Dims,
    win: Window,
) {
    let c = d.c;
    for oy in 0..d.oh {
        for ox in 0..d.ow {
            let go = &g[(oy * d.ow + ox) * c..][..c];
            for ky in 0..win.k {
                let Some(iy) = win.input_index(oy, ky, d.h) else {
                    continue;
                };
                for kx in 0..win.k {
                    let Some(ix) = win.input_index(ox, kx, d.w) else {
                        continue;
                    };
                    let at = (iy * d.w + ix) * c;
                    let tap = (ky * win.k + kx) * c;
                    for ((dx, w), g) in dx[at..at + c].iter_mut().zip(&kernel[tap..tap + c]).zip(go)
                    {
                        *dx += w * g;
                    }
                    if let Some(dk) = dk.as_deref_mut() {
                        for ((dk, x), g) in dk[tap..tap + c].iter_mut().zip(&x[at..at + c]).zip(go)
                        {
                            *dk += x * g;
                        }
                    }
                }
            }
        }
    }
}

impl CustomOp2 for Depthwise {
    fn name(&self) -> &'static str {
        "depthwise-conv2d"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        x_l: &Layout,
        ks: &CpuStorage,
        k_l: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let d = self.dims(x_l, k_l)?;
        let x = contiguous_f32(xs, x_l, "depthwise")?;
        let kernel = contiguous_f32(ks, k_l, "depthwise")?;
        let (in_img, out_img) = (d.h * d.w * d.c, d.oh * d.ow * d.c);
        let mut out = vec![0f32; d.b * out_img];
        out.par_chunks_mut(out_img.max(1))
            .zip(x.par_chunks(in_img.max(1)))
            .for_each(|(o, x)| forward_image(x, kernel, o, d, self.window));
        Ok((CpuStorage::F32(out), Shape::from((d.b, d.oh, d.ow, d.c))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        kernel: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let op = DepthwiseBackward {
            window: self.window,
            weight_grad: self.weight_grad,
        };
        let (dx, dk) = op.run(x, kernel, &grad)?;
        Ok((Some(dx), dk))
    }
}

struct DepthwiseBackward {
    window: Window,
    weight_grad: bool,
}

impl DepthwiseBackward {
    fn run(
        &self,
        x: &Tensor,
        kernel: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Tensor, Option<Tensor>)> {
        let x = x.contiguous()?;
        let kernel = kernel.contiguous()?;
        let (b, h, w, c) = x.dims4()?;
        let (_, oh, ow, _) = g.dims4()?;
        let d = Dims { b, h, w, c, oh, ow };
        let kv = kernel.flatten_all()?.to_vec1::<f32>()?;
        let (in_img, out_img, kn) = (h * w * c, oh * ow * c, self.window.k * self.window.k * c);
        let win = self.window;
        let weight_grad = self.weight_grad;
        let (dx, dk) = with_f32(&x, |xv| {
            with_f32(g, |gv| {
                let mut dx = vec![0f32; b * in_img];
                let dk = if weight_grad {
                    let partial = dx
                        .par_chunks_mut(in_img.max(1))
                        .zip(xv.par_chunks(in_img.max(1)))
                        .zip(gv.par_chunks(out_img.max(1)))
                        .fold(
                            || vec![0f32; kn],
                            |mut dk, ((dx, x), g)| {
                                backward_image(x, &kv, g, dx, Some(&mut dk), d, win);
                                dk
                            },
                        )
                        .reduce(
                            || vec![0f32; kn],
                            |mut a, b| {
                                a.iter_mut().zip(&b).for_each(|(a, b)| *a += b);
                                a
                            },
                        );
                    Some(partial)
                } else {
                    dx.par_chunks_mut(in_img.max(1))
                        .zip(xv.par_chunks(in_img.max(1)))
                        .zip(gv.par_chunks(out_img.max(1)))
                        .for_each(|((dx, x), g)| backward_image(x, &kv, g, dx, None, d, win));
                    None
                };
                (dx, dk)
            })
        })??;
        let dk = dk
            .map(|v| Tensor::from_vec(v, kernel.shape(), kernel.device()))
            .transpose()?;
        Ok((Tensor::from_vec(dx, x.shape(), x.device())?, dk))
    }
}

/// Depthwise convolution of `x` (`batch × h × w × c`, channels last) with `kernel`
/// (`c × 1 × k × k`, PyTorch's layout), stride and zero padding symmetric. Differentiable in `x`
/// always and in `kernel` when it is a trainable variable. f32 on the CPU runs the fused op;
/// other devices and dtypes run [`depthwise_conv2d_reference`].
pub fn depthwise_conv2d(
    x: &Tensor,
    kernel: &Tensor,
    stride: usize,
    padding: usize,
) -> candle_core::Result<Tensor> {
    let (c, one, k, k2) = kernel.dims4()?;
    if one != 1 || k != k2 || x.dim(3)? != c || stride == 0 {
        candle_core::bail!(
            "depthwise: kernel {:?} (stride {stride}) does not fit input {:?}",
            kernel.shape(),
            x.shape()
        )
    }
    if !(x.device().is_cpu() && x.dtype() == candle_core::DType::F32) {
        return depthwise_conv2d_reference(x, kernel, stride, padding);
    }
    let taps = kernel
        .to_dtype(x.dtype())?
        .reshape((c, k * k))?
        .t()?
        .contiguous()?;
    let op = Depthwise {
        window: Window { k, stride, padding },
        weight_grad: kernel.is_variable(),
    };
    let out = x
        .contiguous()?
        .apply_op2_arc(&taps, std::sync::Arc::new(Box::new(op)))?;
    Ok(out)
}

/// The same function from candle's grouped `conv2d` (channels-first inside).
pub fn depthwise_conv2d_reference(
    x: &Tensor,
    kernel: &Tensor,
    stride: usize,
    padding: usize,
) -> candle_core::Result<Tensor> {
    let c = kernel.dim(0)?;
    let nchw = x.permute((0, 3, 1, 2))?.contiguous()?;
    let y = nchw.conv2d(&kernel.to_dtype(x.dtype())?, padding, stride, 1, c)?;
    y.permute((0, 2, 3, 1))?.contiguous()
}
