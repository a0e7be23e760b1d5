//! The backward of host tensors over one storage binding whose heads fit: with the library
//! capped at 32 KiB per binding (`Attention::max_binding`, on the shared context, so the split
//! and the unsplit run use the same kernels), `train` + `backward` run a run of heads at a
//! time. Against the unsplit run on the same context:
//! - O, the LSE, dQ, and dK, dV when the runs are whole K/V-head groups: the same bits (each
//!   run is the unsplit passes over fewer heads; a K/V head's group is summed inside one run);
//! - dK, dV of a group split into single heads, and the learned weights' gradients (sums over
//!   all heads: the unsplit run adds them in one tree of partial sums, the split one adds the
//!   runs' sums in run order on the host): within WTOL = 1e-5 of the tensor's scale
//!   (max(1, max|g|)). Why: each is the same f32 terms regrouped, a few roundings of at most
//!   2^-24 of the partial sums, which are within a few times the scale (we measure 2e-7 ..
//!   4e-7: 25x headroom);
//!   a missing or doubled run moves an element by about its share of the sum, ~1/runs of the
//!   scale.
//!
//! The split run is bitwise the same twice, and within the backward tolerance of the f64
//! reference (`TOL`, tests/gpu/backward.rs). Cases: GQA groups of 2 and 4, one K/V head per
//! query head, causal and not, fine and coarse queries, Average and Learned, a chunk of Q
//! shorter than K and V (`crate::cross`). Fresh seeds (printed). Resident buffers over a
//! binding are a typed error before the forward (their NaN-poisoned outputs stay NaN), as is
//! a resident backward of host tensors saved in runs (its poisoned gradients stay NaN), sinks
//! on tensors over a binding, and one Learned head over a binding (one Average head splits
//! along its sequence: `backward_split_head.rs`).

use crate::common::gradients::inputs;
use crate::common::split::{
    bitwise_but_sums, resident_backward_refused, resident_training_refused, SplitCase,
};
use crate::common::{gpu, random_learned};
use multipole_attn::gpu::{Attention, GpuContext, Host, HostGrad};
use multipole_attn::random::fresh_seed;
use multipole_attn::{Downsample, FmaConfig, FmaError, Method, Problem, Queries, Shape, Variants};

/// The binding cap of the split runs.
const LIMIT: u64 = 32 << 10;

/// One case: the split run against the unsplit one, itself, and the f64 reference; returns
/// the worst regrouping error (of the weights, and of dK, dV when `whole_groups` is false).
fn check(ctx: &GpuContext, seed: u64, p: &Problem, cfg: &FmaConfig, whole_groups: bool) -> f64 {
    let label = format!(
        "seed {seed} {} causal={} {:?}",
        p.shape, p.causal, cfg.queries
    );
    let c = SplitCase::new(ctx, label, seed, (&Method::Fma(cfg.clone()), p), LIMIT);
    let label = &c.label;
    // The split run cannot pass by not splitting: its backward does not fit one binding (a
    // chunk's: that of Q padded to the keys' length, which it runs).
    let sh = p.shape;
    let full = Shape::cross(sh.batch, sh.heads, sh.seq_kv, sh.seq_kv, sh.head_dim)
        .with_kv_heads(sh.kv_heads);
    c.assert_over_binding(&Problem::new(full).causal(p.causal), "the tensors");
    let (out_u, g_u) = c.unsplit();
    let (out_s, g_s) = c.split();
    let worst = bitwise_but_sums(label, (&out_s, &g_s), (&out_u, &g_u), whole_groups);
    // Deterministic: the same bits from a second training step.
    c.assert_repeatable(&out_s, &g_s);
    let to_ref = c.against_reference(&g_s);
    eprintln!("{label}: regrouped {worst:.2e}, against f64 {to_ref:.2e}");
    worst
}

#[test]
fn backward_over_one_binding_runs_heads_and_matches_unsplit() {
    let Some(ctx) = gpu() else { return };
    let seed = fresh_seed();
    eprintln!("seed {seed}");
    // 300 x 8 x 4 bytes = 9.6 KB per query head of Q (O, dO, dQ): 3 heads per 32 KiB binding.
    let (n, d, m) = (300, 8, 8);
    let mut worst = 0.0f64;
    for (i, (shape, causal, coarse, with_weights, whole_groups)) in [
        // Groups of 2 query heads: runs of one group, 4 of them.
        (
            Shape::new(2, 4, n, d).with_kv_heads(2),
            false,
            false,
            false,
            true,
        ),
        (
            Shape::new(2, 4, n, d).with_kv_heads(2),
            true,
            false,
            true,
            true,
        ),
        (
            Shape::new(1, 4, n, d).with_kv_heads(2),
            false,
            true,
            true,
            true,
        ),
        // One K/V head per query head: runs of 3 heads, then 1.
        (Shape::new(2, 2, n, d), false, false, true, true),
        // A chunk of 100 queries against 300 keys (`crate::cross`: Q padded to the keys'
        // length, in runs all the same).
        (
            Shape::cross(1, 4, 100, n, d).with_kv_heads(2),
            true,
            false,
            true,
            true,
        ),
        // A group of 4 heads is over the binding: one query head per run, dK and dV summed
        // over the runs of the group.
        (
            Shape::new(1, 4, n, d).with_kv_heads(1),
            true,
            false,
            true,
            false,
        ),
    ]
    .into_iter()
    .enumerate()
    {
        let s = seed.wrapping_add(i as u64 * 7919);
        // Coarse queries' learned weights (keys, values and queries) fit 32 KiB at p = 1.
        let p = if coarse { 1 } else { 2 };
        let mut cfg = FmaConfig::new(m, p);
        if coarse {
            cfg = cfg.queries(Queries::Coarse);
        }
        if with_weights {
            cfg = cfg.downsample(Downsample::Learned(random_learned(s, d, m, p, n)));
        }
        let problem = Problem::new(shape).causal(causal);
        worst = worst.max(check(ctx, s, &problem, &cfg, whole_groups));
    }
    eprintln!("worst regrouping error {worst:.2e} of the scale");
}

#[test]
fn what_the_backward_does_not_split_is_a_typed_error() {
    let Some(ctx) = gpu() else { return };
    let shape = Shape::new(2, 2, 300, 8);
    let problem = Problem::new(shape);
    let x = inputs(fresh_seed(), shape);
    let split = Attention::fma(ctx, FmaConfig::new(8, 2))
        .unwrap()
        .max_binding(LIMIT)
        .unwrap();

    // Resident tensors over a binding: refused before the forward, saying what to do.
    let usage = wgpu::BufferUsages::empty();
    resident_training_refused(ctx, &split, (&problem, &x), usage, "FMA");

    // Host tensors saved in runs, differentiated into buffers: refused, buffers untouched.
    let (_, saved) = split
        .train(&problem, Host::new(&x.q, &x.k, &x.v))
        .expect("host training in runs");
    resident_backward_refused(ctx, &split, (&saved, &x.dout), "runs");

    // Sinks on host tensors over a binding train in runs too (each run reads its own heads'
    // sinks: tests/gpu/variants_runs.rs checks the values).
    let sinks = Problem::new(shape).variants(Variants {
        sinks: Some(vec![0.5, -0.5]),
        ..Variants::default()
    });
    let (_, saved) = split
        .train(&sinks, Host::new(&x.q, &x.k, &x.v))
        .expect("sinks over a binding");
    let g = split
        .backward(&saved, HostGrad(&x.dout))
        .expect("their backward");
    assert_eq!(g.dsinks.map(|d| d.len()), Some(2));

    // One head over a binding splits along its sequence (backward_split_head.rs) in Average
    // mode; Learned weights outgrow a binding first, which the split says.
    let long = Shape::new(1, 1, 2000, 8);
    let y = inputs(1, long);
    let learned =
        FmaConfig::new(8, 2).downsample(Downsample::Learned(random_learned(1, 8, 8, 2, 2000)));
    let e = Attention::fma(ctx, learned)
        .unwrap()
        .max_binding(LIMIT)
        .unwrap()
        .train(&Problem::new(long), Host::new(&y.q, &y.k, &y.v))
        .expect_err("one Learned head over a binding");
    assert!(
        matches!(&e, FmaError::LimitExceeded { what, .. } if what.contains("Learned")),
        "{e}"
    );
}
