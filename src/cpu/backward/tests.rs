//! The reference gradients against central finite differences of `cpu::fma_forward` in f64.
//!
//! Loss L = sum(dO * O) with a random dO, so dL/dx is exactly what `fma_backward` returns.
//! Inputs and dO are N(0, 1); small shapes with partial last blocks, windows and sub-windows
//! (n = 13, 23 with m = 4, p = 2: three coarse levels, a partial window at each), causal and
//! not, Average and Learned (random weights), count correction on and off.
//!
//! Tolerance: for Q, K, V the step is h = 1e-5, so the O(h^2) truncation error is ~1e-10
//! and the rounding error ~1e-16 / h = 1e-11; we allow 1e-7 + 1e-6 |g|. Weights are f32, so
//! their step is h = 2^-12 taken exactly in f32 and divided by the step actually taken: the
//! truncation error is ~h^2 |L'''| ~ 1e-7; we allow 1e-5 + 1e-4 |g|. A wrong index or a
//! missing term moves a gradient by O(0.1), far beyond both.

use super::fma_backward;
use crate::closeness::is_close;
use crate::cpu::fma_forward;
use crate::random::{fresh_seed, normal_tensor};
use crate::{Downsample, FmaConfig, LearnedWeights, Queries, Shape};

fn loss(q: &[f64], k: &[f64], v: &[f64], dout: &[f64], shape: Shape, cfg: &FmaConfig) -> f64 {
    let o = fma_forward(q, k, v, shape, cfg).expect("forward").o;
    o.iter().zip(dout).map(|(a, b)| a * b).sum()
}

fn randn(seed: u64, len: usize) -> Vec<f64> {
    normal_tensor(seed, len)
        .into_iter()
        .map(f64::from)
        .collect()
}

/// Box weights plus noise so every weight matters and partial windows show.
fn random_weights(seed: u64, d: usize, m: usize, p: usize, n: usize) -> LearnedWeights {
    let mut w = LearnedWeights::box_init_for(d, m, p, n);
    for (l, lw) in w.levels.iter_mut().enumerate() {
        let s = seed + 10 * l as u64;
        for (buf, off, sc) in [
            (&mut lw.wk, 1, 0.3f32),
            (&mut lw.wv, 2, 0.3),
            (&mut lw.bk, 3, 0.2),
            (&mut lw.bv, 4, 0.2),
            (&mut lw.wq, 5, 0.3),
            (&mut lw.bq, 6, 0.2),
        ] {
            let noise = normal_tensor(s + off, buf.len());
            buf.iter_mut().zip(noise).for_each(|(x, e)| *x += sc * e);
        }
    }
    w
}

/// The project's closeness check, the finite difference as the reference.
fn assert_close(what: &str, got: f64, want: f64, atol: f64, rtol: f64) {
    assert!(
        is_close(got, want, atol, rtol),
        "{what}: analytic {got:.12e}, finite difference {want:.12e}"
    );
}

fn check_case(seed: u64, shape: Shape, cfg: &FmaConfig) {
    let label = format!(
        "seed {seed} {shape} m={} p={} {:?} queries causal={} cc={} learned={}",
        cfg.block,
        cfg.rank,
        cfg.queries,
        cfg.causal,
        cfg.count_correction,
        matches!(cfg.downsample, Downsample::Learned(_))
    );
    let len = shape.elements();
    let (q, k, v, dout) = (
        randn(seed, len),
        randn(seed + 1, len),
        randn(seed + 2, len),
        randn(seed + 3, len),
    );
    let g = fma_backward(&q, &k, &v, &dout, shape, cfg).expect("backward");
    let h = 1e-5;
    for (name, x, grad) in [("dQ", &q, &g.dq), ("dK", &k, &g.dk), ("dV", &v, &g.dv)] {
        for idx in 0..len {
            let mut plus = x.clone();
            plus[idx] += h;
            let mut minus = x.clone();
            minus[idx] -= h;
            let (lp, lm) = match name {
                "dQ" => (
                    loss(&plus, &k, &v, &dout, shape, cfg),
                    loss(&minus, &k, &v, &dout, shape, cfg),
                ),
                "dK" => (
                    loss(&q, &plus, &v, &dout, shape, cfg),
                    loss(&q, &minus, &v, &dout, shape, cfg),
                ),
                _ => (
                    loss(&q, &k, &plus, &dout, shape, cfg),
                    loss(&q, &k, &minus, &dout, shape, cfg),
                ),
            };
            let fd = (lp - lm) / (2.0 * h);
            assert_close(
                &format!("{label}: {name}[{idx}]"),
                grad[idx],
                fd,
                1e-7,
                1e-6,
            );
        }
    }
    let Downsample::Learned(w) = &cfg.downsample else {
        assert!(
            g.weights.is_none(),
            "{label}: weight gradients in Average mode"
        );
        return;
    };
    let gw = g
        .weights
        .as_ref()
        .expect("learned mode has weight gradients");
    assert_eq!(gw.len(), w.levels.len());
    let step = 1.0f32 / 4096.0;
    for (li, lg) in gw.iter().enumerate() {
        for kind in 0..6 {
            let (name, grad) = match kind {
                0 => ("k_w", &lg.wk),
                1 => ("k_b", &lg.bk),
                2 => ("v_w", &lg.wv),
                3 => ("v_b", &lg.bv),
                4 => ("q_w", &lg.wq),
                _ => ("q_b", &lg.bq),
            };
            for idx in 0..grad.len() {
                let perturbed = |sign: f32| {
                    let mut w2 = w.clone();
                    let lw = &mut w2.levels[li];
                    let buf = match kind {
                        0 => &mut lw.wk,
                        1 => &mut lw.bk,
                        2 => &mut lw.wv,
                        3 => &mut lw.bv,
                        4 => &mut lw.wq,
                        _ => &mut lw.bq,
                    };
                    buf[idx] += sign * step;
                    let taken = buf[idx];
                    let c = cfg.clone().downsample(Downsample::Learned(w2));
                    (loss(&q, &k, &v, &dout, shape, &c), taken as f64)
                };
                let ((lp, xp), (lm, xm)) = (perturbed(1.0), perturbed(-1.0));
                let fd = (lp - lm) / (xp - xm);
                assert_close(
                    &format!("{label}: {name}{}[{idx}]", li + 1),
                    grad[idx],
                    fd,
                    1e-5,
                    1e-4,
                );
            }
        }
    }
}

#[test]
fn gradients_match_finite_differences() {
    let seed = fresh_seed();
    eprintln!("seed {seed}");
    let mut case = 0u64;
    for (n, d, m, p) in [(13, 3, 4, 2), (23, 2, 4, 1), (1, 3, 4, 2), (9, 2, 2, 2)] {
        for causal in [false, true] {
            for learned in [false, true] {
                let s = seed.wrapping_add(case * 101);
                let mut cfg = FmaConfig::new(m, p).causal(causal);
                if learned {
                    cfg = cfg.downsample(Downsample::Learned(random_weights(s, d, m, p, n)));
                }
                check_case(s, Shape::new(1, 2, n, d), &cfg);
                case += 1;
            }
        }
    }
    let cfg = FmaConfig::new(4, 2).count_correction(false);
    check_case(seed ^ 7, Shape::new(2, 1, 19, 2), &cfg);
}

/// Coarse queries (algorithm.md §6, bidirectional only): the far field's query is pooled, so
/// its gradient reaches dQ through the query pooling and, in Learned mode, dWQ and dbQ.
/// Partial windows and sub-windows at every level (n = 13, 23, 9, 17), p = 1 and 2, two
/// batches, count correction off once.
#[test]
fn coarse_query_gradients_match_finite_differences() {
    let seed = fresh_seed();
    eprintln!("seed {seed}");
    let mut case = 0u64;
    for (shape, m, p) in [
        (Shape::new(1, 2, 13, 3), 4, 2),
        (Shape::new(1, 1, 23, 2), 4, 1),
        (Shape::new(1, 1, 1, 2), 4, 2),
        (Shape::new(2, 1, 9, 2), 2, 2),
    ] {
        for learned in [false, true] {
            let s = seed.wrapping_add(case * 101);
            let mut cfg = FmaConfig::new(m, p).queries(Queries::Coarse);
            if learned {
                let w = random_weights(s, shape.head_dim, m, p, shape.seq);
                cfg = cfg.downsample(Downsample::Learned(w));
            }
            check_case(s, shape, &cfg);
            case += 1;
        }
    }
    let cfg = FmaConfig::new(4, 2)
        .queries(Queries::Coarse)
        .count_correction(false);
    check_case(seed ^ 11, Shape::new(1, 1, 17, 2), &cfg);
}

#[test]
fn extra_weight_levels_get_zero_gradients() {
    // Weights for n = 40 (3 levels at m = 4) used on n = 9 (1 level).
    let (n, d, m, p) = (9, 2, 4, 2);
    let w = random_weights(5, d, m, p, 40);
    let cfg = FmaConfig::new(m, p).downsample(Downsample::Learned(w));
    let shape = Shape::new(1, 1, n, d);
    let x = randn(1, shape.elements());
    let g = fma_backward(&x, &x, &x, &x, shape, &cfg).unwrap();
    let gw = g.weights.unwrap();
    assert_eq!(gw.len(), 3);
    assert!(gw[0].wk.iter().any(|&x| x != 0.0));
    for lg in &gw[1..] {
        assert!(lg.wk.iter().chain(&lg.bk).chain(&lg.wv).all(|&x| x == 0.0));
    }
}

#[test]
fn wrong_dout_shape_is_a_typed_error() {
    let shape = Shape::new(1, 1, 8, 2);
    let x = randn(1, shape.elements());
    let e = fma_backward(&x, &x, &x, &x[1..], shape, &FmaConfig::new(4, 2)).unwrap_err();
    assert!(
        matches!(&e, crate::FmaError::ShapeMismatch { what, .. } if what == "dO"),
        "{e}"
    );
}
