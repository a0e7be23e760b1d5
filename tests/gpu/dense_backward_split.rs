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
//!
//! One head over the binding (issue 27) trains split along its sequence: the `split_head`
//! tests below (their header says what equals the unsplit run and why).

use crate::common::gradients::{compare_all, host_gradients, inputs, regrouped};
use crate::common::split::{
    bitwise_but_sums, resident_backward_refused, resident_training_refused, SplitCase,
};
use crate::common::{browser_like_gpu, gpu};
use multipole_attn::cpu::{self, widen};
use multipole_attn::gpu::{Attention, GpuContext, Host};
use multipole_attn::random::fresh_seed;
use multipole_attn::{FmaError, Method, Problem, Shape, Variants};

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
    // One head over a binding trains split (`split_head` below); its resident backward is
    // refused as the runs' is, its poisoned gradients untouched.
    let long = Shape::new(1, 1, 2000, 8);
    let y = inputs(1, long);
    let (_, saved) = split
        .train(&Problem::new(long), Host::new(&y.q, &y.k, &y.v))
        .expect("one head over a binding trains split");
    resident_backward_refused(ctx, &split, (&saved, &y.dout), "a split head");
}

/// One case of a head split across bindings (the header of the test below): O, the LSE and the
/// gradients against the unsplit run (bitwise when `same_cuts`, else within WTOL of the
/// scale), itself, the f64 reference; every gradient finite.
fn check_split_head(att: (&Attention, &Attention), seed: u64, p: &Problem, same_cuts: bool) {
    // `regrouped` asserts WTOL; `same_cuts` asks for 0.
    let (whole, split) = att;
    let label = format!("seed {seed} {} causal={}", p.shape, p.causal);
    let x = inputs(seed, p.shape);
    let (out_u, g_u) = host_gradients(whole, p, &x);
    let (out_s, g_s) = host_gradients(split, p, &x);
    // Gradients come back through the host: no poison to keep, so every element must be a
    // number (an unwritten chunk reads as the staging buffer's zeros or garbage: the
    // comparisons below catch it).
    for (name, g) in [("dQ", &g_s.dq), ("dK", &g_s.dk), ("dV", &g_s.dv)] {
        assert!(
            g.iter().all(|v| v.is_finite()),
            "{label}: {name} not finite"
        );
    }
    let mut worst = 0.0f64;
    for (name, a, b) in [
        ("O", &out_s.o, &out_u.o),
        (
            "LSE",
            out_s.lse.as_ref().unwrap(),
            out_u.lse.as_ref().unwrap(),
        ),
        ("dQ", &g_s.dq, &g_u.dq),
        ("dK", &g_s.dk, &g_u.dk),
        ("dV", &g_s.dv, &g_u.dv),
    ] {
        let off = regrouped(&label, name, a, b);
        assert!(
            !same_cuts || off == 0.0,
            "{label}: {name} off the unsplit bits by {off:.2e}"
        );
        worst = worst.max(off);
    }
    assert!(g_s.weights.is_none() && g_s.dsinks.is_none(), "{label}");
    let (_, again) = host_gradients(split, p, &x);
    assert_eq!(again, g_s, "{label}: two split runs differ");
    let r = cpu::backward(
        &Method::Dense,
        p,
        (&widen(&x.q), &widen(&x.k), &widen(&x.v)),
        &widen(&x.dout),
    )
    .unwrap();
    let to_ref = compare_all(&label, &g_s, &r);
    eprintln!("{label}: split vs unsplit {worst:.2e} of the scale, against f64 {to_ref:.2e}");
}

/// The dense backward of one head longer than a binding (issue 27,
/// `plan::DenseBackwardSplitPlan`): under 32 KiB per binding a K/V head's group of query heads
/// runs in chunks of 1024 / group rows of d = 8 (512 / group of d = 16), so n = 3001 is 3
/// chunks, 1025 in groups of 2 is 3 (the last of one row), 2000 is 4. Against the unsplit run
/// on the same context:
/// - with the default parts (8192 keys per dispatch) a chunk boundary cuts a sum the unsplit
///   run keeps whole: dQ, dK, dV within WTOL = 1e-5 of the tensor's scale (max(1, max|g|)).
///   Why: each chunk's partial is rounded once to f32 before it is added, a few roundings of
///   at most 2^-24 of partial sums within a few times the scale per boundary (3 boundaries at
///   most; we measure up to 9e-7: 11x headroom); O and the LSE likewise (the split forward
///   resumes its partial at each key chunk). A pair missed or doubled moves an element by its
///   share of the sum, about 1/chunks of the scale (dropping the dQ pass's `accumulate` was
///   tried once: off by 0.65 of the scale);
/// - with 128 keys (queries over a group) per dispatch on both, chunks are whole parts and
///   every sum is cut where the unsplit run cuts it: the same bits.
///
/// Twice the same bits, and within the backward tolerance of the f64 reference. Causal and
/// bidirectional, GQA groups of 2 (dK, dV summed over the group's heads in the same
/// dispatches), two batch elements. Fresh seeds (printed).
#[test]
fn split_head_backward_runs_query_and_key_chunk_pairs_and_matches_unsplit() {
    let Some(ctx) = gpu() else { return };
    let seed = fresh_seed();
    eprintln!("seed {seed}");
    let cases = [
        (Shape::new(1, 1, 3001, 8), false),
        (Shape::new(1, 1, 3001, 8), true),
        (Shape::new(1, 2, 1025, 8).with_kv_heads(1), true),
        (Shape::new(2, 2, 2000, 8).with_kv_heads(1), false),
        (Shape::new(1, 1, 1025, 16), true),
    ];
    for keys in [None, Some(128)] {
        let make = |cap: u64| {
            let a = Attention::dense(ctx).unwrap().max_binding(cap).unwrap();
            match keys {
                Some(k) => a.keys_per_dispatch(k).unwrap(),
                None => a,
            }
        };
        let (whole, split) = (make(u64::MAX), make(LIMIT));
        for (i, &(shape, causal)) in cases.iter().enumerate() {
            let p = Problem::new(shape).causal(causal);
            // The split run cannot pass by not splitting: one head does not fit a binding.
            let one = Problem::new(Shape::new(1, 1, shape.seq, shape.head_dim));
            assert!(
                matches!(
                    split.backward_plan(&one),
                    Err(FmaError::LimitExceeded { .. })
                ),
                "{shape}: one head fits"
            );
            let s = seed.wrapping_add(i as u64 * 7919);
            // Chunks of 512 or 1024 rows are whole parts of 128 (the last chunk ends at n).
            let same_cuts = keys.is_some();
            check_split_head((&whole, &split), s, &p, same_cuts);
        }
    }
}

/// A browser's limits (no subgroups: the plain kernels; 256 invocations) under the same
/// 32 KiB cap: a causal GQA head of 1025 rows, against the unsplit run on that context.
#[test]
fn split_head_backward_runs_the_plain_kernels_under_browser_limits() {
    let Some(ctx) = browser_like_gpu() else {
        return;
    };
    let seed = fresh_seed();
    eprintln!("seed {seed}");
    let whole = Attention::dense(ctx).unwrap();
    let split = Attention::dense(ctx).unwrap().max_binding(LIMIT).unwrap();
    let p = Problem::new(Shape::new(1, 2, 1025, 8).with_kv_heads(1)).causal(true);
    check_split_head((&whole, &split), seed, &p, false);
}

/// What the split backward does not take is a typed error before the forward runs: the
/// softmax variants (the split forward refuses them) and fewer keys than queries.
#[test]
fn split_head_training_refuses_what_the_split_forward_refuses() {
    let Some(ctx) = gpu() else { return };
    let shape = Shape::new(1, 1, 2000, 8);
    let x = inputs(fresh_seed(), shape);
    let split = Attention::dense(ctx).unwrap().max_binding(LIMIT).unwrap();
    let softcap = Variants {
        softcap: Some(30.0),
        ..Variants::default()
    };
    let e = split
        .train(
            &Problem::new(shape).variants(softcap),
            Host::new(&x.q, &x.k, &x.v),
        )
        .expect_err("variants over a split head");
    assert!(
        matches!(&e, FmaError::LimitExceeded { what, .. } if what.contains("variants")),
        "{e}"
    );
    let cross = Shape::cross(1, 1, 1500, 2000, 8);
    let y = inputs(fresh_seed(), cross);
    let e = split
        .train(&Problem::new(cross), Host::new(&y.q, &y.k, &y.v))
        .expect_err("a cross head over a binding");
    assert!(matches!(&e, FmaError::LimitExceeded { .. }), "{e}");
}
