//! The backward of ONE head longer than one storage binding with coarse queries (algorithm.md §8
//! with §6; `plan::BackwardSplitPlan` with its `CoarseQuerySteps`): with the library capped at
//! 32 KiB per binding (`Attention::max_binding`, on the shared context, so both runs use the
//! same kernels), heads of 1025 tokens (2 chunks, the last one a partial block and window) and
//! 3001 tokens (4 chunks) of width 8 (the test asserts more than one chunk and that one head's
//! backward does not fit). Against the unsplit run (the default binding) on the same context:
//! - O, the LSE and dQ: the same bits, with grouped-query heads too (each pass does per row the
//!   unsplit float operations: the level-1 coarse-query stats of a chunk's windows read its
//!   bound rows, every other coarse-query pass reads the coarse rows, bound whole);
//! - dK, dV with one query head per K/V head: the same bits (no sum is regrouped: the coarse
//!   dK~/dV~ pass gathers coarse-query rows, not tokens, and runs once per head);
//! - dK, dV of a grouped-query K/V head: within WTOL = 1e-5 of the scale (max(1, max|g|)), since
//!   its query heads' gradients are added on the host in head order, where the unsplit passes
//!   add them inside each gather: a regrouping of the same f32 terms, a few roundings of 2^-24
//!   of sums within a few times the scale. A chunk's rows missing or counted twice move an
//!   element by its share of a sum, far above WTOL.
//!
//! Unwritten rows cannot pass: before the checked run each split instance runs a backward with
//! dO = NaN, which leaves NaN in every row of its coarse scratch (Q~'s G, R, H, dQ~, dK~, dV~)
//! that a later run does not write again, and the chunks' gradient buffers start at zero, which
//! no gradient of random inputs equals (the bitwise comparison fails on either). The split run
//! is bitwise the same twice, and within the backward tolerance of the f64 reference
//! (`common::gradients::TOL`). Also on a browser's limits (no subgroups: the coarse dK~/dV~
//! pass's two-phase path). What stays refused is a typed error: causal coarse queries (the
//! configuration's), Learned pooling, and coarse rows that do not fit one binding.

use crate::common::gradients::inputs;
use crate::common::split::{bitwise_but_sums, SplitCase};
use crate::common::{browser_like_gpu, gpu, random_learned};
use multipole_attn::gpu::{Attention, GpuContext, Host};
use multipole_attn::plan::KernelLimits;
use multipole_attn::random::fresh_seed;
use multipole_attn::{Downsample, FmaConfig, FmaError, Method, Problem, Queries, Shape};

/// The binding cap of the split runs.
const LIMIT: u64 = 32 << 10;

/// One case: the split run against the unsplit one, itself and the f64 reference; returns the
/// worst dK/dV difference from the unsplit run (of the scale; 0 where bitwise).
fn check(ctx: &GpuContext, seed: u64, shape: Shape, cfg: &FmaConfig) -> f64 {
    let label = format!("seed {seed} {shape} m={} p={}", cfg.block, cfg.rank);
    let method = Method::Fma(cfg.clone());
    let c = SplitCase::new(ctx, label, seed, (&method, &Problem::new(shape)), LIMIT);
    let label = &c.label;
    // The split run cannot pass by not splitting: one head's backward is over the binding,
    // and the head is several chunks.
    let plan = c.one_head_split(&KernelLimits::webgpu_default().capped(LIMIT));
    let chunks = plan.split.chunks.len();
    assert!(chunks > 1, "{label}: one chunk");
    assert!(plan.coarse_queries.is_some(), "{label}");
    // Poison: a backward of dO = NaN leaves NaN in every scratch row it wrote.
    let (_, g_nan) = c.run(&c.split, &vec![f32::NAN; c.x.dout.len()]);
    assert!(g_nan.dq.iter().all(|v| v.is_nan()), "{label}: NaN dO");
    let (out_u, g_u) = c.unsplit();
    let (out_s, g_s) = c.split();
    // O, the LSE and dQ the same bits; dK, dV too with one query head per K/V head.
    let dkv_bits = shape.group() == 1;
    let worst = bitwise_but_sums(label, (&out_s, &g_s), (&out_u, &g_u), dkv_bits);
    assert!(g_s.weights.is_none() && g_u.weights.is_none(), "{label}");
    c.assert_repeatable(&out_s, &g_s);
    let to_ref = c.against_reference(&g_s);
    eprintln!(
        "{label}: {chunks} chunks, dK/dV vs unsplit {worst:.2e} (bitwise: {}), against f64 \
         {to_ref:.2e}",
        g_s == g_u
    );
    worst
}

#[test]
fn a_coarse_query_head_over_a_binding_splits_its_backward_bit_for_bit() {
    let Some(ctx) = gpu() else { return };
    let seed = fresh_seed();
    eprintln!("seed {seed}");
    let mut worst = 0.0f64;
    for (i, (shape, m, p)) in [
        // 2 chunks of 992 and 33 tokens: a partial block, window and sub-windows at the end.
        (Shape::new(1, 1, 1025, 8), 16, 4),
        (Shape::new(1, 1, 3001, 8), 16, 2),
        // A GQA group of 2: each query head split, the K/V head's dK, dV summed on the host.
        (Shape::new(1, 2, 3001, 8).with_kv_heads(1), 16, 2),
    ]
    .into_iter()
    .enumerate()
    {
        let cfg = FmaConfig::new(m, p).queries(Queries::Coarse);
        let s = seed.wrapping_add(i as u64 * 7919);
        worst = worst.max(check(ctx, s, shape, &cfg));
    }
    eprintln!("worst grouped-query dK/dV difference {worst:.2e} of the scale");
}

#[test]
fn the_plain_kernels_split_a_coarse_query_head_too() {
    // A browser's limits: no subgroups, so the coarse dK~/dV~ pass takes its two-phase path.
    let Some(ctx) = browser_like_gpu() else {
        return;
    };
    let cfg = FmaConfig::new(16, 2).queries(Queries::Coarse);
    check(ctx, fresh_seed(), Shape::new(1, 1, 1025, 8), &cfg);
}

#[test]
fn what_a_coarse_query_split_backward_does_not_run_is_a_typed_error() {
    let Some(ctx) = gpu() else { return };
    let (n, d, m) = (3001, 8, 16);
    let shape = Shape::new(1, 1, n, d);
    let x = inputs(fresh_seed(), shape);
    let train = |cfg: FmaConfig, causal: bool| {
        let fma = Attention::fma(ctx, cfg).and_then(|a| a.max_binding(LIMIT));
        fma.and_then(|a| {
            let p = Problem::new(shape).causal(causal);
            a.train(&p, Host::new(&x.q, &x.k, &x.v)).map(|_| ())
        })
    };
    let coarse = FmaConfig::new(m, 2).queries(Queries::Coarse);
    // Causal coarse queries: the configuration's own error (algorithm.md §6), split or not.
    let e = train(coarse.clone(), true).expect_err("causal coarse queries");
    assert!(matches!(e, FmaError::CausalCoarseQueries), "{e}");
    // Learned pooling: its weights outgrow a binding first (the forward's split says so).
    let learned = coarse
        .clone()
        .downsample(Downsample::Learned(random_learned(1, d, m, 2, n)));
    let e = train(learned, false).expect_err("learned");
    assert!(
        matches!(
            &e,
            FmaError::LimitExceeded { .. } | FmaError::InvalidConfig { .. }
        ),
        "{e}"
    );
    // Coarse rows over one binding (m = p = 2: about 2 n p / m = 6000 rows of 32 bytes).
    let e = train(FmaConfig::new(2, 2).queries(Queries::Coarse), false).expect_err("rows");
    assert!(
        matches!(&e, FmaError::LimitExceeded { what, .. } if what.contains("coarse rows")),
        "{e}"
    );
}
