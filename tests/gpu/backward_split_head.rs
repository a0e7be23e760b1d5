//! The backward of ONE head longer than one storage binding (`plan::BackwardSplitPlan`): with
//! the library capped at 32 KiB per binding (`Attention::max_binding`, on the shared context,
//! so both runs use the same kernels) a head of 3001 tokens of width 8 (96 KB per tensor) is
//! bound in 4 chunks of tokens (the test asserts more than one) with a block of halo either
//! side. Against the unsplit run (the default binding, one head in one binding) on the same
//! context:
//! - O, the LSE and dQ: the same bits (the forward split is bitwise; dQ of a chunk's queries
//!   reads its bound rows and the whole coarse K~, V~, with the unsplit float operations);
//! - dK, dV: within WTOL = 1e-5 of the scale (max(1, max|g|)). Why not bitwise: a coarse row's
//!   sum over a reader chunk (256 gathered queries) that straddles a token-chunk boundary is
//!   added as two parts in chunk order, and a grouped-query K/V head's gradients are summed
//!   over its query heads on the host in head order: regroupings of the same f32 terms, a few
//!   roundings of 2^-24 of partial sums within a few times the scale (we measure ~1e-7).
//!   A reader chunk or a token chunk missing or counted twice moves an element by its share
//!   of the sum, far above WTOL.
//!
//! The split run is bitwise the same twice, and within the backward tolerance of the f64
//! reference. Cases: causal and bidirectional, n = 3001 (partial last block, window and
//! chunk), a GQA group of 2, and a browser's limits (no subgroups: the coarse pass's two-phase
//! path). What stays refused is a typed error: Learned pooling (the limit, saying what splits),
//! and resident gradients of such a forward (their NaN-poisoned buffers stay NaN). Coarse
//! queries split too: `backward_split_coarse_q.rs`.

use crate::common::gradients::inputs;
use crate::common::split::{bitwise_but_sums, resident_backward_refused, SplitCase};
use crate::common::{browser_like_gpu, gpu, random_learned};
use multipole_attn::gpu::{Attention, GpuContext, Host};
use multipole_attn::plan::KernelLimits;
use multipole_attn::random::fresh_seed;
use multipole_attn::{Downsample, FmaConfig, FmaError, Method, Problem, Shape};

/// The binding cap of the split runs.
const LIMIT: u64 = 32 << 10;

/// One case: the split run against the unsplit one, itself and the f64 reference; returns the
/// worst dK/dV difference from the unsplit run (of the scale).
fn check(ctx: &GpuContext, seed: u64, p: &Problem, cfg: &FmaConfig) -> f64 {
    let label = format!("seed {seed} {} causal={}", p.shape, p.causal);
    let c = SplitCase::new(ctx, label, seed, (&Method::Fma(cfg.clone()), p), LIMIT);
    let label = &c.label;
    // The split run cannot pass by not splitting: one head's backward is over the binding,
    // and the head is several chunks.
    let plan = c.one_head_split(&KernelLimits::webgpu_default().capped(LIMIT));
    assert!(plan.split.chunks.len() > 1, "{label}: one chunk");
    let (out_u, g_u) = c.unsplit();
    let (out_s, g_s) = c.split();
    let worst = bitwise_but_sums(label, (&out_s, &g_s), (&out_u, &g_u), false);
    assert!(g_s.weights.is_none() && g_u.weights.is_none(), "{label}");
    c.assert_repeatable(&out_s, &g_s);
    let to_ref = c.against_reference(&g_s);
    let bitwise = g_s.dk == g_u.dk && g_s.dv == g_u.dv;
    eprintln!(
        "{label}: {} chunks, dK/dV vs unsplit {worst:.2e} (bitwise: {bitwise}), against f64 \
         {to_ref:.2e}",
        plan.split.chunks.len()
    );
    worst
}

#[test]
fn one_head_over_a_binding_splits_its_backward_and_matches_unsplit() {
    let Some(ctx) = gpu() else { return };
    let seed = fresh_seed();
    eprintln!("seed {seed}");
    let (n, d) = (3001, 8);
    let cfg = FmaConfig::new(16, 2);
    let mut worst = 0.0f64;
    for (i, (shape, causal)) in [
        (Shape::new(1, 1, n, d), false),
        (Shape::new(1, 1, n, d), true),
        // A GQA group of 2: each query head split, the K/V head's gradients summed on the host.
        (Shape::new(1, 2, n, d).with_kv_heads(1), true),
    ]
    .into_iter()
    .enumerate()
    {
        let s = seed.wrapping_add(i as u64 * 7919);
        let problem = Problem::new(shape).causal(causal);
        worst = worst.max(check(ctx, s, &problem, &cfg));
    }
    eprintln!("worst dK/dV difference {worst:.2e} of the scale");
}

#[test]
fn the_plain_kernels_split_a_head_too() {
    // A browser's limits: no subgroups, so the coarse dK~/dV~ pass takes its two-phase path
    // (out-of-chunk readers staged as zeros with P = 0) rather than the subgroup walk.
    let Some(ctx) = browser_like_gpu() else {
        return;
    };
    let seed = fresh_seed();
    for (i, causal) in [false, true].into_iter().enumerate() {
        let problem = Problem::new(Shape::new(1, 1, 3001, 8)).causal(causal);
        check(
            ctx,
            seed.wrapping_add(i as u64),
            &problem,
            &FmaConfig::new(16, 2),
        );
    }
}

#[test]
fn what_a_split_head_backward_does_not_run_is_a_typed_error() {
    let Some(ctx) = gpu() else { return };
    let (n, d, m) = (3001, 8, 16);
    let shape = Shape::new(1, 1, n, d);
    let x = inputs(fresh_seed(), shape);
    let capped = |cfg: FmaConfig| {
        Attention::fma(ctx, cfg)
            .unwrap()
            .max_binding(LIMIT)
            .unwrap()
    };
    // Learned pooling: its weights outgrow a binding first (the forward's split says so).
    let learned =
        FmaConfig::new(m, 2).downsample(Downsample::Learned(random_learned(1, d, m, 2, n)));
    let e = capped(learned)
        .train(&Problem::new(shape), Host::new(&x.q, &x.k, &x.v))
        .expect_err("learned");
    assert!(
        matches!(
            &e,
            FmaError::LimitExceeded { .. } | FmaError::InvalidConfig { .. }
        ),
        "{e}"
    );
    // Resident gradients of a split head's forward: refused, the poisoned buffers untouched.
    let split = capped(FmaConfig::new(m, 2));
    let (_, saved) = split
        .train(&Problem::new(shape), Host::new(&x.q, &x.k, &x.v))
        .expect("split training");
    resident_backward_refused(ctx, &split, (&saved, &x.dout), "a split head");
}
