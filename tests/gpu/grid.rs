//! 2D FMA (algorithm.md §9) on the GPU against the f64 CPU reference: the fine-query forward
//! through the same passes as 1D (downsample, fused attention) composed with the grid's index
//! maps (`shaders/shared/geometry_grid.wgsl`), on awkward grids (one token, odd sides, partial
//! cells at the bottom and right edges, non-square both ways), r in {2, 4, 8}, p in {1, 2, 4},
//! Average and Learned, fine and coarse queries, output buffers poisoned with NaN, fresh seeds
//! (printed, replayable with MULTIPOLE_SEED).
//!
//! Tolerance: that of `tests/gpu/forward.rs` (5e-5 + 5e-5 |ref| on O, 5e-5 + 1e-5 |ref| on the
//! LSE), for the same reasons: N(0, 1) inputs, f32 dots of d = 16 or 40 terms, and one softmax
//! over at most 9 r^2 + 27 p L (<= 900) keys give errors of a few 1e-6; an indexing error (a
//! cell seen twice or not at all, a wrong band count) moves O by 1e-2 or more.

use crate::common::{closeness, gpu, Poisoned};
use multipole_attn::cpu::{self, widen};
use multipole_attn::gpu::{Attention, GpuContext, Host, Resident};
use multipole_attn::random::{fresh_seed, normal_tensor};
use multipole_attn::{
    Downsample, FmaConfig, FmaError, Grid, LearnedWeights, Problem, Queries, Shape,
};

const O_ATOL: f64 = 5e-5;
const O_RTOL: f64 = 5e-5;
const LSE_ATOL: f64 = 5e-5;
const LSE_RTOL: f64 = 1e-5;

const GRIDS: [(usize, usize); 5] = [(1, 1), (7, 5), (33, 20), (45, 70), (64, 64)];
const CELLS: [(usize, usize); 8] = [
    (2, 1),
    (2, 2),
    (4, 1),
    (4, 2),
    (4, 4),
    (8, 1),
    (8, 2),
    (8, 4),
];

/// Box-initialised 2D weights plus N(0, 0.5 / s_l^2) noise and N(0, 0.1) biases, so Learned
/// differs from Average and a wrong kernel index shows.
pub(crate) fn random_grid_weights(
    seed: u64,
    d: usize,
    r: usize,
    p: usize,
    grid: Grid,
) -> LearnedWeights {
    let mut w = LearnedWeights::box_init_grid_for(d, r, p, grid);
    for (l, lw) in w.levels.iter_mut().enumerate() {
        let taps = ((r << l) * (r << l)) as f32;
        let s = seed + 100 * l as u64;
        for (buf, off, scale) in [
            (&mut lw.wk, 1, 0.5 / taps),
            (&mut lw.wv, 2, 0.5 / taps),
            (&mut lw.bk, 3, 0.1),
            (&mut lw.bv, 4, 0.1),
            (&mut lw.wq, 5, 0.5 / taps),
            (&mut lw.bq, 6, 0.1),
        ] {
            let noise = normal_tensor(s + off, buf.len());
            buf.iter_mut().zip(noise).for_each(|(x, e)| *x += scale * e);
        }
    }
    w
}

/// Runs 2D FMA through caller buffers poisoned with NaN and checks O and the LSE.
fn check_grid(ctx: &GpuContext, seed: u64, shape: Shape, cfg: &FmaConfig) -> (f64, f64) {
    let label = format!(
        "seed {seed} {shape} grid {} r={} p={} learned={} {:?} queries",
        cfg.grid.unwrap(),
        cfg.block,
        cfg.rank,
        matches!(cfg.downsample, Downsample::Learned(_)),
        cfg.queries
    );
    let n = shape.elements();
    let (q, k, v) = (
        normal_tensor(seed, n),
        normal_tensor(seed ^ 0x9e37_79b9, n),
        normal_tensor(seed ^ 0x7f4a_7c15, n),
    );
    let fma = Attention::fma(ctx, cfg.clone()).unwrap_or_else(|e| panic!("{label}: {e}"));
    let bufs = Poisoned::new(ctx, &q, &k, &v, shape);
    fma.forward(&Problem::new(shape), Resident(bufs.tensors()))
        .unwrap_or_else(|e| panic!("{label}: {e}"));
    let (o, lse) = bufs.read(ctx);
    let r = cpu::fma_forward(&widen(&q), &widen(&k), &widen(&v), shape, cfg).unwrap();
    let co = closeness(&o[..shape.elements()], &r.o, O_ATOL, O_RTOL);
    let cl = closeness(&lse[..shape.rows()], &r.lse, LSE_ATOL, LSE_RTOL);
    assert_eq!(co.violations, 0, "{label}: O {co:?}");
    assert_eq!(cl.violations, 0, "{label}: LSE {cl:?}");
    (co.max_abs, cl.max_abs)
}

#[test]
fn grid_fma_matches_the_reference_on_awkward_grids() {
    let Some(ctx) = gpu() else { return };
    let seed = fresh_seed();
    eprintln!("seed {seed}");
    let mut worst = (0.0f64, 0.0f64);
    let mut case = 0u64;
    for (h, w) in GRIDS {
        let grid = Grid::new(h, w);
        for (ci, (r, p)) in CELLS.into_iter().enumerate() {
            for learned in [false, true] {
                // Small grids meet every (r, p) in both modes; the two large ones (3150 and 4096
                // tokens, where the f64 reference dominates the test's time) three (r, p) in
                // Average ((2, 1), (4, 2), (8, 1)) and two in Learned ((4, 1), (8, 1)).
                if h * w > 2000 && !matches!((ci + learned as usize) % 3, 0) {
                    continue;
                }
                let s = seed.wrapping_add(case * 7919);
                // Two heads (head offsets), d = 16; every fourth case batch 2 and d = 40.
                let (batch, d) = if case % 4 == 3 { (2, 40) } else { (1, 16) };
                let shape = Shape::new(batch, 2, h * w, d);
                let mut cfg = FmaConfig::new(r, p).grid(Some(grid));
                if learned {
                    let lw = random_grid_weights(s, d, r, p, grid);
                    cfg = cfg.downsample(Downsample::Learned(lw));
                }
                let (eo, el) = check_grid(ctx, s, shape, &cfg);
                worst = (worst.0.max(eo), worst.1.max(el));
                case += 1;
            }
        }
    }
    eprintln!(
        "{case} cases, worst |O err| {:.2e}, worst |LSE err| {:.2e}",
        worst.0, worst.1
    );
}

/// Coarse queries (algorithm.md §6 per cell: p coarse queries per cell, one per band, each
/// attending to its cell's far list, repeated onto the band's tokens) through the same
/// per-level passes as 1D (coarse_attention, upsample_merge) with the grid's maps.
#[test]
fn grid_coarse_queries_match_the_reference_on_awkward_grids() {
    let Some(ctx) = gpu() else { return };
    let seed = fresh_seed();
    eprintln!("seed {seed}");
    let mut worst = (0.0f64, 0.0f64);
    let mut case = 0u64;
    for (h, w) in GRIDS {
        let grid = Grid::new(h, w);
        for (ci, (r, p)) in CELLS.into_iter().enumerate() {
            // Every (r, p) on the small grids, (2, 1), (4, 2), (8, 4) on the large ones; the mode
            // alternates (random query weights in Learned mode).
            if h * w > 2000 && ![0, 3, 7].contains(&ci) {
                continue;
            }
            let learned = ci % 2 == 1;
            let s = seed.wrapping_add(case * 6007);
            let (batch, d) = if case % 4 == 3 { (2, 40) } else { (1, 16) };
            let shape = Shape::new(batch, 2, h * w, d);
            let mut cfg = FmaConfig::new(r, p)
                .grid(Some(grid))
                .queries(Queries::Coarse);
            if learned {
                let lw = random_grid_weights(s, d, r, p, grid);
                cfg = cfg.downsample(Downsample::Learned(lw));
            }
            let (eo, el) = check_grid(ctx, s, shape, &cfg);
            worst = (worst.0.max(eo), worst.1.max(el));
            case += 1;
        }
    }
    eprintln!(
        "{case} cases, worst |O err| {:.2e}, worst |LSE err| {:.2e}",
        worst.0, worst.1
    );
}

#[test]
fn a_cell_of_at_least_the_grid_is_exact_attention() {
    // r >= max(H, W): one cell, no level, the near field is the whole grid (the plan clamps r).
    let Some(ctx) = gpu() else { return };
    let seed = fresh_seed();
    for (h, w, r) in [(9, 30, 30), (9, 30, 1 << 20), (12, 5, 64)] {
        let cfg = FmaConfig::new(r, 1).grid(Some(Grid::new(h, w)));
        check_grid(ctx, seed, Shape::new(1, 1, h * w, 8), &cfg);
    }
}

#[test]
fn what_the_gpu_does_not_run_in_2d_is_a_typed_error() {
    let Some(ctx) = gpu() else { return };
    let grid = Some(Grid::new(8, 8));
    let shape = Shape::new(1, 1, 64, 4);
    let x = vec![0.5f32; shape.elements()];
    // H W != n.
    let fma = Attention::fma(ctx, FmaConfig::new(2, 1).grid(grid)).unwrap();
    let (x60, short) = (&x[..60], Problem::new(Shape::new(1, 1, 15, 4)));
    let e = fma
        .forward(&short, Host::new(x60, x60, x60).without_lse())
        .unwrap_err();
    assert!(
        matches!(&e, FmaError::ShapeMismatch { what, .. } if what == "grid"),
        "{e}"
    );
    // Causal (the problem's mask: refused at the call, before any work).
    let causal = Problem::new(shape).causal(true);
    let e = fma
        .forward(&causal, Host::new(&x, &x, &x).without_lse())
        .err();
    assert!(matches!(e, Some(FmaError::CausalGrid)), "{e:?}");
}
