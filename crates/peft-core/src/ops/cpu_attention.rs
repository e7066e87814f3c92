//! The fused attention op on the CPU: per batch element and head, `softmax(scale·QKᵀ + mask)`,
//! seeded dropout and the product with V, reading Q, K and V in the linears' `(batch, seq, hidden)`
//! layout (no split or merge copies) and writing the context the same way. Nothing score-sized
//! outlives a call: the backward recomputes the probabilities, as the CUDA op does. Batch elements
//! run in parallel; within one, the heads reuse the same score buffers.

use rayon::prelude::*;

use super::dropout::dropout_block;
use super::gemm::{gemm_into, MatMut, MatRef};
use super::softmax::{softmax_backward_rows, softmax_rows, RowMask};

/// `dst = lhs · rhs` on the calling thread: the products of one batch element run inside a task
/// that is already one of several in parallel.
fn product(dst: MatMut<'_>, lhs: MatRef<'_>, rhs: MatRef<'_>) -> candle_core::Result<()> {
    gemm_into(dst, lhs, rhs, 1.0, false, false)
}

/// A contiguous `s × s` score matrix.
fn square(data: &mut [f32], s: usize) -> MatMut<'_> {
    MatMut {
        data,
        rows: s,
        cols: s,
        row_stride: s,
    }
}

/// The settings of one call, and the shapes: `seq` queries and keys of `hidden = heads · head_dim`.
#[derive(Clone, Copy)]
pub(super) struct Params<'a> {
    pub batch: usize,
    pub seq: usize,
    pub hidden: usize,
    pub heads: usize,
    pub scale: f32,
    /// Additive `(batch, seq)` mask.
    pub mask: Option<&'a [f32]>,
    /// `(seed, keep probability)` of the dropout on the probabilities.
    pub dropout: Option<(u64, f32)>,
}

impl Params<'_> {
    fn head_dim(&self) -> usize {
        self.hidden / self.heads
    }

    /// Head `h`'s `seq × head_dim` columns of one batch element's `(seq, hidden)` rows.
    fn head<'a>(&self, rows: &'a [f32], h: usize) -> MatRef<'a> {
        MatRef {
            data: &rows[h * self.head_dim()..],
            rows: self.seq,
            cols: self.head_dim(),
            row_stride: self.hidden,
            col_stride: 1,
        }
    }

    fn head_mut<'a>(&self, rows: &'a mut [f32], h: usize) -> MatMut<'a> {
        let d = self.head_dim();
        MatMut {
            data: &mut rows[h * d..],
            rows: self.seq,
            cols: d,
            row_stride: self.hidden,
        }
    }

    /// `probs = softmax(scale·Q_h·K_hᵀ + mask_b)` for batch element `b`, head `h`.
    fn probabilities(
        &self,
        (q, k): (&[f32], &[f32]),
        (b, h): (usize, usize),
        scores: &mut [f32],
        probs: &mut [f32],
    ) -> candle_core::Result<()> {
        let s = self.seq;
        product(square(scores, s), self.head(q, h), self.head(k, h).t())?;
        let rows = RowMask {
            mask: self.mask.map(|m| &m[b * s..(b + 1) * s]),
            keys: s,
            first_row: 0,
            rows_per_batch: usize::MAX,
        };
        softmax_rows(probs, scores, rows, self.scale);
        Ok(())
    }

    /// The flat index of batch element `b`, head `h`'s first probability in `(batch, heads,
    /// seq, seq)`: where its dropout mask starts, as in the composite and the CUDA kernel.
    fn first_prob(&self, b: usize, h: usize) -> u64 {
        ((b * self.heads + h) * self.seq * self.seq) as u64
    }
}

/// The context `(batch, seq, hidden)` of contiguous `q`, `k`, `v` of that shape.
pub(super) fn forward(
    p: Params<'_>,
    q: &[f32],
    k: &[f32],
    v: &[f32],
) -> candle_core::Result<Vec<f32>> {
    let (s, hidden) = (p.seq, p.hidden);
    let per_batch = s * hidden;
    let mut ctx = vec![0f32; p.batch * per_batch];
    if ctx.is_empty() {
        return Ok(ctx);
    }
    ctx.par_chunks_mut(per_batch).enumerate().try_for_each(
        |(b, ctx)| -> candle_core::Result<()> {
            let rows = b * per_batch..(b + 1) * per_batch;
            let (q, k, v) = (&q[rows.clone()], &k[rows.clone()], &v[rows]);
            let mut scores = vec![0f32; s * s];
            let mut probs = vec![0f32; s * s];
            for h in 0..p.heads {
                p.probabilities((q, k), (b, h), &mut scores, &mut probs)?;
                if let Some((seed, keep)) = p.dropout {
                    dropout_block(&mut scores, &probs, seed, p.first_prob(b, h), keep);
                    std::mem::swap(&mut scores, &mut probs);
                }
                let probs = MatRef::new(&probs, s, s);
                product(p.head_mut(ctx, h), probs, p.head(v, h))?;
            }
            Ok(())
        },
    )?;
    Ok(ctx)
}

/// `(dq, dk, dv)` stacked in one `(3, batch, seq, hidden)` buffer for the context gradient `g`.
pub(super) fn backward(
    p: Params<'_>,
    g: &[f32],
    q: &[f32],
    k: &[f32],
    v: &[f32],
) -> candle_core::Result<Vec<f32>> {
    let (s, hidden) = (p.seq, p.hidden);
    let per_batch = s * hidden;
    let total = p.batch * per_batch;
    let mut grads = vec![0f32; 3 * total];
    if total == 0 {
        return Ok(grads);
    }
    let (dq, rest) = grads.split_at_mut(total);
    let (dk, dv) = rest.split_at_mut(total);
    dq.par_chunks_mut(per_batch)
        .zip(dk.par_chunks_mut(per_batch))
        .zip(dv.par_chunks_mut(per_batch))
        .enumerate()
        .try_for_each(|(b, ((dq, dk), dv))| -> candle_core::Result<()> {
            let rows = b * per_batch..(b + 1) * per_batch;
            let (g, q, k, v) = (
                &g[rows.clone()],
                &q[rows.clone()],
                &k[rows.clone()],
                &v[rows],
            );
            let mut scores = vec![0f32; s * s];
            let mut probs = vec![0f32; s * s];
            let mut dprobs = vec![0f32; s * s];
            for h in 0..p.heads {
                p.probabilities((q, k), (b, h), &mut scores, &mut probs)?;
                // The probabilities after dropout (into `scores`, no longer needed).
                let dropped = match p.dropout {
                    Some((seed, keep)) => {
                        dropout_block(&mut scores, &probs, seed, p.first_prob(b, h), keep);
                        &scores
                    }
                    None => &probs,
                };
                let dropped = MatRef::new(dropped, s, s);
                product(p.head_mut(dv, h), dropped.t(), p.head(g, h))?;
                product(square(&mut dprobs, s), p.head(g, h), p.head(v, h).t())?;
                if let Some((seed, keep)) = p.dropout {
                    dropout_block(&mut scores, &dprobs, seed, p.first_prob(b, h), keep);
                    std::mem::swap(&mut scores, &mut dprobs);
                }
                // d(scores) before the scale, with the scale folded in: scale·P⊙(dP − Σ dP⊙P).
                softmax_backward_rows(&mut scores, &probs, &dprobs, s, p.scale);
                let dscores = MatRef::new(&scores, s, s);
                product(p.head_mut(dq, h), dscores, p.head(k, h))?;
                product(p.head_mut(dk, h), dscores.t(), p.head(q, h))?;
            }
            Ok(())
        })?;
    Ok(grads)
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor, Var};

    use crate::ops::{attention, attention_reference, max_abs_diff, AttentionSpec};

    /// The fused CPU op against the composite: the context and the gradients of q, k and v
    /// within 1e-5, with a padding mask (−∞ and f32::MIN keys) and with dropout.
    fn check(batch: usize, seq: usize, heads: usize, dropout: Option<(u64, f32)>) {
        let dev = Device::Cpu;
        let hidden = heads * 8;
        let var = || Var::randn(0f32, 1., (batch, seq, hidden), &dev).unwrap();
        let (q, k, v) = (var(), var(), var());
        let mask: Vec<f32> = (0..batch * seq)
            .map(|i| match (i % seq, i / seq) {
                (j, b) if j + b > seq => f32::NEG_INFINITY,
                (j, b) if j + b == seq => f32::MIN,
                _ => 0.0,
            })
            .collect();
        let mask = Tensor::from_vec(mask, (batch, seq), &dev).unwrap();
        let spec = AttentionSpec {
            heads,
            scale: 1.0 / (hidden as f64 / heads as f64).sqrt(),
            mask: Some(&mask),
            dropout,
        };
        let w = Tensor::randn(0f32, 1., (batch, seq, hidden), &dev).unwrap();
        let run = |fused: bool| {
            let ctx = if fused {
                attention(&q, &k, &v, &spec).unwrap()
            } else {
                attention_reference(&q, &k, &v, &spec).unwrap()
            };
            let grads = (&ctx * &w).unwrap().sum_all().unwrap().backward().unwrap();
            let grad = |x: &Var| grads.get(x.as_tensor()).unwrap().clone();
            (ctx, [grad(&q), grad(&k), grad(&v)])
        };
        let ((ours, our_grads), (reference, ref_grads)) = (run(true), run(false));
        let case = format!("batch {batch}, seq {seq}, heads {heads}, dropout {dropout:?}");
        let d = max_abs_diff(&ours, &reference);
        assert!(d < 1e-5, "{case}: context differs by {d}");
        for (name, (a, b)) in ["q", "k", "v"].iter().zip(our_grads.iter().zip(&ref_grads)) {
            let d = max_abs_diff(a, b);
            assert!(d < 1e-5, "{case}: gradient of {name} differs by {d}");
        }
    }

    #[test]
    fn matches_the_composite_without_dropout() {
        check(3, 7, 2, None);
        check(2, 37, 4, None);
    }

    #[test]
    fn matches_the_composite_with_dropout() {
        check(3, 7, 2, Some((42, 0.9)));
        check(2, 37, 4, Some((0x9e37_79b9, 0.75)));
    }

    /// An empty batch or empty sequences give empty outputs and gradients, not a panic.
    #[test]
    fn empty_inputs_give_empty_outputs() {
        for dims in [(0, 5, 16), (2, 0, 16)] {
            let q = Var::zeros(dims, candle_core::DType::F32, &Device::Cpu).unwrap();
            let spec = AttentionSpec {
                heads: 2,
                scale: 0.25,
                mask: None,
                dropout: Some((1, 0.9)),
            };
            let ctx = attention(&q, &q, &q, &spec).unwrap();
            assert_eq!(ctx.dims3().unwrap(), dims);
            let grads = ctx.sum_all().unwrap().backward().unwrap();
            assert_eq!(grads.get(q.as_tensor()).unwrap().dims3().unwrap(), dims);
        }
    }
}
