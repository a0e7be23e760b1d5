//! Training a variable-length batch of host tensors over one storage binding (issue 27): with
//! the library capped at a small binding (`Attention::max_binding`, on the shared context, so
//! the grouped and the unsplit run use the same kernels), `train` + `backward` run a group of
//! sequences at a time (`gpu/fma/backward_groups.rs`, `gpu/dense/backward_groups.rs`), a
//! sequence too long for a group alone as a batch of one (runs of heads, or FMA's split along
//! the sequence). Against the unsplit run on the same context (every tensor, its padding rows
//! included: 0 and -inf):
//! - O, the LSE, dQ, dK, dV: within WTOL = 1e-5 of each tensor's scale (max(1, max|x|)). Not
//!   bitwise: a group's plan follows its own longest sequence (tiles per block, levels), as
//!   the forward's groups do (tests/gpu/varlen.rs), and a sequence trained alone takes the
//!   ordinary path (runs of heads summing a K/V head's group on the host, or the split head's
//!   chunked sums); each is the same f32 terms in another order, a few roundings of 2^-24 of
//!   partial sums within a few times the scale (we measure at most 4.4e-7 of the scale, 20x
//!   headroom; where every group keeps whole K/V groups and the batch's plan, as the Learned
//!   cases at 32 KiB, O, dQ, dK and dV come out bitwise: the printed lines count the
//!   differing elements). A sequence's gradient that came from another group, or was left
//!   out, moves elements by O(1) of the scale.
//! - the learned weights' and the sinks' gradients (sums over every sequence and head): each
//!   group's sum added in group order in f32 against the unsplit run's one tree of partial
//!   sums: the same WTOL, for the same reason.
//!
//! The grouped run is bitwise the same twice, and within the backward tolerance (`TOL`, tests/
//! gpu/backward.rs) of the f64 reference run sequence by sequence (`cpu::backward` of the
//! varlen problem). Cases: awkward lengths (1, 7, 97, 1025), packed and padded (with an empty
//! row), GQA groups of 2, causal and bidirectional, Average and Learned, coarse queries,
//! sinks with a softcap, a sequence split along itself. The host API returns fresh vectors
//! (no caller buffer to poison): an element of a sequence that no group wrote would be 0 and
//! fail against the reference; resident gradients of a grouped forward are a typed error that
//! leaves their NaN-poisoned buffers untouched. Fresh seeds (printed).

use crate::common::gradients::{inputs, regrouped};
use crate::common::split::{
    regrouped_sums, resident_backward_refused, resident_training_refused, SplitCase,
};
use crate::common::{gpu, random_learned};
use multipole_attn::gpu::{Attention, GpuContext, Host};
use multipole_attn::random::fresh_seed;
use multipole_attn::{
    Downsample, FmaConfig, FmaError, Method, Problem, Queries, Sequences, Variants,
};

/// How many elements of `a` and `b` differ in their bits (printed: how far from bitwise).
fn differ(a: &[f32], b: &[f32]) -> usize {
    a.iter()
        .zip(b)
        .filter(|(x, y)| x.to_bits() != y.to_bits())
        .count()
}

/// The LSE with its padding rows' -inf checked equal on both sides and then set to 0, so the
/// scaled comparison sees finite rows only.
fn finite_lse(label: &str, a: &[f32], b: &[f32]) -> (Vec<f32>, Vec<f32>) {
    assert_eq!(a.len(), b.len(), "{label}: LSE length");
    for (i, (&x, &y)) in a.iter().zip(b).enumerate() {
        assert_eq!(
            x == f32::NEG_INFINITY,
            y == f32::NEG_INFINITY,
            "{label}: LSE row {i}: {x} against {y}"
        );
    }
    let clean = |v: &[f32]| -> Vec<f32> {
        v.iter()
            .map(|&x| if x == f32::NEG_INFINITY { 0.0 } else { x })
            .collect()
    };
    (clean(a), clean(b))
}

/// One case: the grouped run (binding capped at `cap` bytes) against the unsplit one, itself
/// and the f64 reference. Returns the worst difference from the unsplit run (of the scale).
fn check(ctx: &GpuContext, seed: u64, method: &Method, p: &Problem, cap: u64) -> f64 {
    let what = match method {
        Method::Dense => "dense".to_string(),
        Method::Fma(c) => format!(
            "FMA m={} p={} {:?} {}",
            c.block,
            c.rank,
            c.queries,
            if c.downsample == Downsample::Average {
                "Average"
            } else {
                "Learned"
            }
        ),
    };
    let label = format!(
        "seed {seed} {what} {:?} {} causal={} {:?}",
        p.sequences.as_ref().map(|s| &s.lengths),
        p.shape,
        p.causal,
        p.variants
    );
    let c = SplitCase::new(ctx, label, seed, (method, p), cap);
    let label = &c.label;
    // The grouped run cannot pass by not splitting: the batch's backward is over the binding.
    c.assert_over_binding(p, "the batch");
    let (out_u, g_u) = c.unsplit();
    let (out_s, g_s) = c.split();
    let mut worst = regrouped(label, "O", &out_s.o, &out_u.o);
    let (ls, lu) = finite_lse(
        label,
        out_s.lse.as_ref().unwrap(),
        out_u.lse.as_ref().unwrap(),
    );
    worst = worst.max(regrouped(label, "LSE", &ls, &lu));
    let mut bits = vec![("O", differ(&out_s.o, &out_u.o), out_u.o.len())];
    for (name, a, b) in [
        ("dQ", &g_s.dq, &g_u.dq),
        ("dK", &g_s.dk, &g_u.dk),
        ("dV", &g_s.dv, &g_u.dv),
    ] {
        worst = worst.max(regrouped(label, name, a, b));
        bits.push((name, differ(a, b), b.len()));
    }
    // The learned weights' and the sinks' gradients.
    worst = worst.max(regrouped_sums(label, &g_s, &g_u));
    // Deterministic: the same bits from a second training step.
    c.assert_repeatable(&out_s, &g_s);
    let to_ref = c.against_reference(&g_s);
    eprintln!(
        "{label}: against unsplit {worst:.2e} (bits differ: {bits:?}), against f64 {to_ref:.2e}"
    );
    worst
}

/// The variable-length problem of `seqs` with `(heads, kv_heads, d)`.
fn varlen(seqs: &Sequences, (heads, kv_heads, d): (usize, usize, usize), causal: bool) -> Problem {
    Problem::varlen(seqs.clone(), heads, kv_heads, d).causal(causal)
}

/// FMA over a 16 KiB binding: a pack of awkward lengths with GQA groups of 2 (the 300 and 200
/// token sequences do not fit a group and train alone, in runs of single heads whose K/V
/// head's gradients are summed on the host), causal and not; a padded batch with an empty
/// row; a 1025-token sequence over the binding alone (split along itself); Learned weights
/// and coarse queries under 32 KiB (their weights need it); sinks with a softcap.
#[test]
fn fma_training_over_a_binding_runs_groups_of_sequences() {
    let Some(ctx) = gpu() else { return };
    let seed = fresh_seed();
    eprintln!("seed {seed}");
    let packed = Sequences::packed(vec![1, 97, 300, 7, 200, 60]).unwrap();
    let padded = Sequences::padded(300, vec![300, 0, 17, 250, 1]).unwrap();
    let long = Sequences::packed(vec![5, 1025, 30]).unwrap();
    let sinks = Variants {
        sinks: Some(vec![0.7, -0.4, 0.1, 1.2]),
        softcap: Some(4.0),
        ..Variants::default()
    };
    let average = Method::Fma(FmaConfig::new(16, 2));
    // Some groups hold several sequences (1 and 97 tokens fit together), and 300 does not fit
    // a group of its own: both kinds of group run.
    let capped = Attention::new(ctx, average.clone())
        .unwrap()
        .max_binding(16 << 10)
        .unwrap();
    let fits = |lens: Vec<usize>| {
        let seqs = Sequences::packed(lens).unwrap();
        capped
            .backward_plan(&varlen(&seqs, (4, 2, 8), false))
            .is_ok()
    };
    assert!(fits(vec![1, 97]) && !fits(vec![300]));
    let mut worst = 0.0f64;
    for (i, (method, problem, cap)) in [
        (average.clone(), varlen(&packed, (4, 2, 8), false), 16 << 10),
        (average.clone(), varlen(&packed, (4, 2, 8), true), 16 << 10),
        (average.clone(), varlen(&padded, (2, 1, 8), true), 16 << 10),
        (average.clone(), varlen(&long, (2, 1, 8), true), 16 << 10),
        (average.clone(), varlen(&long, (2, 1, 8), false), 16 << 10),
        (
            average.clone(),
            varlen(&packed, (4, 2, 8), true).variants(sinks.clone()),
            16 << 10,
        ),
    ]
    .into_iter()
    .enumerate()
    {
        let s = seed.wrapping_add(i as u64 * 7919);
        worst = worst.max(check(ctx, s, &method, &problem, cap));
    }
    // Learned weights (keys, values and, with coarse queries, queries: their gradients summed
    // over the groups) at d = 4, p = 1, which fit 32 KiB.
    let (d, m, p) = (4, 16, 1);
    for (i, (queries, causal)) in [(Queries::Fine, true), (Queries::Coarse, false)]
        .into_iter()
        .enumerate()
    {
        let s = seed.wrapping_add(100 + i as u64);
        let w = random_learned(s, d, m, p, packed.max_len());
        let cfg = FmaConfig::new(m, p)
            .queries(queries)
            .downsample(Downsample::Learned(w));
        let problem = varlen(&packed, (4, 2, d), causal);
        worst = worst.max(check(ctx, s, &Method::Fma(cfg), &problem, 32 << 10));
    }
    eprintln!("worst difference from the unsplit run {worst:.2e} of the scale");
}

/// Dense attention over a 16 KiB binding: a pack of awkward lengths with GQA groups of 2,
/// causal and not; a padded batch with an empty row and sinks.
#[test]
fn dense_training_over_a_binding_runs_groups_of_sequences() {
    let Some(ctx) = gpu() else { return };
    let seed = fresh_seed();
    eprintln!("seed {seed}");
    let packed = Sequences::packed(vec![1, 97, 300, 7, 200, 60]).unwrap();
    let padded = Sequences::padded(300, vec![300, 0, 17, 250, 1]).unwrap();
    let sinks = Variants {
        sinks: Some(vec![0.7, -0.4]),
        ..Variants::default()
    };
    let mut worst = 0.0f64;
    for (i, problem) in [
        varlen(&packed, (4, 2, 8), false),
        varlen(&packed, (4, 2, 8), true),
        varlen(&padded, (2, 1, 8), true).variants(sinks),
    ]
    .into_iter()
    .enumerate()
    {
        let s = seed.wrapping_add(i as u64 * 7919);
        worst = worst.max(check(ctx, s, &Method::Dense, &problem, 16 << 10));
    }
    eprintln!("worst difference from the unsplit run {worst:.2e} of the scale");
}

/// What grouped training does not do is a typed error: a dense sequence whose one head is
/// over the binding (the dense backward does not split a head: the error names the
/// sequence), resident buffers over a binding (before the forward: their poisoned outputs
/// stay NaN), and resident gradients of a grouped forward (their poisoned buffers stay NaN).
#[test]
fn what_grouped_training_refuses_is_a_typed_error() {
    let Some(ctx) = gpu() else { return };
    let cap = 16 << 10;
    let long = Sequences::packed(vec![5, 1025, 30]).unwrap();
    let problem = varlen(&long, (2, 1, 8), true);
    let x = inputs(fresh_seed(), problem.shape);
    let dense = Attention::dense(ctx).unwrap().max_binding(cap).unwrap();
    let e = dense
        .train(&problem, Host::new(&x.q, &x.k, &x.v))
        .expect_err("a dense head over a binding");
    assert!(
        matches!(&e, FmaError::LimitExceeded { what, advice, .. }
            if what.contains("sequence 1 of the variable-length batch (1025 tokens)")
                && advice.contains("does not split one head")),
        "{e}"
    );

    let packed = Sequences::packed(vec![1, 97, 300, 7, 200, 60]).unwrap();
    let problem = varlen(&packed, (2, 1, 8), false);
    let shape = problem.shape;
    let x = inputs(fresh_seed(), shape);
    for method in [Method::Fma(FmaConfig::new(16, 2)), Method::Dense] {
        let att = Attention::new(ctx, method.clone())
            .unwrap()
            .max_binding(cap)
            .unwrap();
        // Resident buffers over a binding: refused before the forward (its poisoned outputs
        // stay NaN), saying what to do.
        let label = format!("{method:?}");
        resident_training_refused(
            ctx,
            &att,
            (&problem, &x),
            wgpu::BufferUsages::empty(),
            &label,
        );
        let (_, saved) = att
            .train(&problem, Host::new(&x.q, &x.k, &x.v))
            .expect("host training in groups");
        let e = resident_backward_refused(ctx, &att, (&saved, &x.dout), "groups");
        assert!(
            matches!(&e, FmaError::InvalidConfig { value, .. } if value.contains("groups of sequences")),
            "{label}: {e}"
        );
    }
}
