//! The backward of exact dense attention in f64: the oracle of the GPU's dense backward
//! (`shaders/dense_backward_dkv.wgsl`, `shaders/dense_backward_dq.wgsl`, with D from
//! `shaders/backward_delta.wgsl`).
//!
//! With P_ij = exp(q_i . k_j / sqrt(d) - LSE_i) the softmax weight of key j for query i and
//! D_i = dO_i . O_i: dS_ij = P_ij (dO_i . v_j - D_i); dQ_i = sum_j dS_ij k_j / sqrt(d);
//! dK_j = sum_i dS_ij q_i / sqrt(d); dV_j = sum_i P_ij dO_i, the sums over the pairs (i, j)
//! the forward attended (causal, bottom-right aligned: j <= i + seq_kv - seq). A row that sees
//! no key (causal, seq_kv < seq) has O = 0 and contributes nothing.

use crate::error::Result;
use crate::gradients::Gradients;
use crate::shape::Shape;

use super::checks::check_inputs;
use super::variants::RowRules;
use super::{dense_attention_with, dot, visible_keys};
use crate::variants::Variants;

/// Gradients of `L = sum(dO * O)` with `O = cpu::dense_attention(q, k, v, shape, causal).o`:
/// `q`, `dout` of shape (batch, heads, seq, head_dim), `k`, `v` of (batch, kv_heads, seq_kv,
/// head_dim). dQ has Q's shape; dK and dV have K's, each K/V head's gradient the sum over its
/// group of query heads (grouped-query attention). `weights` is `None`: dense attention has
/// no learned weights.
pub fn dense_backward(
    q: &[f64],
    k: &[f64],
    v: &[f64],
    dout: &[f64],
    shape: Shape,
    causal: bool,
) -> Result<Gradients<f64>> {
    dense_backward_with(q, k, v, dout, shape, causal, &Variants::default())
}

/// [`dense_backward`] of [`super::dense_attention_with`]: through the softcap
/// (dl/draw = 1 - tanh^2(raw / C)), and with sinks `dsinks` (heads,): the sink of head h gets
/// -sum_i P_sink,i D_i over its rows, P_sink,i = exp(S_h - LSE_i) (the sink's weight in row
/// i's softmax, whose value is zero, so dS = P (0 - D)).
pub fn dense_backward_with(
    q: &[f64],
    k: &[f64],
    v: &[f64],
    dout: &[f64],
    shape: Shape,
    causal: bool,
    variants: &Variants,
) -> Result<Gradients<f64>> {
    check_inputs(q, k, v, shape)?;
    shape.check_len("dO", dout.len())?;
    let fwd = dense_attention_with(q, k, v, shape, causal, variants)?;
    let rules = RowRules::new(variants);
    let mut dsinks = variants.sinks.as_ref().map(|s| vec![0f64; s.len()]);
    let (n, n_kv, d) = (shape.seq, shape.seq_kv, shape.head_dim);
    let scale = 1.0 / (d as f64).sqrt();
    let mut dq = vec![0f64; shape.elements()];
    let mut dk = vec![0f64; shape.kv_elements()];
    let mut dv = vec![0f64; shape.kv_elements()];
    for bh in 0..shape.batch_heads() {
        let kv = (bh / shape.group()) * n_kv * d;
        for i in 0..n {
            let row = bh * n + i;
            let at = row * d..(row + 1) * d;
            let (qi, doi) = (&q[at.clone()], &dout[at.clone()]);
            let last = if causal {
                visible_keys(i, n, n_kv)
            } else {
                n_kv
            };
            let delta = dot(doi, &fwd.o[at.clone()]);
            let lse = fwd.lse[row];
            if let (Some(ds), Some(sink)) = (dsinks.as_mut(), rules.sink(bh % shape.heads)) {
                ds[bh % shape.heads] -= (sink - lse).exp() * delta;
            }
            let pos = i as i64 + n_kv as i64 - n as i64;
            for t in (0..last).filter(|&t| rules.sees(pos, t)) {
                let key = kv + t * d..kv + (t + 1) * d;
                let (kt, vt) = (&k[key.clone()], &v[key.clone()]);
                let raw = dot(qi, kt) * scale;
                let p = (rules.logit(raw) - lse).exp();
                // Through the cap: the gradient of the raw score.
                let ds = p * (dot(doi, vt) - delta) * rules.slope(raw);
                for c in 0..d {
                    dq[at.start + c] += ds * kt[c] * scale;
                    dk[key.start + c] += ds * qi[c] * scale;
                    dv[key.start + c] += p * doi[c];
                }
            }
        }
    }
    Ok(Gradients {
        dq,
        dk,
        dv,
        weights: None,
        dsinks,
    })
}

#[cfg(test)]
mod tests {
    //! Against central finite differences of `cpu::dense_attention` in f64, loss
    //! L = sum(dO * O) with a random dO. Step h = 1e-5: truncation ~h^2 |L'''| ~ 1e-10,
    //! rounding ~1e-16 / h = 1e-11; we allow 1e-7 + 1e-6 |g|. A wrong index, a missing
    //! term or a key seen on the wrong side of the causal diagonal moves a gradient by O(0.1).

    use super::*;
    use crate::closeness::is_close;
    use crate::cpu::dense_attention;
    use crate::random::{fresh_seed, normal_tensor};

    fn randn(seed: u64, len: usize) -> Vec<f64> {
        normal_tensor(seed, len)
            .into_iter()
            .map(f64::from)
            .collect()
    }

    fn loss(x: [&[f64]; 4], shape: Shape, causal: bool) -> f64 {
        let o = dense_attention(x[0], x[1], x[2], shape, causal).unwrap().o;
        o.iter().zip(x[3]).map(|(a, b)| a * b).sum()
    }

    fn check_case(seed: u64, shape: Shape, causal: bool) {
        let (q, k, v, dout) = (
            randn(seed, shape.elements()),
            randn(seed + 1, shape.kv_elements()),
            randn(seed + 2, shape.kv_elements()),
            randn(seed + 3, shape.elements()),
        );
        let g = dense_backward(&q, &k, &v, &dout, shape, causal).unwrap();
        let h = 1e-5;
        for (which, grad) in [(0, &g.dq), (1, &g.dk), (2, &g.dv)] {
            let mut x = [q.clone(), k.clone(), v.clone()];
            for idx in 0..grad.len() {
                let x0 = x[which][idx];
                x[which][idx] = x0 + h;
                let up = loss([&x[0], &x[1], &x[2], &dout], shape, causal);
                x[which][idx] = x0 - h;
                let down = loss([&x[0], &x[1], &x[2], &dout], shape, causal);
                x[which][idx] = x0;
                let fd = (up - down) / (2.0 * h);
                assert!(
                    is_close(grad[idx], fd, 1e-7, 1e-6),
                    "seed {seed} {shape} causal={causal} {}[{idx}]: analytic {:.12e}, \
                     finite difference {fd:.12e}",
                    ["dQ", "dK", "dV"][which],
                    grad[idx]
                );
            }
        }
    }

    /// Self-attention, cross-length both ways (causal with seq_kv < seq leaves rows with no
    /// key), grouped-query heads (a K/V head's gradient sums its group), n = 1.
    #[test]
    fn gradients_match_finite_differences() {
        let seed = fresh_seed();
        eprintln!("seed {seed}");
        let shapes = [
            Shape::new(1, 2, 7, 3),
            Shape::new(1, 1, 1, 2),
            Shape::cross(1, 2, 5, 9, 3),
            Shape::cross(2, 1, 8, 3, 2),
            Shape::cross(1, 4, 6, 7, 2).with_kv_heads(2),
            Shape::new(1, 3, 5, 2).with_kv_heads(1),
        ];
        for (c, shape) in shapes.into_iter().enumerate() {
            for causal in [false, true] {
                check_case(
                    seed.wrapping_add(10 * c as u64 + causal as u64),
                    shape,
                    causal,
                );
            }
        }
    }

    /// Causal with fewer keys than queries: the first seq - seq_kv rows see no key, so their
    /// forward is O = 0, LSE = -inf and they take no gradient at all.
    #[test]
    fn rows_without_keys_are_zero_and_take_no_gradient() {
        let shape = Shape::cross(1, 1, 6, 2, 3);
        let seed = fresh_seed();
        let (q, k, v, dout) = (
            randn(seed, shape.elements()),
            randn(seed + 1, shape.kv_elements()),
            randn(seed + 2, shape.kv_elements()),
            randn(seed + 3, shape.elements()),
        );
        let fwd = dense_attention(&q, &k, &v, shape, true).unwrap();
        let g = dense_backward(&q, &k, &v, &dout, shape, true).unwrap();
        let d = shape.head_dim;
        // Row 5 sees two keys: its dQ is not zero (row 4's single key gives P = 1, dS = 0).
        assert!(g.dq[5 * d..6 * d].iter().any(|&x| x != 0.0));
        for i in 0..6 {
            let row = i * d..(i + 1) * d;
            if i < 4 {
                assert_eq!(fwd.lse[i], f64::NEG_INFINITY, "row {i}");
                assert!(fwd.o[row.clone()].iter().all(|&x| x == 0.0), "row {i}");
                assert!(g.dq[row].iter().all(|&x| x == 0.0), "row {i}");
            } else {
                assert!(fwd.lse[i].is_finite(), "row {i}");
            }
        }
    }

    #[test]
    fn bad_input_is_a_typed_error() {
        let shape = Shape::new(1, 1, 4, 2);
        let x = vec![0.0; shape.elements()];
        assert!(dense_backward(&x, &x, &x, &x[1..], shape, false).is_err());
        assert!(dense_backward(&x, &x[1..], &x, &x, shape, false).is_err());
    }
}
