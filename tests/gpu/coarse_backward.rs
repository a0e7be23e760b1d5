//! The GPU backward of coarse queries (algorithm.md §8 with §6) against the f64 CPU reference
//! (`cpu::fma_backward` with `Queries::Coarse`, itself checked against finite differences) on
//! random inputs with fresh seeds (printed), every gradient buffer poisoned with NaN first.
//!
//! Tolerance: that of every backward test (`common::gradients::TOL` = 2e-4 of each tensor's
//! scale; tests/gpu/backward.rs's header says why). The coarse-query path adds one product of
//! two exponentials per far-field term (exp(s - R) exp(R - LSE_i), both <= 1, see
//! `shaders/backward_coarse_stats.wgsl`), a few ulp more per term, and sums over a row's tokens
//! that the reference does token by token: the measured worst errors are printed and sit
//! ~100x below the bound. A dQ~ that misses its pooling, a far window or a token of a row moves
//! elements by >= 1e-2 of the scale (`coarse_and_fine_query_gradients_differ_and_runs_repeat`
//! shows the two resolutions' gradients are that far apart).

use crate::common::gradients::{backward_poisoned, compare_all, inputs, Inputs};
use crate::common::{gpu, mismatched_subgroup_gpu, random_learned};
use multipole_attn::cpu::{self, widen};
use multipole_attn::geometry::Grid;
use multipole_attn::gpu::{Attention, GpuContext, Host, HostGrad};
use multipole_attn::random::{fresh_seed, normal_tensor};
use multipole_attn::{
    Downsample, FmaConfig, FmaError, Gradients, LearnedWeights, Problem, Queries, Shape,
};

/// The GPU gradients of one case (forward through `train`, backward into poisoned buffers).
fn gpu_gradients(ctx: &GpuContext, cfg: &FmaConfig, x: &Inputs, shape: Shape) -> Gradients<f32> {
    let fma = Attention::fma(ctx, cfg.clone()).expect("config");
    let (_, saved) = fma
        .train(&Problem::new(shape), Host::new(&x.q, &x.k, &x.v))
        .expect("forward");
    backward_poisoned(ctx, &fma, &saved, &x.dout)
}

/// Checks every gradient of one case, the query weights' included; returns the worst scaled
/// error.
fn check(ctx: &GpuContext, seed: u64, shape: Shape, cfg: &FmaConfig) -> f64 {
    let label = format!(
        "seed {seed} {shape} m={} p={} grid={:?} learned={}",
        cfg.block,
        cfg.rank,
        cfg.grid,
        matches!(cfg.downsample, Downsample::Learned(_))
    );
    let x = inputs(seed, shape);
    let g = gpu_gradients(ctx, cfg, &x, shape);
    let r = cpu::fma_backward(
        &widen(&x.q),
        &widen(&x.k),
        &widen(&x.v),
        &widen(&x.dout),
        shape,
        cfg,
    )
    .unwrap();
    compare_all(&label, &g, &r)
}

/// 1D: n = 1, 97 and 1025 (partial windows and sub-windows at every level), p = 1, 2, 4,
/// grouped K/V heads, count correction off once; Average and Learned (random weights, the
/// query weights included).
#[test]
fn coarse_query_gradients_match_the_reference() {
    let Some(ctx) = gpu() else { return };
    let seed = fresh_seed();
    eprintln!("seed {seed}");
    let mut worst = 0.0f64;
    let cases = [
        (Shape::new(1, 1, 1, 8), 4, 2, true),
        (Shape::new(1, 2, 97, 16), 8, 2, true),
        (Shape::new(1, 4, 97, 12).with_kv_heads(2), 4, 4, true),
        (Shape::new(2, 1, 1025, 8), 32, 1, true),
        (Shape::new(1, 1, 200, 8), 16, 2, false),
    ];
    for (i, (shape, m, p, count_correction)) in cases.into_iter().enumerate() {
        for learned in [false, true] {
            let s = seed.wrapping_add(31 * i as u64 + learned as u64);
            let mut cfg = FmaConfig::new(m, p)
                .queries(Queries::Coarse)
                .count_correction(count_correction);
            if learned {
                let w = random_learned(s, shape.head_dim, m, p, shape.seq);
                cfg = cfg.downsample(Downsample::Learned(w));
            }
            worst = worst.max(check(ctx, s, shape, &cfg));
        }
    }
    eprintln!("worst scaled error {worst:.2e}");
}

/// The subgroup kernels' fallbacks (no subgroup has the composed size; see
/// `mismatched_subgroup_gpu`), coarse queries: the coarse rows' per-lane dots and the plain
/// sweeps, d = 40 (more vec4s than lanes) and 12.
#[test]
fn coarse_query_gradients_where_subgroups_are_not_the_composed_size() {
    let Some(ctx) = mismatched_subgroup_gpu() else {
        return;
    };
    let seed = fresh_seed();
    eprintln!("seed {seed}");
    let mut worst = 0.0f64;
    for (i, (shape, m, p)) in [
        (Shape::new(1, 2, 97, 40), 8, 2),
        (Shape::new(1, 1, 130, 12), 4, 4),
    ]
    .into_iter()
    .enumerate()
    {
        let s = seed.wrapping_add(i as u64);
        let w = random_learned(s, shape.head_dim, m, p, shape.seq);
        let cfg = FmaConfig::new(m, p)
            .queries(Queries::Coarse)
            .downsample(Downsample::Learned(w));
        worst = worst.max(check(ctx, s, shape, &cfg));
    }
    eprintln!("fallback paths: worst scaled error {worst:.2e}");
}

/// 2D (algorithm.md §9): a 12 x 10 grid of 2 x 2 cells (partial cells at the right and bottom
/// at coarse levels) and a 9 x 16 grid of 4 x 4 cells, Average and Learned.
#[test]
fn grid_coarse_query_gradients_match_the_reference() {
    let Some(ctx) = gpu() else { return };
    let seed = fresh_seed();
    eprintln!("seed {seed}");
    let mut worst = 0.0f64;
    for (i, (h, w, r, p)) in [(12, 10, 2, 2), (9, 16, 4, 2)].into_iter().enumerate() {
        let grid = Grid::new(h, w);
        let shape = Shape::new(1, 2, h * w, 8);
        for learned in [false, true] {
            let s = seed.wrapping_add(17 * i as u64 + learned as u64);
            let mut cfg = FmaConfig::new(r, p)
                .grid(Some(grid))
                .queries(Queries::Coarse);
            if learned {
                let mut wts = LearnedWeights::box_init_grid_for(8, r, p, grid);
                for (l, lw) in wts.levels.iter_mut().enumerate() {
                    for (k, buf) in [&mut lw.wk, &mut lw.wv, &mut lw.wq, &mut lw.bq]
                        .into_iter()
                        .enumerate()
                    {
                        let noise = normal_tensor(s + 10 * l as u64 + k as u64, buf.len());
                        buf.iter_mut().zip(noise).for_each(|(x, e)| *x += 0.05 * e);
                    }
                }
                cfg = cfg.downsample(Downsample::Learned(wts));
            }
            worst = worst.max(check(ctx, s, shape, &cfg));
        }
    }
    eprintln!("worst scaled error {worst:.2e}");
}

/// Deterministic (no atomics): two runs give the same bits, and the host API the bits of the
/// buffer API. And the coarse-query gradients are not the fine-query ones (a path that
/// silently ran the fine backward would fail here, and against the reference above).
#[test]
fn coarse_and_fine_query_gradients_differ_and_runs_repeat() {
    let Some(ctx) = gpu() else { return };
    let shape = Shape::new(1, 2, 300, 16);
    let x = inputs(fresh_seed(), shape);
    let w = random_learned(3, 16, 8, 2, 300);
    let cfg = FmaConfig::new(8, 2)
        .queries(Queries::Coarse)
        .downsample(Downsample::Learned(w));
    let a = gpu_gradients(ctx, &cfg, &x, shape);
    let b = gpu_gradients(ctx, &cfg, &x, shape);
    assert!(a == b, "two runs differ");
    let fma = Attention::fma(ctx, cfg.clone()).unwrap();
    let (_, saved) = fma
        .train(&Problem::new(shape), Host::new(&x.q, &x.k, &x.v))
        .unwrap();
    let host = fma.backward(&saved, HostGrad(&x.dout)).unwrap();
    assert!(host == a, "the host API differs from the buffer API");
    let fine = gpu_gradients(ctx, &cfg.clone().queries(Queries::Fine), &x, shape);
    let scale = a.dq.iter().fold(0f32, |m, x| m.max(x.abs()));
    let apart =
        a.dq.iter()
            .zip(&fine.dq)
            .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
    assert!(
        apart > 1e-2 * scale,
        "dQ of coarse and fine queries: {apart:e} apart"
    );
    // Fine queries leave the query weights untouched: zero gradients.
    let fw = fine.weights.unwrap();
    assert!(fw
        .iter()
        .all(|l| l.wq.iter().chain(&l.bq).all(|&x| x == 0.0)));
    assert!(a.weights.unwrap()[0].wq.iter().any(|&x| x != 0.0));
}

/// Causal + coarse queries stay a typed error (algorithm.md §6), before any work.
#[test]
fn causal_coarse_query_training_is_refused() {
    let Some(ctx) = gpu() else { return };
    let cfg = FmaConfig::new(4, 2).queries(Queries::Coarse);
    let p = Problem::new(Shape::new(1, 1, 64, 4)).causal(true);
    let x = vec![0.5f32; p.shape.elements()];
    let e = Attention::fma(ctx, cfg)
        .unwrap()
        .train(&p, Host::new(&x, &x, &x))
        .err();
    assert!(matches!(e, Some(FmaError::CausalCoarseQueries)), "{e:?}");
}
