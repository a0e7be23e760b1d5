//! The CPU reference in 2D (algorithm.md §9): what the generic laws of `geometry::cases` do not
//! say. The tiling property and the exactness on flattened far fields run on the grids of
//! `geometry::cases` in `cpu::tests`; here: the configuration's typed errors, the public
//! `fma_forward` choosing the grid, Learned = Average on full cells, dense when L = 0, and the
//! gradients of a 2D FMA (fine queries, Average and Learned) against finite differences.

use super::tests::max_abs_diff;
use super::*;
use crate::config::Downsample;
use crate::geometry::{Grid, GridGeometry};
use crate::random::{fresh_seed, normal_tensor};
use crate::weights::LearnedWeights;

fn inputs(seed: u64, shape: Shape) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    (
        widen(&normal_tensor(seed, shape.elements())),
        widen(&normal_tensor(seed + 1, shape.elements())),
        widen(&normal_tensor(seed + 2, shape.elements())),
    )
}

fn grid_cfg(h: usize, w: usize, r: usize, p: usize) -> FmaConfig {
    FmaConfig::new(r, p).grid(Some(Grid::new(h, w)))
}

#[test]
fn a_grid_that_does_not_fit_is_a_typed_error() {
    let shape = Shape::new(1, 1, 35, 4);
    let x = vec![0.5f64; shape.elements()];
    let run = |cfg: &FmaConfig| fma_forward(&x, &x, &x, shape, cfg).unwrap_err();
    let e = run(&grid_cfg(5, 6, 2, 1));
    assert!(
        matches!(&e, FmaError::ShapeMismatch { what, .. } if what == "grid"),
        "{e}"
    );
    let e = run(&grid_cfg(7, 5, 4, 3));
    assert!(
        matches!(&e, FmaError::InvalidConfig { what: "rank p", .. }),
        "{e}"
    );
    let e = run(&grid_cfg(7, 5, 2, 1).causal(true));
    assert!(matches!(e, FmaError::CausalGrid), "{e}");
    let e = run(&grid_cfg(0, 5, 2, 1));
    assert!(
        matches!(&e, FmaError::InvalidConfig { what: "grid", .. }),
        "{e}"
    );
    // 1D weights on a grid: kernels of s_l and not s_l^2 taps.
    let shape = Shape::new(1, 1, 64, 2);
    let x = vec![0.5f64; shape.elements()];
    let w = LearnedWeights::box_init_for(2, 2, 2, 64);
    let cfg = grid_cfg(8, 8, 2, 2).downsample(Downsample::Learned(w));
    let e = fma_forward(&x, &x, &x, shape, &cfg).unwrap_err();
    assert!(
        matches!(&e, FmaError::Weights(m) if m.contains("k_w1")),
        "{e}"
    );
}

#[test]
fn fma_forward_with_a_grid_is_the_grid_geometry() {
    let seed = fresh_seed();
    let (h, w, r, p) = (13, 11, 2, 2);
    let shape = Shape::new(1, 2, h * w, 4);
    let (q, k, v) = inputs(seed, shape);
    let cfg = grid_cfg(h, w, r, p);
    let got = fma_forward(&q, &k, &v, shape, &cfg).unwrap();
    let g = GridGeometry::new(Grid::new(h, w), r, p);
    let want = fma_forward_in(&g, &q, &k, &v, shape, &cfg).unwrap();
    assert_eq!(got.o, want.o);
    // And not the 1D geometry of the same tokens.
    let line = fma_forward(&q, &k, &v, shape, &FmaConfig::new(r, p)).unwrap();
    assert!(max_abs_diff(&got.o, &line.o) > 1e-4, "seed {seed}");
    // Nor dense attention.
    let dense = dense_attention(&q, &k, &v, shape, false).unwrap();
    assert!(max_abs_diff(&got.o, &dense.o) > 1e-4, "seed {seed}");
}

#[test]
fn a_grid_without_coarse_levels_is_dense() {
    let seed = fresh_seed();
    for (h, w, r) in [(1, 1, 2), (7, 5, 4), (16, 9, 8)] {
        assert_eq!(Grid::new(h, w).num_levels(r), 0);
        let shape = Shape::new(1, 1, h * w, 4);
        let (q, k, v) = inputs(seed, shape);
        let f = fma_forward(&q, &k, &v, shape, &grid_cfg(h, w, r, 1)).unwrap();
        let d = dense_attention(&q, &k, &v, shape, false).unwrap();
        assert!(max_abs_diff(&f.o, &d.o) < 1e-12, "seed {seed} {h}x{w}");
    }
}

#[test]
fn box_initialised_learned_equals_average_on_full_cells() {
    let seed = fresh_seed();
    let (h, w, r, p, d) = (32, 48, 4, 2, 3);
    let shape = Shape::new(1, 1, h * w, d);
    let (q, k, v) = inputs(seed, shape);
    let avg = fma_forward(&q, &k, &v, shape, &grid_cfg(h, w, r, p)).unwrap();
    let lw = LearnedWeights::box_init_grid_for(d, r, p, Grid::new(h, w));
    assert_eq!(lw.levels.len(), 3);
    let cfg = grid_cfg(h, w, r, p).downsample(Downsample::Learned(lw));
    let lrn = fma_forward(&q, &k, &v, shape, &cfg).unwrap();
    assert!(max_abs_diff(&avg.o, &lrn.o) < 1e-12, "seed {seed}");
}

/// dQ, dK, dV and the 2D weight gradients of a small grid with partial cells against central
/// differences (the tolerances of `cpu::backward::tests`, which this mirrors: h = 1e-5 for the
/// inputs, 1e-7 + 1e-6 |g|; the f32 weights step by 2^-12, 1e-5 + 1e-4 |g|).
#[test]
fn grid_gradients_match_finite_differences() {
    let seed = fresh_seed();
    let (h, w, r, p, d) = (9, 7, 2, 2, 2);
    let shape = Shape::new(1, 1, h * w, d);
    let (q, k, v) = inputs(seed, shape);
    let dout = widen(&normal_tensor(seed + 3, shape.elements()));
    let mut lw = LearnedWeights::box_init_grid_for(d, r, p, Grid::new(h, w));
    for (l, level) in lw.levels.iter_mut().enumerate() {
        for (i, buf) in [&mut level.wk, &mut level.wv, &mut level.bk, &mut level.bv]
            .into_iter()
            .enumerate()
        {
            let noise = normal_tensor(seed + 10 + 5 * l as u64 + i as u64, buf.len());
            buf.iter_mut().zip(noise).for_each(|(x, e)| *x += 0.3 * e);
        }
    }
    for cfg in [
        grid_cfg(h, w, r, p),
        grid_cfg(h, w, r, p).downsample(Downsample::Learned(lw)),
    ] {
        let loss = |q: &[f64], k: &[f64], v: &[f64], cfg: &FmaConfig| -> f64 {
            let o = fma_forward(q, k, v, shape, cfg).unwrap().o;
            o.iter().zip(&dout).map(|(a, b)| a * b).sum()
        };
        let g = fma_backward(&q, &k, &v, &dout, shape, &cfg).unwrap();
        let step = 1e-5;
        for (which, grad) in [(0, &g.dq), (1, &g.dk), (2, &g.dv)] {
            for idx in 0..shape.elements() {
                let at = |sign: f64| {
                    let mut x = [q.clone(), k.clone(), v.clone()];
                    x[which][idx] += sign * step;
                    loss(&x[0], &x[1], &x[2], &cfg)
                };
                let fd = (at(1.0) - at(-1.0)) / (2.0 * step);
                assert!(
                    crate::closeness::is_close(grad[idx], fd, 1e-7, 1e-6),
                    "seed {seed} tensor {which} [{idx}]: {} vs {fd}",
                    grad[idx]
                );
            }
        }
        let Downsample::Learned(w0) = &cfg.downsample else {
            continue;
        };
        let gw = g.weights.as_ref().unwrap();
        let step = 1.0f32 / 4096.0;
        for (li, lg) in gw.iter().enumerate() {
            assert_eq!(lg.wk.len(), d * p * (r << li) * (r << li));
            for (kind, grad) in [(0, &lg.wk), (1, &lg.bk), (2, &lg.wv), (3, &lg.bv)] {
                for idx in 0..grad.len() {
                    let at = |sign: f32| {
                        let mut w2 = w0.clone();
                        let lv = &mut w2.levels[li];
                        let buf = [&mut lv.wk, &mut lv.bk, &mut lv.wv, &mut lv.bv]
                            .into_iter()
                            .nth(kind)
                            .unwrap();
                        buf[idx] += sign * step;
                        let taken = buf[idx] as f64;
                        let c = cfg.clone().downsample(Downsample::Learned(w2));
                        (loss(&q, &k, &v, &c), taken)
                    };
                    let ((lp, xp), (lm, xm)) = (at(1.0), at(-1.0));
                    let fd = (lp - lm) / (xp - xm);
                    assert!(
                        crate::closeness::is_close(grad[idx], fd, 1e-5, 1e-4),
                        "seed {seed} level {} kind {kind} [{idx}]: {} vs {fd}",
                        li + 1,
                        grad[idx]
                    );
                }
            }
        }
    }
}
