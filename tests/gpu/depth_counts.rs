//! `plan::depth`'s figures proven on the shaders: a counting device
//! (`GpuContext::counting_rows`, pipelines composed with `shaders::compose_counting`) adds up,
//! per dispatch, the rows each invocation reads one after another (its maximum) and all rows
//! the dispatch reads (each row once), and the plan's `serial_rows` and `rows` must equal them
//! exactly, on shapes whose windows are all full (the figures are upper bounds that partial
//! windows stay under; checked too). Every FMA pass that reads rows carries `//#rows` markers
//! (`COUNTED`: all but backward_delta, whose 2 rows per invocation need no proof, and the
//! padding passes, which only write); each is compared exactly on at least one shape (1D
//! Average, Learned causal GQA, Learned coarse queries, 2D Learned, 2D coarse queries). The
//! attention passes' and the coarse dK~/dV~ pass's `rows` stay upper bounds even on full
//! windows (`BOUNDED_ROWS`: each workgroup is given the widest block's list); their
//! `serial_rows` is exact. The default context runs the subgroup variants on lavapipe; a
//! context with a browser's limits and no subgroups runs the plain ones (the two-phase coarse
//! dK~/dV~ path, the plain sweeps) against the same plans.

use crate::common::{gpu, random_learned};
use multipole_attn::gpu::{Attention, GpuContext, Host, HostGrad};
use multipole_attn::plan::{fma_depths_with, DispatchDepth, FmaKernel, KernelLimits, Pass};
use multipole_attn::random::{fresh_seed, normal_tensor};
use multipole_attn::{Downsample, FmaConfig, Grid, LearnedWeights, Problem, Queries, Shape};

/// The passes whose shaders count their reads.
const COUNTED: [Pass; 18] = [
    Pass::Downsample,
    Pass::DownsampleCombine,
    Pass::FineAttention,
    Pass::FineTiled,
    Pass::CoarseAttention,
    Pass::UpsampleMerge,
    Pass::BackwardDq,
    Pass::BackwardDkvFine,
    Pass::BackwardDkvCoarse,
    Pass::BackwardDkvCoarseQ,
    Pass::BackwardCoarseStats,
    Pass::BackwardCoarseDq,
    Pass::BackwardDkvCombine,
    Pass::DownsampleBackward,
    Pass::WeightsBackward,
    Pass::WeightsBackwardCombine,
    Pass::WeightsBackwardQ,
    Pass::WeightsBackwardQCombine,
];

/// The passes whose plan `rows` is an upper bound even on full windows: it gives every
/// workgroup the widest block's gather list (the blocks at the sequence's ends see fewer
/// fine keys, and no block has the largest far list of every level), where `serial_rows` is
/// the widest block's exactly.
const BOUNDED_ROWS: [Pass; 6] = [
    Pass::FineAttention,
    Pass::FineTiled,
    Pass::BackwardDq,
    Pass::BackwardDkvFine,
    Pass::BackwardDkvCoarse,
    Pass::BackwardDkvCoarseQ,
];

/// Compares the counted (max, total) of each dispatch of a counted pass with the plan's.
/// `exact`: every window full, so the bounds are attained.
fn compare(
    label: &str,
    plan: &[DispatchDepth],
    counts: &[[u32; 2]],
    exact: bool,
    (bad, proven): (&mut usize, &mut Vec<Pass>),
) -> usize {
    let mut checked = 0;
    for (k, d) in plan.iter().enumerate() {
        if !COUNTED.contains(&d.dispatch.pass) {
            continue;
        }
        let [serial, rows] = counts[k].map(u64::from);
        let what = format!(
            "{label}: dispatch {k} {} level {:?}: counted ({serial}, {rows}), plan ({}, {})",
            d.dispatch.pass.name(),
            d.dispatch.level,
            d.serial_rows,
            d.rows
        );
        let ok = if exact {
            let rows_ok = if BOUNDED_ROWS.contains(&d.dispatch.pass) {
                rows <= d.rows
            } else {
                rows == d.rows
            };
            serial == d.serial_rows && rows_ok
        } else {
            serial <= d.serial_rows && rows <= d.rows
        };
        if !ok {
            eprintln!("MISMATCH {what}");
            *bad += 1;
        }
        if exact && !proven.contains(&d.dispatch.pass) {
            proven.push(d.dispatch.pass);
        }
        checked += 1;
    }
    checked
}

/// One problem: its training forward and backward counted and compared with the plans; the
/// passes compared exactly are added to `proven`.
fn run(
    ctx: &GpuContext,
    seed: u64,
    (p, cfg): (&Problem, &FmaConfig),
    exact: bool,
    proven: &mut Vec<Pass>,
) {
    run_kernel(ctx, seed, (p, cfg, FmaKernel::Rows), exact, proven);
}

/// [`run`] with the forward's fused pass of shape `kernel` (the training forward runs it).
fn run_kernel(
    ctx: &GpuContext,
    seed: u64,
    (p, cfg, kernel): (&Problem, &FmaConfig, FmaKernel),
    exact: bool,
    proven: &mut Vec<Pass>,
) {
    let shape = p.shape;
    let label = format!("seed {seed} {shape} causal {} {kernel:?} {cfg:?}", p.causal);
    let label = &label[..label.len().min(160)];
    let fma = Attention::fma(ctx, cfg.clone())
        .and_then(|a| a.fma_kernel(kernel))
        .unwrap();
    let q = normal_tensor(seed, shape.elements());
    let k = normal_tensor(seed + 1, shape.kv_elements());
    let v = normal_tensor(seed + 2, shape.kv_elements());
    ctx.take_row_counts().unwrap();
    let (_, saved) = fma.train(p, Host::new(&q, &k, &v)).unwrap();
    let forward = ctx.take_row_counts().unwrap();
    let dout = normal_tensor(seed + 3, shape.elements());
    fma.backward(&saved, HostGrad(&dout)).unwrap();
    let backward = ctx.take_row_counts().unwrap();
    // The plans of the executor's limits: the forward's dispatches, then the backward's.
    let limits = KernelLimits::from_wgpu(&ctx.limits);
    let forward_plan = fma_depths_with(p, cfg, &limits, false, kernel).unwrap();
    let both = fma_depths_with(p, cfg, &limits, true, kernel).unwrap();
    let backward_plan = &both[forward_plan.len()..];
    let mut bad = 0;
    let mut checked = compare(label, &forward_plan, &forward, exact, (&mut bad, proven));
    checked += compare(label, backward_plan, &backward, exact, (&mut bad, proven));
    assert!(checked > 0, "{label}: nothing counted");
    assert_eq!(
        bad, 0,
        "{label}: {bad} of {checked} dispatches disagree (above)"
    );
    eprintln!("{label}: {checked} dispatches agree");
}

#[test]
fn the_plans_depth_is_what_the_shaders_walk() {
    let Some(_) = gpu() else { return };
    let ctx = GpuContext::new().unwrap().counting_rows();
    let seed = fresh_seed();
    eprintln!("seed {seed}");
    let mut proven = Vec::new();
    // 1D, n = 4096, m = 16, p = 2: every window full; Learned levels of 512 .. 1024 taps in
    // chunks, the top ones' readers in chunks (dK~/dV~ combine), 4 query heads on 2 K/V heads.
    let (n, d) = (4096, 8);
    let shape = Shape::new(1, 4, n, d).with_kv_heads(2);
    let learned = |s| Downsample::Learned(random_learned(s, d, 16, 2, n));
    let cases = [
        (Problem::new(shape), FmaConfig::new(16, 2)),
        (
            Problem::new(shape).causal(true),
            FmaConfig::new(16, 2).downsample(learned(seed)),
        ),
        (
            Problem::new(Shape::new(1, 2, n, d)),
            FmaConfig::new(16, 2)
                .queries(Queries::Coarse)
                .downsample(learned(seed)),
        ),
    ];
    for (p, cfg) in &cases {
        run(&ctx, seed, (p, cfg), true, &mut proven);
    }
    // 2D, 128 x 128 tokens, cells 8 x 8, p = 2 (cells of 64 .. 1024 taps, all full); and
    // coarse queries on 64 x 64.
    let grid = Grid::new(128, 128);
    let w = LearnedWeights::box_init_grid_for(d, 8, 2, grid);
    let cfg = FmaConfig::new(8, 2)
        .grid(Some(grid))
        .downsample(Downsample::Learned(w));
    let p = Problem::new(Shape::new(1, 1, 128 * 128, d));
    run(&ctx, seed, (&p, &cfg), true, &mut proven);
    let grid = Grid::new(64, 64);
    let cfg = FmaConfig::new(8, 2)
        .grid(Some(grid))
        .queries(Queries::Coarse);
    let p = Problem::new(Shape::new(1, 2, 64 * 64, d));
    run(&ctx, seed, (&p, &cfg), true, &mut proven);
    // The tiled fused pass (`FmaKernel::Tiled`): 1D both masks over 2 K/V heads (blocks of 16
    // queries, one tile each), 2D cells of 8 x 8 (a tile of 64 queries), all windows full.
    let shape = Shape::new(1, 4, 1024, 8).with_kv_heads(2);
    let grid = Grid::new(64, 64);
    let tiled = [
        (Problem::new(shape), FmaConfig::new(16, 2)),
        (Problem::new(shape).causal(true), FmaConfig::new(16, 2)),
        (
            Problem::new(Shape::new(1, 1, 64 * 64, 8)),
            FmaConfig::new(8, 2).grid(Some(grid)),
        ),
    ];
    for (p, cfg) in &tiled {
        run_kernel(&ctx, seed, (p, cfg, FmaKernel::Tiled), true, &mut proven);
    }
    // Awkward n: partial windows stay under the plan's bounds.
    let (n, d) = (3001, 5);
    let shape = Shape::new(1, 3, n, d);
    let w = Downsample::Learned(random_learned(seed, d, 8, 2, n));
    let p = Problem::new(shape);
    run(
        &ctx,
        seed,
        (&p, &FmaConfig::new(8, 2).downsample(w)),
        false,
        &mut proven,
    );
    let cfg = FmaConfig::new(8, 2).queries(Queries::Coarse);
    run(&ctx, seed, (&p, &cfg), false, &mut proven);
    let tiled = (&p, &cfg, FmaKernel::Tiled);
    run_kernel(&ctx, seed, tiled, false, &mut proven);
    // Every instrumented pass was compared exactly on some shape.
    for pass in COUNTED {
        assert!(
            proven.contains(&pass),
            "{} never compared exactly",
            pass.name()
        );
    }
}

#[test]
fn the_plain_kernels_walk_the_same_depth() {
    // A browser's limits and no subgroups: the plain variants (the two-phase coarse dK~/dV~
    // path, the plain key and query sweeps) under the same markers and plans.
    let Some(plain) = crate::common::browser_like_gpu() else {
        return;
    };
    assert_eq!(
        plain.subgroup_kernels(),
        None,
        "a context without subgroups"
    );
    let ctx = plain.clone().counting_rows();
    let seed = fresh_seed();
    eprintln!("seed {seed}");
    let mut proven = Vec::new();
    let (n, d) = (4096, 8);
    let shape = Shape::new(1, 4, n, d).with_kv_heads(2);
    let cases = [
        (Problem::new(shape), FmaConfig::new(16, 2)),
        (Problem::new(shape).causal(true), FmaConfig::new(16, 2)),
        (
            Problem::new(Shape::new(1, 2, n, d)),
            FmaConfig::new(16, 2).queries(Queries::Coarse),
        ),
    ];
    for (p, cfg) in &cases {
        run(&ctx, seed, (p, cfg), true, &mut proven);
    }
    for pass in [
        Pass::FineAttention,
        Pass::BackwardDq,
        Pass::BackwardDkvFine,
        Pass::BackwardDkvCoarse,
        Pass::BackwardDkvCoarseQ,
    ] {
        assert!(proven.contains(&pass), "{} never compared", pass.name());
    }
}
