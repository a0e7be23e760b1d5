//! The reference of a variable-length batch (`crate::Sequences`): every sequence run alone
//! through [`fma_forward`], [`super::dense_attention`], [`fma_backward`] or [`super::dense_backward()`] on its
//! own rows, the results put back in the batch's layout; padding rows (padded batches) get
//! O = 0 and LSE = -inf, and gradients 0.

use super::{dense_attention_with, dense_backward_with, fma_backward, fma_forward, Reference};
use crate::config::{Downsample, FmaConfig};
use crate::error::Result;
use crate::gradients::{Gradients, LevelGradients};
use crate::sequences::Sequences;
use crate::shape::Shape;
use crate::variants::Variants;

/// Rows `[row, row + n)` of every head of a tensor whose heads are `stride` rows apart.
fn gather(x: &[f64], heads: usize, stride: usize, row: usize, n: usize, d: usize) -> Vec<f64> {
    (0..heads)
        .flat_map(|h| &x[(h * stride + row) * d..(h * stride + row + n) * d])
        .copied()
        .collect()
}

/// Runs `one(q, k, v, shape)` on every sequence of `seqs` alone and assembles the batch's O and
/// LSE (`shape`: the tensors' shape, as [`Sequences::shape`] gives it).
fn each_sequence(
    q: &[f64],
    k: &[f64],
    v: &[f64],
    shape: Shape,
    seqs: &Sequences,
    one: impl Fn(&[f64], &[f64], &[f64], Shape) -> Result<Reference>,
) -> Result<Reference> {
    seqs.check(shape)?;
    shape.check_len("Q", q.len())?;
    shape.check_kv_len("K", k.len())?;
    shape.check_kv_len("V", v.len())?;
    let (heads, kv_heads, d) = (shape.heads, shape.kv_heads, shape.head_dim);
    let mut o = vec![0f64; shape.elements()];
    let mut lse = vec![f64::NEG_INFINITY; shape.rows()];
    for (s, &n) in seqs.lengths.iter().enumerate() {
        if n == 0 {
            continue;
        }
        let (q_stride, q_row) = seqs.rows(heads, s);
        let (kv_stride, kv_row) = seqs.kv_rows(kv_heads, s);
        // Its own keys (packed_cross: a length of their own); none: O = 0, LSE = -inf.
        let nk = seqs.kv_len(s);
        if nk == 0 {
            continue;
        }
        let r = one(
            &gather(q, heads, q_stride, q_row, n, d),
            &gather(k, kv_heads, kv_stride, kv_row, nk, d),
            &gather(v, kv_heads, kv_stride, kv_row, nk, d),
            Shape::cross(1, heads, n, nk, d).with_kv_heads(kv_heads),
        )?;
        for h in 0..heads {
            let at = h * q_stride + q_row;
            o[at * d..(at + n) * d].copy_from_slice(&r.o[h * n * d..(h + 1) * n * d]);
            lse[at..at + n].copy_from_slice(&r.lse[h * n..(h + 1) * n]);
        }
    }
    Ok(Reference { o, lse })
}

/// FMA of a variable-length batch: every sequence its own FMA (its own levels), as if run
/// alone. `shape` is the tensors' shape ([`Sequences::shape`]).
pub fn fma_forward_varlen(
    q: &[f64],
    k: &[f64],
    v: &[f64],
    shape: Shape,
    seqs: &Sequences,
    cfg: &FmaConfig,
) -> Result<Reference> {
    crate::cross::check_fma_cross_varlen(seqs, cfg)?;
    each_sequence(q, k, v, shape, seqs, |q, k, v, s| {
        fma_forward(q, k, v, s, cfg)
    })
}

/// Exact attention of a variable-length batch: every sequence attends to itself.
pub fn dense_attention_varlen(
    q: &[f64],
    k: &[f64],
    v: &[f64],
    shape: Shape,
    seqs: &Sequences,
    causal: bool,
) -> Result<Reference> {
    dense_attention_varlen_with(q, k, v, shape, seqs, causal, &Variants::default())
}

/// [`dense_attention_varlen`] with the softmax variants `variants`
/// ([`super::dense_attention_with`]), every sequence alone.
pub fn dense_attention_varlen_with(
    q: &[f64],
    k: &[f64],
    v: &[f64],
    shape: Shape,
    seqs: &Sequences,
    causal: bool,
    variants: &Variants,
) -> Result<Reference> {
    each_sequence(q, k, v, shape, seqs, |q, k, v, s| {
        dense_attention_with(q, k, v, s, causal, variants)
    })
}

/// Adds `from` into `into`, element by element.
fn add_into(into: &mut [f64], from: &[f64]) {
    for (a, b) in into.iter_mut().zip(from) {
        *a += b;
    }
}

/// Scatters rows `[0, n)` of every head of a sequence's `(heads, n, d)` tensor back into the
/// batch tensor `x` at `row` (heads `stride` rows apart).
fn scatter(x: &mut [f64], one: &[f64], stride: usize, row: usize, n: usize, d: usize) {
    for (h, part) in one.chunks(n * d).enumerate() {
        let at = (h * stride + row) * d;
        x[at..at + n * d].copy_from_slice(part);
    }
}

/// Gradients of a variable-length batch, each sequence's [`fma_backward`] alone: dQ of Q's
/// shape, dK and dV of K's shape, 0 on padding rows; in Learned mode the weight gradients
/// summed over the sequences (each sequence's unused levels contribute 0). `shape` is the
/// tensors' shape ([`Sequences::shape`]), `dout` of Q's shape.
pub fn fma_backward_varlen(
    x: (&[f64], &[f64], &[f64], &[f64]),
    shape: Shape,
    seqs: &Sequences,
    cfg: &FmaConfig,
) -> Result<Gradients<f64>> {
    crate::cross::check_fma_cross_varlen(seqs, cfg)?;
    let weights = match &cfg.downsample {
        Downsample::Learned(w) => Some(w.levels.iter().map(LevelGradients::zeros_like).collect()),
        Downsample::Average => None,
    };
    backward_each_sequence(x, shape, seqs, weights, |q, k, v, dout, s| {
        fma_backward(q, k, v, dout, s, cfg)
    })
}

/// Gradients of exact attention of a variable-length batch, each sequence's
/// [`super::dense_backward()`] alone (every sequence attends to itself; causal per sequence): dQ of
/// Q's shape, dK and dV of K's shape, 0 on padding rows. `shape` is the tensors' shape
/// ([`Sequences::shape`]), `dout` of Q's shape.
pub fn dense_backward_varlen(
    x: (&[f64], &[f64], &[f64], &[f64]),
    shape: Shape,
    seqs: &Sequences,
    causal: bool,
) -> Result<Gradients<f64>> {
    dense_backward_varlen_with(x, shape, seqs, causal, &Variants::default())
}

/// [`dense_backward_varlen`] with the softmax variants `variants`
/// ([`super::dense_backward_with`]); `dsinks` sums every sequence's.
pub fn dense_backward_varlen_with(
    x: (&[f64], &[f64], &[f64], &[f64]),
    shape: Shape,
    seqs: &Sequences,
    causal: bool,
    variants: &Variants,
) -> Result<Gradients<f64>> {
    backward_each_sequence(x, shape, seqs, None, |q, k, v, dout, s| {
        dense_backward_with(q, k, v, dout, s, causal, variants)
    })
}

/// Runs `one(q, k, v, dout, shape)` on every sequence of `seqs` alone and assembles the
/// batch's gradients; weight gradients (`weights`: zeros of every level, or `None`) summed
/// over the sequences.
fn backward_each_sequence(
    (q, k, v, dout): (&[f64], &[f64], &[f64], &[f64]),
    shape: Shape,
    seqs: &Sequences,
    mut weights: Option<Vec<LevelGradients<f64>>>,
    one: impl Fn(&[f64], &[f64], &[f64], &[f64], Shape) -> Result<Gradients<f64>>,
) -> Result<Gradients<f64>> {
    seqs.check(shape)?;
    shape.check_len("Q", q.len())?;
    shape.check_len("dO", dout.len())?;
    shape.check_kv_len("K", k.len())?;
    shape.check_kv_len("V", v.len())?;
    let (heads, kv_heads, d) = (shape.heads, shape.kv_heads, shape.head_dim);
    let mut dq = vec![0f64; shape.elements()];
    let mut dk = vec![0f64; shape.kv_elements()];
    let mut dv = vec![0f64; shape.kv_elements()];
    let mut dsinks: Option<Vec<f64>> = None;
    for (s, &n) in seqs.lengths.iter().enumerate() {
        if n == 0 {
            continue;
        }
        let (q_stride, q_row) = seqs.rows(heads, s);
        let (kv_stride, kv_row) = seqs.kv_rows(kv_heads, s);
        let nk = seqs.kv_len(s);
        let g = one(
            &gather(q, heads, q_stride, q_row, n, d),
            &gather(k, kv_heads, kv_stride, kv_row, nk, d),
            &gather(v, kv_heads, kv_stride, kv_row, nk, d),
            &gather(dout, heads, q_stride, q_row, n, d),
            Shape::cross(1, heads, n, nk, d).with_kv_heads(kv_heads),
        )?;
        scatter(&mut dq, &g.dq, q_stride, q_row, n, d);
        scatter(&mut dk, &g.dk, kv_stride, kv_row, nk, d);
        scatter(&mut dv, &g.dv, kv_stride, kv_row, nk, d);
        if let Some(one) = &g.dsinks {
            add_into(dsinks.get_or_insert_with(|| vec![0.0; one.len()]), one);
        }
        if let (Some(all), Some(one)) = (weights.as_mut(), g.weights) {
            for (a, b) in all.iter_mut().zip(&one) {
                add_into(&mut a.wk, &b.wk);
                add_into(&mut a.bk, &b.bk);
                add_into(&mut a.wv, &b.wv);
                add_into(&mut a.bv, &b.bv);
                add_into(&mut a.wq, &b.wq);
                add_into(&mut a.bq, &b.bq);
            }
        }
    }
    Ok(Gradients {
        dq,
        dk,
        dv,
        weights,
        dsinks,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::random::normal_tensor;

    fn wide(seed: u64, len: usize) -> Vec<f64> {
        normal_tensor(seed, len).iter().map(|&x| x as f64).collect()
    }

    #[test]
    fn padded_equals_packed_and_padding_is_zero_and_minus_infinity() {
        let lengths = vec![5, 1, 12];
        let (heads, kv_heads, d, n) = (2, 1, 4, 12);
        let packed = Sequences::packed(lengths.clone()).unwrap();
        let padded = Sequences::padded(n, lengths.clone()).unwrap();
        let (ps, qs) = (
            packed.shape(heads, kv_heads, d),
            padded.shape(heads, kv_heads, d),
        );
        let (q, k, v) = (
            wide(1, ps.elements()),
            wide(2, ps.kv_elements()),
            wide(3, ps.kv_elements()),
        );
        // The packed tensors laid out padded: sequence s of head h at row (s heads + h) n.
        let pad = |x: &[f64], hh: usize| {
            let mut out = vec![0.5; lengths.len() * hh * n * d];
            for (s, &len) in lengths.iter().enumerate() {
                let (stride, row) = packed.rows(hh, s);
                for h in 0..hh {
                    let src = (h * stride + row) * d;
                    let dst = ((s * hh + h) * n) * d;
                    out[dst..dst + len * d].copy_from_slice(&x[src..src + len * d]);
                }
            }
            out
        };
        let cfg = FmaConfig::new(4, 2);
        let a = fma_forward_varlen(&q, &k, &v, ps, &packed, &cfg).unwrap();
        let b =
            fma_forward_varlen(&pad(&q, 2), &pad(&k, 1), &pad(&v, 1), qs, &padded, &cfg).unwrap();
        for (s, &len) in lengths.iter().enumerate() {
            let (stride, row) = packed.rows(heads, s);
            for h in 0..heads {
                let pa = h * stride + row;
                let pb = (s * heads + h) * n;
                assert_eq!(a.o[pa * d..(pa + len) * d], b.o[pb * d..(pb + len) * d]);
                assert_eq!(a.lse[pa..pa + len], b.lse[pb..pb + len]);
                assert!(b.o[(pb + len) * d..(pb + n) * d].iter().all(|&x| x == 0.0));
                assert!(b.lse[pb + len..pb + n]
                    .iter()
                    .all(|&x| x == f64::NEG_INFINITY));
            }
        }
        // A sequence alone is the batch's rows of it.
        let one = Shape::new(1, heads, 12, d).with_kv_heads(kv_heads);
        let alone = fma_forward(
            &gather(&q, heads, 18, 6, 12, d),
            &gather(&k, kv_heads, 18, 6, 12, d),
            &gather(&v, kv_heads, 18, 6, 12, d),
            one,
            &cfg,
        )
        .unwrap();
        assert_eq!(alone.o[..12 * d], a.o[6 * d..18 * d]);
    }

    /// The varlen backward is the gradient of the varlen forward: central finite differences
    /// of L = sum(dO * O) over every input element of a pack of awkward lengths (each
    /// sequence's own levels, GQA, causal), and the padded layout's gradients equal the
    /// packed ones with 0 on the padding. Step h = 1e-5 in f64: truncation ~1e-10, rounding
    /// ~1e-11, so 1e-7 + 1e-6 |g| (as `cpu::backward::tests`); a gradient scattered to the
    /// wrong row moves by O(0.1).
    #[test]
    fn backward_is_the_gradient_of_the_forward_and_padding_gets_zero() {
        let lengths = vec![3, 9, 1];
        let (heads, kv_heads, d, n) = (2, 1, 2, 9);
        let packed = Sequences::packed(lengths.clone()).unwrap();
        let ps = packed.shape(heads, kv_heads, d);
        let (q, k, v, dout) = (
            wide(11, ps.elements()),
            wide(12, ps.kv_elements()),
            wide(13, ps.kv_elements()),
            wide(14, ps.elements()),
        );
        let mut cfg = FmaConfig::new(2, 2);
        cfg.causal = true;
        let g = fma_backward_varlen((&q, &k, &v, &dout), ps, &packed, &cfg).unwrap();
        let loss = |q: &[f64], k: &[f64], v: &[f64]| -> f64 {
            let o = fma_forward_varlen(q, k, v, ps, &packed, &cfg).unwrap().o;
            o.iter().zip(&dout).map(|(a, b)| a * b).sum()
        };
        let h = 1e-5;
        for (name, which, grad) in [("dQ", 0, &g.dq), ("dK", 1, &g.dk), ("dV", 2, &g.dv)] {
            for idx in 0..grad.len() {
                let mut xs = [q.clone(), k.clone(), v.clone()];
                xs[which][idx] += h;
                let plus = loss(&xs[0], &xs[1], &xs[2]);
                xs[which][idx] -= 2.0 * h;
                let minus = loss(&xs[0], &xs[1], &xs[2]);
                let fd = (plus - minus) / (2.0 * h);
                assert!(
                    crate::closeness::is_close(grad[idx], fd, 1e-7, 1e-6),
                    "{name}[{idx}]: analytic {}, finite difference {fd}",
                    grad[idx]
                );
            }
        }
        // The same batch padded to n: equal gradients, 0 on the padding rows.
        let padded = Sequences::padded(n, lengths.clone()).unwrap();
        let qs = padded.shape(heads, kv_heads, d);
        let pad = |x: &[f64], hh: usize| {
            let mut out = vec![0.25; lengths.len() * hh * n * d];
            for (s, &len) in lengths.iter().enumerate() {
                let (stride, row) = packed.rows(hh, s);
                for h in 0..hh {
                    let src = (h * stride + row) * d;
                    let dst = (s * hh + h) * n * d;
                    out[dst..dst + len * d].copy_from_slice(&x[src..src + len * d]);
                }
            }
            out
        };
        let gp = fma_backward_varlen(
            (
                &pad(&q, heads),
                &pad(&k, kv_heads),
                &pad(&v, kv_heads),
                &pad(&dout, heads),
            ),
            qs,
            &padded,
            &cfg,
        )
        .unwrap();
        let zero_padding = |x: &[f64], hh: usize| {
            let mut out = pad(x, hh);
            for (s, &len) in lengths.iter().enumerate() {
                for h in 0..hh {
                    let at = (s * hh + h) * n * d;
                    out[at + len * d..at + n * d].fill(0.0);
                }
            }
            out
        };
        assert_eq!(gp.dq, zero_padding(&g.dq, heads));
        assert_eq!(gp.dk, zero_padding(&g.dk, kv_heads));
        assert_eq!(gp.dv, zero_padding(&g.dv, kv_heads));
    }
}
