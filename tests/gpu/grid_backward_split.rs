//! The backward of ONE 2D head longer than one storage binding (issue 27; `BackwardSplitPlan`
//! on a grid, algorithm.md §9): with the library capped at a small binding
//! (`Attention::max_binding`, on the shared context, so both runs use the same kernels) a head
//! is bound in chunks of whole rows of fine cells with one row of cells of halo above and below
//! (the test asserts how many chunks, so it cannot pass by not splitting). Against the
//! unsplit run (the default binding, every gradient buffer poisoned with NaN) on the same
//! context:
//! - O, the LSE and dQ: the same bits (the forward split is bitwise; dQ of a chunk's cells
//!   reads its bound rows, the 3 x 3 cells around each, and the whole coarse K~, V~, with the
//!   unsplit float operations);
//! - dK, dV: within WTOL = 1e-5 of the scale (max(1, max|g|); `common::gradients::regrouped`).
//!   Why not bitwise: a coarse row's sum over a reader chunk (256 gathered queries: far cells
//!   in run order, each cell's tokens in raster order) whose queries lie in several token
//!   chunks is added as one part per token chunk, in chunk order, and a grouped-query K/V
//!   head's gradients are summed over its query heads on the host in head order: regroupings
//!   of the same f32 terms, a few roundings of 2^-24 of partial sums within a few times the
//!   scale. A token chunk's readers missing or counted twice, or a cell read from the wrong
//!   bound row, moves an element by its share of the sum, far above WTOL.
//!
//! The split run's gradients come back from the executor's own chunk buffers, which wgpu
//! zero-fills: an element no pass wrote reads +0, so every element is also checked to be
//! finite and non-zero (N(0, 1) inputs make an exact 0 gradient all but impossible), besides
//! equal to the NaN-poisoned unsplit run. The split run is bitwise the same twice, and within
//! the backward tolerance of the f64 reference (`common::gradients::TOL`).
//! Grids: 7 x 13 (wide, partial cells at the bottom and right edges), 13 x 7 (tall), 17 x 29,
//! a batch of 2, a GQA group of 2 on 20 x 24, 45 x 70 in 12 chunks (whose head's LSE and D
//! exceed the binding: they are bound per chunk), and a browser's limits (no subgroups: the coarse
//! pass's two-phase path). What stays refused is a typed error: coarse queries, a grid of one
//! row of cells (1 x N), a single column (N x 1: dK~'s rows with one window's reader-chunk
//! partial sums outgrow the binding first; more windows' run in groups of rows:
//! `backward_split_coarse_rows.rs`).

use crate::common::gradients::{gpu_gradients, inputs};
use crate::common::split::{bitwise_but_sums, SplitCase};
use crate::common::{browser_like_gpu, gpu};
use multipole_attn::gpu::{Attention, GpuContext, Host};
use multipole_attn::plan::KernelLimits;
use multipole_attn::random::fresh_seed;
use multipole_attn::{FmaConfig, FmaError, Grid, Method, Problem, Queries, Shape};

/// One case: (H, W, r, p, shape, binding cap of the split run, chunks per head under it).
type Case = (usize, usize, usize, usize, Shape, u64, usize);

fn cases() -> Vec<Case> {
    vec![
        // d = 4: a binding of 1280 B holds 80 rows; rows of cells of 26 tokens, one a chunk.
        (7, 13, 2, 1, Shape::new(1, 1, 91, 4), 1280, 4),
        // Tall, d = 8, a batch of two heads (each split on its own).
        (13, 7, 2, 1, Shape::new(2, 1, 91, 8), 2048, 4),
        (17, 29, 4, 2, Shape::new(1, 1, 493, 8), 12 << 10, 5),
        // A GQA group of 2: each query head split, the K/V head's gradients summed on the host.
        (
            20,
            24,
            4,
            2,
            Shape::new(1, 2, 480, 8).with_kv_heads(1),
            12 << 10,
            3,
        ),
        // d = 4, 3150 tokens: the head's LSE and D (25 200 B) exceed the 16 KiB binding too;
        // each chunk binds its own. One row of cells (280 tokens) per chunk.
        (45, 70, 4, 1, Shape::new(1, 1, 3150, 4), 16 << 10, 12),
    ]
}

/// Every element finite and not +-0: an element of the zero-filled chunk buffers that no pass
/// wrote would read +0.
fn all_written(label: &str, name: &str, g: &[f32]) {
    let bad = g.iter().position(|x| !x.is_finite() || *x == 0.0);
    assert!(
        bad.is_none(),
        "{label}: {name}[{bad:?}] unwritten or not finite"
    );
}

/// One case on `ctx`: the split run against the unsplit one, itself and the f64 reference;
/// returns the worst dK/dV difference from the unsplit run (of the scale).
fn check(ctx: &GpuContext, seed: u64, (h, w, r, p, shape, cap, chunks): Case) -> f64 {
    let grid = Grid::new(h, w);
    let cfg = FmaConfig::new(r, p).grid(Some(grid));
    let label = format!("seed {seed} {shape} grid {grid} r={r} p={p} binding {cap}");
    let c = SplitCase::new(
        ctx,
        label,
        seed,
        (&Method::Fma(cfg), &Problem::new(shape)),
        cap,
    );
    let label = &c.label;
    // The split run cannot pass by not splitting: one head's backward is over the binding,
    // and the head is `chunks` chunks.
    let plan = c.one_head_split(&KernelLimits::from_wgpu(&ctx.limits).capped(cap));
    assert_eq!(plan.split.chunks.len(), chunks, "{label}: chunks");
    let (x, problem) = (&c.x, &c.problem);
    let (out_u, _) = c
        .whole
        .train(problem, Host::new(&x.q, &x.k, &x.v))
        .expect("train");
    let g_u = gpu_gradients(ctx, &c.whole, x, problem);
    let (out_s, g_s) = c.split();
    for (name, g) in [("dQ", &g_s.dq), ("dK", &g_s.dk), ("dV", &g_s.dv)] {
        all_written(label, name, g);
    }
    let worst = bitwise_but_sums(label, (&out_s, &g_s), (&out_u, &g_u), false);
    assert!(g_s.weights.is_none(), "{label}");
    c.assert_repeatable(&out_s, &g_s);
    let to_ref = c.against_reference(&g_s);
    let bitwise = g_s.dk == g_u.dk && g_s.dv == g_u.dv;
    eprintln!(
        "{label}: {chunks} chunks, dK/dV vs unsplit {worst:.2e} (bitwise: {bitwise}), against \
         f64 {to_ref:.2e}"
    );
    worst
}

#[test]
fn one_grid_head_over_a_binding_splits_its_backward_and_matches_unsplit() {
    let Some(ctx) = gpu() else { return };
    let seed = fresh_seed();
    eprintln!("seed {seed}");
    let mut worst = 0.0f64;
    for (i, case) in cases().into_iter().enumerate() {
        worst = worst.max(check(ctx, seed.wrapping_add(i as u64 * 7919), case));
    }
    eprintln!("worst dK/dV difference {worst:.2e} of the scale");
}

#[test]
fn the_plain_kernels_split_a_grid_head_too() {
    // A browser's limits: no subgroups, so the coarse dK~/dV~ pass takes its two-phase path
    // (out-of-chunk readers staged as zeros with P = 0) rather than the subgroup walk.
    let Some(ctx) = browser_like_gpu() else {
        return;
    };
    let seed = fresh_seed();
    eprintln!("seed {seed}");
    for (i, case) in cases().into_iter().take(3).enumerate() {
        check(ctx, seed.wrapping_add(i as u64), case);
    }
}

#[test]
fn what_a_split_grid_backward_does_not_run_is_a_typed_error() {
    let Some(ctx) = gpu() else { return };
    let seed = fresh_seed();
    let refused = |h: usize, w: usize, cfg: FmaConfig, d: usize, cap: u64, word: &str| {
        let shape = Shape::new(1, 1, h * w, d);
        let x = inputs(seed, shape);
        let fma = Attention::fma(ctx, cfg.grid(Some(Grid::new(h, w))))
            .unwrap()
            .max_binding(cap)
            .unwrap();
        let e = fma
            .train(&Problem::new(shape), Host::new(&x.q, &x.k, &x.v))
            .expect_err(word);
        assert!(
            matches!(&e, FmaError::LimitExceeded { what, .. } if what.contains(word)),
            "{h}x{w}: {e}"
        );
    };
    // Coarse queries: the 2D forward splits them, their backward does not yet.
    refused(
        17,
        29,
        FmaConfig::new(4, 2).queries(Queries::Coarse),
        8,
        12 << 10,
        "coarse queries",
    );
    // One row of cells (1 x N) cannot be cut into rows of cells.
    refused(
        1,
        3150,
        FmaConfig::new(16, 1),
        4,
        16 << 10,
        "row of fine cells",
    );
    // A single column (N x 1): dK~'s rows and one window's partial sums outgrow the binding.
    refused(97, 1, FmaConfig::new(4, 1), 8, 4 << 10, "partial sums");
}
