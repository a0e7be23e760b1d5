//! The softmax variants of issue 30 in the reference (docs/variants.md): each against an
//! independent statement of what it means, and the gradients against central finite
//! differences (as `backward/tests.rs`).
//!
//! Forward laws, exact up to f64 rounding (we allow 1e-12): a softcap far above every logit
//! changes nothing measurable (C = 1e6: tanh(x) = x - x^3/3, relative change ~1e-12 for |l| < 10,
//! so 1e-9 is allowed there); a sink S scales a row's plain output by exp(LSE - LSE') with
//! LSE' = logaddexp(LSE, S); FMA with a window whose band fits the near field equals dense
//! attention with the same window.
//!
//! Gradients: Q, K, V as `backward/tests.rs` (h = 1e-5, 1e-7 + 1e-6 |g|). The sinks are f32,
//! so their step is h = 2^-12, divided by the step actually taken in f32; the truncation error
//! is ~h^2 |L'''| ~ 1e-7, we allow 1e-6 + 1e-5 |g|. A missing cap slope or sink term moves a
//! gradient by O(0.1).

use crate::closeness::is_close;
use crate::cpu::{
    dense_attention, dense_attention_with, dense_backward_with, fma_backward, fma_forward,
};
use crate::random::{fresh_seed, normal_tensor};
use crate::{FmaConfig, Shape, Variants, Window};

fn randn(seed: u64, len: usize) -> Vec<f64> {
    normal_tensor(seed, len)
        .into_iter()
        .map(f64::from)
        .collect()
}

fn inputs(seed: u64, shape: Shape) -> [Vec<f64>; 4] {
    [
        randn(seed, shape.elements()),
        randn(seed + 1, shape.kv_elements()),
        randn(seed + 2, shape.kv_elements()),
        randn(seed + 3, shape.elements()),
    ]
}

fn sinks(seed: u64, heads: usize) -> Vec<f32> {
    normal_tensor(seed + 7, heads)
}

/// The forward and backward of one problem: dense (`causal`) or FMA (`Some(cfg)`).
struct Problem {
    shape: Shape,
    causal: bool,
    fma: Option<FmaConfig>,
}

impl Problem {
    fn loss(&self, x: &[Vec<f64>; 4], v: &Variants) -> f64 {
        let o = match &self.fma {
            None => {
                dense_attention_with(&x[0], &x[1], &x[2], self.shape, self.causal, v)
                    .unwrap()
                    .o
            }
            Some(cfg) => {
                let cfg = cfg.clone().variants(v.clone());
                fma_forward(&x[0], &x[1], &x[2], self.shape, &cfg)
                    .unwrap()
                    .o
            }
        };
        o.iter().zip(&x[3]).map(|(a, b)| a * b).sum()
    }

    fn grads(&self, x: &[Vec<f64>; 4], v: &Variants) -> crate::Gradients<f64> {
        match &self.fma {
            None => {
                dense_backward_with(&x[0], &x[1], &x[2], &x[3], self.shape, self.causal, v).unwrap()
            }
            Some(cfg) => {
                let cfg = cfg.clone().variants(v.clone());
                fma_backward(&x[0], &x[1], &x[2], &x[3], self.shape, &cfg).unwrap()
            }
        }
    }

    fn check(&self, seed: u64, v: &Variants) {
        let label = format!(
            "seed {seed} {} causal={} fma={:?} {v:?}",
            self.shape,
            self.causal,
            self.fma.as_ref().map(|c| (c.block, c.rank))
        );
        let mut x = inputs(seed, self.shape);
        let g = self.grads(&x, v);
        let h = 1e-5;
        for (which, grad) in [(0, &g.dq), (1, &g.dk), (2, &g.dv)] {
            for idx in 0..grad.len() {
                let x0 = x[which][idx];
                x[which][idx] = x0 + h;
                let up = self.loss(&x, v);
                x[which][idx] = x0 - h;
                let down = self.loss(&x, v);
                x[which][idx] = x0;
                let fd = (up - down) / (2.0 * h);
                assert!(
                    is_close(grad[idx], fd, 1e-7, 1e-6),
                    "{label} {}[{idx}]: analytic {:.12e}, finite difference {fd:.12e}",
                    ["dQ", "dK", "dV"][which],
                    grad[idx]
                );
            }
        }
        match (&v.sinks, &g.dsinks) {
            (None, None) => {}
            (Some(s), Some(ds)) => {
                assert_eq!(ds.len(), s.len(), "{label}");
                let step = 2f32.powi(-12);
                for (hd, &analytic) in ds.iter().enumerate() {
                    let mut vu = v.clone();
                    let mut vd = v.clone();
                    vu.sinks.as_mut().unwrap()[hd] += step;
                    vd.sinks.as_mut().unwrap()[hd] -= step;
                    let taken = f64::from(vu.sinks.as_ref().unwrap()[hd])
                        - f64::from(vd.sinks.as_ref().unwrap()[hd]);
                    let fd = (self.loss(&x, &vu) - self.loss(&x, &vd)) / taken;
                    assert!(
                        is_close(analytic, fd, 1e-6, 1e-5),
                        "{label} dsinks[{hd}]: analytic {analytic:.12e}, finite difference \
                         {fd:.12e}"
                    );
                }
            }
            other => panic!("{label}: dsinks {other:?}"),
        }
    }
}

fn cap(c: f32) -> Variants {
    Variants {
        softcap: Some(c),
        ..Variants::default()
    }
}

fn window(left: usize, right: usize) -> Window {
    Window { left, right }
}

/// Dense: self-attention, cross-length both ways (rows with no key), GQA, n = 1; every
/// variant alone and combined.
#[test]
fn dense_gradients_match_finite_differences() {
    let seed = fresh_seed();
    eprintln!("seed {seed}");
    let shapes = [
        Shape::new(1, 2, 7, 3),
        Shape::new(1, 1, 1, 2),
        Shape::cross(1, 2, 5, 9, 3),
        Shape::cross(1, 2, 8, 3, 2),
        Shape::new(1, 4, 6, 2).with_kv_heads(2),
    ];
    for (c, shape) in shapes.into_iter().enumerate() {
        for causal in [false, true] {
            let s = seed.wrapping_add(100 * c as u64 + causal as u64);
            let right = if causal { 0 } else { 1 };
            let variants = [
                cap(0.8),
                Variants {
                    sinks: Some(sinks(s, shape.heads)),
                    ..Variants::default()
                },
                Variants {
                    window: Some(window(2, right)),
                    ..Variants::default()
                },
                Variants {
                    softcap: Some(1.3),
                    sinks: Some(sinks(s, shape.heads)),
                    window: Some(window(1, right)),
                },
            ];
            for v in &variants {
                Problem {
                    shape,
                    causal,
                    fma: None,
                }
                .check(s, v);
            }
        }
    }
}

/// FMA with three coarse levels (n = 23, m = 4, p = 2: partial windows), causal and not, GQA:
/// softcap (fine and coarse logits), sinks, both; a window in the near field with each.
#[test]
fn fma_gradients_match_finite_differences() {
    let seed = fresh_seed();
    eprintln!("seed {seed}");
    for (c, shape) in [
        Shape::new(1, 2, 23, 3),
        Shape::new(1, 2, 13, 2).with_kv_heads(1),
    ]
    .into_iter()
    .enumerate()
    {
        for causal in [false, true] {
            let s = seed.wrapping_add(100 * c as u64 + causal as u64);
            let cfg = FmaConfig::new(4, 2).causal(causal);
            let right = if causal { 0 } else { 4 };
            let variants = [
                cap(0.8),
                Variants {
                    sinks: Some(sinks(s, shape.heads)),
                    ..Variants::default()
                },
                Variants {
                    softcap: Some(1.1),
                    sinks: Some(sinks(s, shape.heads)),
                    window: None,
                },
                Variants {
                    softcap: Some(1.1),
                    sinks: Some(sinks(s, shape.heads)),
                    window: Some(window(3, right)),
                },
            ];
            for v in &variants {
                Problem {
                    shape,
                    causal,
                    fma: Some(cfg.clone()),
                }
                .check(s, v);
            }
        }
    }
}

/// A softcap far above the logits is the plain softmax; a sink rescales each row of the plain
/// output and joins its LSE; in FMA the same holds for FMA's one softmax.
#[test]
fn softcap_and_sinks_against_the_plain_softmax() {
    let seed = fresh_seed();
    eprintln!("seed {seed}");
    let shape = Shape::cross(2, 2, 9, 11, 4);
    let [q, k, v, _] = inputs(seed, shape);
    for causal in [false, true] {
        let plain = dense_attention(&q, &k, &v, shape, causal).unwrap();
        let capped = dense_attention_with(&q, &k, &v, shape, causal, &cap(1e6)).unwrap();
        for (a, b) in plain.o.iter().zip(&capped.o) {
            assert!(is_close(*b, *a, 1e-9, 1e-9), "seed {seed}: {b} vs {a}");
        }
        let s = sinks(seed, shape.heads);
        let with = Variants {
            sinks: Some(s.clone()),
            ..Variants::default()
        };
        let sunk = dense_attention_with(&q, &k, &v, shape, causal, &with).unwrap();
        for row in 0..shape.rows() {
            let sink = f64::from(s[(row / shape.seq) % shape.heads]);
            let lse = plain.lse[row];
            let want =
                lse.max(sink) + ((lse - lse.max(sink)).exp() + (sink - lse.max(sink)).exp()).ln();
            assert!(
                is_close(sunk.lse[row], want, 1e-12, 1e-12),
                "seed {seed} row {row}"
            );
            let d = shape.head_dim;
            for c in row * d..(row + 1) * d {
                let o = plain.o[c] * (lse - want).exp();
                assert!(is_close(sunk.o[c], o, 1e-12, 1e-12), "seed {seed} at {c}");
            }
        }
    }
}

/// FMA with a window inside its near field is exactly dense attention with the window (the
/// coarse levels are off); a window wider than the near field is a typed error, as are a
/// window with R > 0 under the causal mask, coarse queries with a variant and a window on a
/// grid.
#[test]
fn fma_window_is_dense_window() {
    let seed = fresh_seed();
    eprintln!("seed {seed}");
    for (n, m, w) in [
        (97, 8, window(8, 5)),
        (40, 4, window(0, 4)),
        (1, 4, window(3, 0)),
    ] {
        for causal in [false, true] {
            let w = if causal { window(w.left, 0) } else { w };
            let shape = Shape::new(1, 3, n, 4).with_kv_heads(1);
            let [q, k, v, _] = inputs(seed + n as u64, shape);
            let var = Variants {
                window: Some(w),
                sinks: Some(sinks(seed, 3)),
                softcap: Some(2.0),
            };
            let cfg = FmaConfig::new(m, 2).causal(causal).variants(var.clone());
            let fma = fma_forward(&q, &k, &v, shape, &cfg).unwrap();
            let dense = dense_attention_with(&q, &k, &v, shape, causal, &var).unwrap();
            for (a, b) in fma
                .o
                .iter()
                .zip(&dense.o)
                .chain(fma.lse.iter().zip(&dense.lse))
            {
                assert!(is_close(*a, *b, 1e-12, 1e-12), "seed {seed} n={n} {w:?}");
            }
        }
    }
    let shape = Shape::new(1, 1, 64, 4);
    let x = vec![0.0; shape.elements()];
    let too_wide = FmaConfig::new(8, 2).variants(Variants {
        window: Some(window(9, 0)),
        ..Variants::default()
    });
    assert!(fma_forward(&x, &x, &x, shape, &too_wide).is_err());
    let causal_right = FmaConfig::new(8, 2).causal(true).variants(Variants {
        window: Some(window(2, 1)),
        ..Variants::default()
    });
    assert!(fma_forward(&x, &x, &x, shape, &causal_right).is_err());
    let coarse = FmaConfig::new(8, 2)
        .queries(crate::Queries::Coarse)
        .variants(cap(5.0));
    assert!(fma_forward(&x, &x, &x, shape, &coarse).is_err());
    let grid = FmaConfig::new(4, 2)
        .grid(Some(crate::Grid { h: 8, w: 8 }))
        .variants(Variants {
            window: Some(window(1, 1)),
            ..Variants::default()
        });
    assert!(fma_forward(&x, &x, &x, shape, &grid).is_err());
    let bad_sinks = FmaConfig::new(8, 2).variants(Variants {
        sinks: Some(vec![0.0; 2]),
        ..Variants::default()
    });
    assert!(fma_forward(&x, &x, &x, shape, &bad_sinks).is_err());
}
