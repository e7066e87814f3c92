//! Many LoRA adapters in one batch, for serving (as Punica/S-LoRA's BGMV): row `i` of `x` uses
//! adapter `idx[i]` of a stack, or none. `y[i] = x[i]·Wᵀ + b + s[a]·B[a]·A[a]·x[i]` with
//! `a = idx[i]`. Inference only (no backward). On CUDA: one cuBLAS GEMM for the shared base, then
//! a shrink kernel (`u[i] = A[a]·x[i]`, f32, rows × r) and an expand kernel that adds
//! `s[a]·B[a]·u[i]` into `y` (`bgmv_shrink`/`bgmv_expand` in kernels/peft_ops.cu).

use candle_core::{CpuStorage, CustomOp2, DType, Layout, Shape, Tensor};

use super::contiguous_f32;
use super::frozen_linear::cpu_linear;

/// A stack of same-rank LoRA adapters for one linear layer.
#[derive(Clone, Debug)]
pub struct LoraStack {
    /// `(adapters, r, in)`.
    pub a: Tensor,
    /// `(adapters, out, r)`.
    pub b: Tensor,
    /// `(adapters,)` scales, f32.
    pub scales: Tensor,
}

impl LoraStack {
    /// Stacks `(A, B, scale)` triples of equal rank and shape.
    pub fn new(adapters: &[(Tensor, Tensor, f64)]) -> candle_core::Result<Self> {
        let Some((a0, b0, _)) = adapters.first() else {
            candle_core::bail!("multi-lora: no adapters to stack")
        };
        for (i, (a, b, _)) in adapters.iter().enumerate() {
            if a.dims() != a0.dims() || b.dims() != b0.dims() {
                candle_core::bail!(
                    "multi-lora: adapter {i} has A {:?}, B {:?}; adapter 0 has A {:?}, B {:?}",
                    a.shape(),
                    b.shape(),
                    a0.shape(),
                    b0.shape()
                )
            }
        }
        let a: Vec<Tensor> = adapters.iter().map(|(a, _, _)| a.detach()).collect();
        let b: Vec<Tensor> = adapters.iter().map(|(_, b, _)| b.detach()).collect();
        let scales: Vec<f32> = adapters.iter().map(|(_, _, s)| *s as f32).collect();
        Ok(Self {
            a: Tensor::stack(&a, 0)?,
            b: Tensor::stack(&b, 0)?,
            scales: Tensor::new(scales, a0.device())?,
        })
    }

    /// The number of adapters.
    pub fn len(&self) -> usize {
        self.a.dims()[0]
    }

    /// Whether the stack is empty (never, once built).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Marks a row that uses no adapter in [`multi_lora_linear`]'s index.
pub const NO_ADAPTER: u32 = u32::MAX;

struct MultiLora {
    weight: Tensor,
    bias: Option<Tensor>,
    stack: LoraStack,
}

impl CustomOp2 for MultiLora {
    fn name(&self) -> &'static str {
        "multi-lora-linear"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        xl: &Layout,
        idx: &CpuStorage,
        il: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (m, k) = xl.shape().dims2()?;
        let n = self.weight.dims()[0];
        let r = self.stack.a.dims()[1];
        let mut y = cpu_linear(x, xl, &self.weight, self.bias.as_ref(), self.name())?;
        let CpuStorage::F32(yv) = &mut y else {
            candle_core::bail!("multi-lora-linear: only f32 is supported on the CPU path")
        };
        let xv = contiguous_f32(x, xl, self.name())?;
        let CpuStorage::U32(iv) = idx else {
            candle_core::bail!("multi-lora-linear: the index must be u32")
        };
        let iv = &iv[il.start_offset()..il.start_offset() + m];
        let a: Vec<f32> = self.stack.a.flatten_all()?.to_vec1()?;
        let b: Vec<f32> = self.stack.b.flatten_all()?.to_vec1()?;
        let s: Vec<f32> = self.stack.scales.to_vec1()?;
        let mut u = vec![0f32; r];
        for (i, &ad) in iv.iter().enumerate() {
            if ad == NO_ADAPTER {
                continue;
            }
            let ad = ad as usize;
            if ad >= s.len() {
                candle_core::bail!(
                    "multi-lora-linear: row {i} uses adapter {ad} of {}",
                    s.len()
                )
            }
            let xr = &xv[i * k..(i + 1) * k];
            for (j, uj) in u.iter_mut().enumerate() {
                let ar = &a[(ad * r + j) * k..][..k];
                *uj = xr.iter().zip(ar).map(|(x, a)| x * a).sum();
            }
            for (col, y) in yv[i * n..(i + 1) * n].iter_mut().enumerate() {
                let br = &b[(ad * n + col) * r..][..r];
                *y += s[ad] * br.iter().zip(&u).map(|(b, u)| b * u).sum::<f32>();
            }
        }
        Ok((y, Shape::from((m, n))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        xl: &Layout,
        idx: &candle_core::CudaStorage,
        il: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        super::cuda_ops::multi_lora_linear(
            x,
            xl,
            idx,
            il,
            &self.weight,
            self.bias.as_ref(),
            &self.stack,
        )
    }
}

/// `x·Wᵀ + b` plus, for each row `i`, adapter `adapter_of_row[i]`'s `s·B·A·x[i]` ([`NO_ADAPTER`]:
/// none). `x` is `(rows, in)`; the stack's tensors must be in `x`'s dtype (scales f32).
pub fn multi_lora_linear(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    stack: &LoraStack,
    adapter_of_row: &Tensor,
) -> candle_core::Result<Tensor> {
    let (rows, k) = x.dims2()?;
    let (adapters, r, a_in) = stack.a.dims3()?;
    let (b_adapters, n, b_r) = stack.b.dims3()?;
    if a_in != k || b_adapters != adapters || b_r != r || weight.dims() != [n, k] {
        candle_core::bail!(
            "multi-lora-linear: shapes do not fit: x {:?}, W {:?}, A {:?}, B {:?}",
            x.shape(),
            weight.shape(),
            stack.a.shape(),
            stack.b.shape()
        )
    }
    if adapter_of_row.dims() != [rows] || adapter_of_row.dtype() != DType::U32 {
        candle_core::bail!(
            "multi-lora-linear: the adapter index must be u32 of shape [{rows}], got {:?} {:?}",
            adapter_of_row.dtype(),
            adapter_of_row.shape()
        )
    }
    let op = MultiLora {
        weight: weight.detach().contiguous()?,
        bias: bias.map(|b| b.detach()),
        stack: LoraStack {
            a: stack.a.contiguous()?,
            b: stack.b.contiguous()?,
            scales: stack.scales.to_dtype(DType::F32)?.contiguous()?,
        },
    };
    x.contiguous()?
        .apply_op2_no_bwd(&adapter_of_row.contiguous()?, &op)
}

/// The same function from plain candle ops, one adapter at a time (rows gathered and scattered).
pub fn multi_lora_linear_reference(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    stack: &LoraStack,
    adapter_of_row: &[u32],
) -> candle_core::Result<Tensor> {
    let mut y = x.matmul(&weight.t()?)?;
    if let Some(b) = bias {
        y = y.broadcast_add(b)?;
    }
    let scales: Vec<f32> = stack.scales.to_dtype(DType::F32)?.to_vec1()?;
    let mut delta = y.zeros_like()?;
    for (ad, &s) in scales.iter().enumerate() {
        let rows: Vec<u32> = (0..adapter_of_row.len() as u32)
            .filter(|&i| adapter_of_row[i as usize] == ad as u32)
            .collect();
        if rows.is_empty() {
            continue;
        }
        let ids = Tensor::new(rows.as_slice(), x.device())?;
        let xs = x.index_select(&ids, 0)?;
        let d = xs
            .matmul(&stack.a.get(ad)?.t()?)?
            .matmul(&stack.b.get(ad)?.t()?)?
            .affine(s as f64, 0.0)?;
        delta = delta.index_add(&ids, &d, 0)?;
    }
    y + delta
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn every_row_gets_its_own_adapter() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let (rows, k, n, r) = (9, 13, 7, 3);
        let x = Tensor::randn(0f32, 1., (rows, k), &dev)?;
        let w = Tensor::randn(0f32, 0.3, (n, k), &dev)?;
        let bias = Tensor::randn(0f32, 1., n, &dev)?;
        let adapters: Vec<(Tensor, Tensor, f64)> = (0..3)
            .map(|i| {
                Ok((
                    Tensor::randn(0f32, 0.3, (r, k), &dev)?,
                    Tensor::randn(0f32, 0.3, (n, r), &dev)?,
                    0.5 + i as f64,
                ))
            })
            .collect::<candle_core::Result<_>>()?;
        let stack = LoraStack::new(&adapters)?;
        let idx = [2, 0, NO_ADAPTER, 1, 1, 2, 0, NO_ADAPTER, 2];
        let ours = multi_lora_linear(&x, &w, Some(&bias), &stack, &Tensor::new(&idx, &dev)?)?;
        let reference = multi_lora_linear_reference(&x, &w, Some(&bias), &stack, &idx)?;
        let diff = (&ours - &reference)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-5, "differs by {diff}");
        // A row without adapter is the base output; a row with one is not.
        let base = x.matmul(&w.t()?)?.broadcast_add(&bias)?;
        let row_diff = |i: usize| -> candle_core::Result<f32> {
            (ours.get(i)? - base.get(i)?)?
                .abs()?
                .max(0)?
                .to_scalar::<f32>()
        };
        assert!(row_diff(2)? < 1e-6 && row_diff(0)? > 1e-3);
        let bad = Tensor::new(&[5u32; 9], &dev)?;
        let err = multi_lora_linear(&x, &w, None, &stack, &bad).unwrap_err();
        assert!(err.to_string().contains("adapter 5 of 3"), "{err}");
        Ok(())
    }
}
