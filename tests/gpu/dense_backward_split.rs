//! The dense backward of host tensors over one storage binding whose heads fit: with the
//! library capped at 32 KiB per binding (`Attention::max_binding`, on the shared context, so
//! the split and the unsplit run use the same kernels), `train` + `backward` run a run of heads
//! at a time (`gpu/dense/backward_runs.rs`). Against the unsplit run on the same context:
//! - O, the LSE, dQ, and dK, dV when the runs are whole K/V-head groups: the same bits (each
//!   run is the unsplit passes over fewer heads, every head's sums in the same order);
//! - dK, dV of a group split into single heads: within WTOL = 1e-5 of the tensor's scale
//!   (max(1, max|g|)). Why: the unsplit pass sums a K/V head's group of query heads in one
//!   running sum per key, the split one adds the heads' sums on the host: the same f32 terms
//!   regrouped, a few roundings of at most 2^-24 of partial sums within a few times the scale
//!   (we measure 6e-7: 17x headroom); a missing or doubled head moves an element by about its share, ~1/group of the scale.
//!
//! The split run is bitwise the same twice and within the backward tolerance of the f64
//! reference (`TOL`). Cases: GQA groups of 2, one K/V head per query head, causal and not,
//! fewer queries than keys, and a group of 4 over the binding. A resident backward of host
//! tensors saved in runs is a typed error that leaves its NaN-poisoned gradients untouched,
//! and resident training over a binding one before the forward (its outputs stay NaN).
//! Fresh seeds (printed).

use crate::common::gpu;
use crate::common::gradients::inputs;
use crate::common::split::{
    bitwise_but_sums, resident_backward_refused, resident_training_refused, SplitCase,
};
use multipole_attn::gpu::{Attention, GpuContext, Host};
use multipole_attn::random::fresh_seed;
use multipole_attn::{FmaError, Method, Problem, Shape};

/// The binding cap of the split runs.
const LIMIT: u64 = 32 << 10;

/// One case against the unsplit run, itself and the f64 reference; returns the regrouping
/// error of dK, dV (0 when the runs are whole groups).
fn check(ctx: &GpuContext, seed: u64, p: &Problem, whole_groups: bool) -> f64 {
    let label = format!("seed {seed} {} causal={}", p.shape, p.causal);
    let c = SplitCase::new(ctx, label, seed, (&Method::Dense, p), LIMIT);
    let label = &c.label;
    // The split run cannot pass by not splitting: its backward does not fit one binding.
    c.assert_over_binding(p, "the tensors");
    let (out_u, g_u) = c.unsplit();
    let (out_s, g_s) = c.split();
    let worst = bitwise_but_sums(label, (&out_s, &g_s), (&out_u, &g_u), whole_groups);
    assert!(g_s.weights.is_none() && g_s.dsinks.is_none(), "{label}");
    c.assert_repeatable(&out_s, &g_s);
    let to_ref = c.against_reference(&g_s);
    eprintln!("{label}: regrouped {worst:.2e}, against f64 {to_ref:.2e}");
    worst
}

#[test]
fn dense_backward_over_one_binding_runs_heads_and_matches_unsplit() {
    let Some(ctx) = gpu() else { return };
    let seed = fresh_seed();
    eprintln!("seed {seed}");
    // 300 x 8 x 4 bytes = 9.6 KB per query head of Q (O, dO, dQ): 3 heads per 32 KiB binding.
    let (n, d) = (300, 8);
    let mut worst = 0.0f64;
    for (i, (shape, causal, whole_groups)) in [
        // Groups of 2 query heads: runs of one group, 4 of them.
        (Shape::new(2, 4, n, d).with_kv_heads(2), false, true),
        (Shape::new(2, 4, n, d).with_kv_heads(2), true, true),
        // One K/V head per query head: runs of 3 heads, then 1.
        (Shape::new(2, 2, n, d), true, true),
        // 200 queries against 300 keys (bottom-right causal).
        (Shape::cross(2, 4, 200, n, d).with_kv_heads(2), true, true),
        // A group of 4 heads is over the binding: one query head per run, dK and dV summed
        // over the runs of the group.
        (Shape::new(1, 4, n, d).with_kv_heads(1), false, false),
    ]
    .into_iter()
    .enumerate()
    {
        let s = seed.wrapping_add(i as u64 * 7919);
        worst = worst.max(check(
            ctx,
            s,
            &Problem::new(shape).causal(causal),
            whole_groups,
        ));
    }
    eprintln!("worst regrouping error {worst:.2e} of the scale");
}

#[test]
fn a_resident_backward_of_dense_runs_is_a_typed_error() {
    let Some(ctx) = gpu() else { return };
    let shape = Shape::new(2, 2, 300, 8);
    let problem = Problem::new(shape);
    let x = inputs(fresh_seed(), shape);
    let split = Attention::dense(ctx).unwrap().max_binding(LIMIT).unwrap();
    let (_, saved) = split
        .train(&problem, Host::new(&x.q, &x.k, &x.v))
        .expect("host training in runs");
    resident_backward_refused(ctx, &split, (&saved, &x.dout), "runs");
    // Resident buffers over a binding: refused before the forward (as FMA's), so their
    // poisoned outputs stay NaN, saying what to do.
    let usage = wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST;
    resident_training_refused(ctx, &split, (&problem, &x), usage, "dense");
    // One head over a binding: refused (the dense backward does not split a head).
    let long = Shape::new(2, 1, 2000, 8);
    let y = inputs(1, long);
    let e = split
        .train(&Problem::new(long), Host::new(&y.q, &y.k, &y.v))
        .expect_err("one head over a binding");
    assert!(
        matches!(&e, FmaError::LimitExceeded { what, advice, .. }
            if what.contains("one head") && advice.contains("does not split one head")),
        "{e}"
    );
}
