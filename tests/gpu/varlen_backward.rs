//! The backward of variable-length batches (`Sequences`, packed and padded) against the f64
//! reference run sequence by sequence alone (`cpu::fma_backward_varlen`, itself checked
//! against finite differences of the varlen forward), every gradient buffer poisoned with NaN
//! before the run (padding rows too: the padded batch's last pass must zero them); fresh
//! seeds (printed); the host API and a second run give the same bits.
//!
//! Tolerance: tests/gpu/backward.rs's, |gpu - ref| <= TOL (max(1, max|ref|) + |ref|) per tensor
//! with TOL = 2e-4, for the same reasons: each sequence is an ordinary FMA backward (its own
//! levels). A gradient that leaked across a sequence boundary or used another sequence's
//! windows moves some element by >= 1e-2 of the scale.

use crate::common;
use crate::common::gradients::{buffer, compare_all, gpu_gradients, inputs, nan, Inputs};

use crate::common::{gpu, random_learned};
use multipole_attn::cpu::{self, widen};
use multipole_attn::gpu::{
    Attention, GpuContext, GpuTensors, GradTensors, Host, HostGrad, Resident, ResidentGrad,
};
use multipole_attn::random::fresh_seed;
use multipole_attn::{Downsample, FmaConfig, Gradients, Method, Problem, Queries, Sequences};

/// The variable-length problem of `seqs` with `heads`, `kv_heads` and `d`.
fn varlen(seqs: &Sequences, (heads, kv_heads, d): (usize, usize, usize), causal: bool) -> Problem {
    Problem::varlen(seqs.clone(), heads, kv_heads, d).causal(causal)
}

/// Checks every gradient of one batch against the reference, and that the host API gives
/// the same bits as the buffers; returns the worst scaled error.
fn check(ctx: &GpuContext, label: &str, x: &Inputs, p: &Problem, cfg: &FmaConfig) -> f64 {
    let method = Method::Fma(cfg.clone());
    let fma = Attention::new(ctx, method.clone()).unwrap_or_else(|e| panic!("{label}: {e}"));
    let g = gpu_gradients(ctx, &fma, x, p);
    let r = cpu::backward(
        &method,
        p,
        (&widen(&x.q), &widen(&x.k), &widen(&x.v)),
        &widen(&x.dout),
    )
    .unwrap();
    let worst = compare_all(label, &g, &r);
    // The host API: the same bits (deterministic: no atomics, fixed summation order).
    let (_, saved) = fma.train(p, Host::new(&x.q, &x.k, &x.v)).expect("train");
    let host = fma.backward(&saved, HostGrad(&x.dout)).expect("backward");
    assert_eq!(host.dq, g.dq, "{label}: host dQ vs buffers");
    assert_eq!(host.dk, g.dk, "{label}: host dK vs buffers");
    assert_eq!(host.dv, g.dv, "{label}: host dV vs buffers");
    worst
}

/// The awkward lengths 1, 7, 97 and 1025 in one pack, grouped-query heads, causal and not,
/// Average and Learned.
#[test]
fn a_packed_backward_equals_each_sequence_alone() {
    let Some(ctx) = gpu() else { return };
    let seed = fresh_seed();
    eprintln!("seed {seed}");
    let seqs = Sequences::packed(vec![1, 7, 97, 1025]).unwrap();
    let (heads, kv_heads, d, m, p) = (2, 1, 16, 16, 2);
    let shape = seqs.shape(heads, kv_heads, d);
    let x = inputs(seed, shape);
    let mut worst = 0.0f64;
    for causal in [false, true] {
        for learned in [false, true] {
            let mut cfg = FmaConfig::new(m, p);
            if learned {
                cfg = cfg.downsample(Downsample::Learned(random_learned(seed, d, m, p, 1025)));
            }
            let label = format!("seed {seed} causal={causal} learned={learned}");
            let problem = varlen(&seqs, (heads, kv_heads, d), causal);
            worst = worst.max(check(ctx, &label, &x, &problem, &cfg));
        }
    }
    eprintln!("worst scaled error {worst:.2e}");
}

/// A padded batch (with an empty row and a full one): the reference's gradients, and 0 on
/// every padding row (poisoned before the run).
#[test]
fn a_padded_backward_is_zero_on_the_padding() {
    let Some(ctx) = gpu() else { return };
    let seed = fresh_seed();
    eprintln!("seed {seed}");
    let seqs = Sequences::padded(100, vec![100, 3, 0, 57]).unwrap();
    let (heads, kv_heads, d, m, p) = (4, 2, 8, 8, 2);
    let shape = seqs.shape(heads, kv_heads, d);
    let x = inputs(seed, shape);
    let cfg =
        FmaConfig::new(m, p).downsample(Downsample::Learned(random_learned(seed, d, m, p, 100)));
    let problem = varlen(&seqs, (heads, kv_heads, d), true);
    let worst = check(ctx, &format!("seed {seed} padded"), &x, &problem, &cfg);
    eprintln!("worst scaled error {worst:.2e}");
}

/// Ten thousand sequences of 1..9 tokens and one of 300 in one call (no per-sequence
/// dispatch).
#[test]
fn ten_thousand_short_sequences_beside_a_long_one() {
    let Some(ctx) = gpu() else { return };
    let seed = fresh_seed();
    eprintln!("seed {seed}");
    let mut lengths: Vec<usize> = (0..10_000).map(|i| 1 + (i * 7) % 9).collect();
    lengths.insert(5000, 300);
    let seqs = Sequences::packed(lengths).unwrap();
    let shape = seqs.shape(1, 1, 4);
    let x = inputs(seed, shape);
    let cfg = FmaConfig::new(4, 1);
    let problem = varlen(&seqs, (1, 1, 4), false);
    let worst = check(
        ctx,
        &format!("seed {seed} 10 001 sequences"),
        &x,
        &problem,
        &cfg,
    );
    eprintln!("worst scaled error {worst:.2e}");
}

/// Coarse queries (algorithm.md §6, bidirectional) over a pack and a padded batch: each
/// sequence's coarse-query rows pool only its own tokens, Average and Learned (the query
/// weights' gradients summed over the sequences).
#[test]
fn coarse_query_batches_equal_each_sequence_alone() {
    let Some(ctx) = gpu() else { return };
    let seed = fresh_seed();
    eprintln!("seed {seed}");
    let (heads, kv_heads, d, m, p) = (2, 1, 8, 8, 2);
    let mut worst = 0.0f64;
    for seqs in [
        Sequences::packed(vec![1, 7, 97, 300]).unwrap(),
        Sequences::padded(60, vec![60, 0, 13]).unwrap(),
    ] {
        let shape = seqs.shape(heads, kv_heads, d);
        let x = inputs(seed, shape);
        for learned in [false, true] {
            let mut cfg = FmaConfig::new(m, p).queries(Queries::Coarse);
            if learned {
                cfg = cfg.downsample(Downsample::Learned(random_learned(seed, d, m, p, 300)));
            }
            let label = format!("seed {seed} {seqs:?} coarse queries learned={learned}");
            let problem = varlen(&seqs, (heads, kv_heads, d), false);
            worst = worst.max(check(ctx, &label, &x, &problem, &cfg));
        }
    }
    eprintln!("worst scaled error {worst:.2e}");
}

/// Exact attention's backward of variable-length batches (`Method::Dense`, every sequence
/// attending to itself) against `cpu::dense_backward_varlen`: a pack of awkward lengths with
/// grouped-query heads, causal and not, once in chunks of one tile (the longest sequence's
/// 130 keys in 5 dispatches: shorter sequences finish early), and a padded batch with an empty
/// row (its padding poisoned before the run must come back 0). The host API gives the same bits.
#[test]
fn dense_batches_equal_each_sequence_alone() {
    let Some(ctx) = gpu() else { return };
    let seed = fresh_seed();
    eprintln!("seed {seed}");
    let packed = Sequences::packed(vec![1, 7, 97, 130]).unwrap();
    let padded = Sequences::padded(100, vec![100, 3, 0, 57]).unwrap();
    let mut worst = 0.0f64;
    for (seqs, causal, keys) in [
        (&packed, false, None),
        (&packed, true, None),
        (&packed, true, Some(40)),
        (&padded, true, None),
    ] {
        let label = format!(
            "seed {seed} {:?} causal={causal} keys {keys:?}",
            seqs.layout
        );
        let shape = seqs.shape(4, 2, 16);
        let x = inputs(seed, shape);
        let problem = varlen(seqs, (4, 2, 16), causal);
        let mut dense = Attention::dense(ctx).unwrap();
        if let Some(keys) = keys {
            dense = dense.keys_per_dispatch(keys).unwrap();
        }
        let (q, k, v) = (
            buffer(ctx, "q", &x.q),
            buffer(ctx, "k", &x.k),
            buffer(ctx, "v", &x.v),
        );
        let (o, lse) = (
            nan(ctx, "o", shape.elements()),
            nan(ctx, "lse", shape.rows()),
        );
        let t = GpuTensors {
            q: &q,
            k: &k,
            v: &v,
            out: &o,
            lse: Some(&lse),
        };
        let ((), saved) = dense.train(&problem, Resident(t)).expect("forward");
        let dout = buffer(ctx, "dout", &x.dout);
        let (dq, dk, dv) = (
            nan(ctx, "dq", shape.elements()),
            nan(ctx, "dk", shape.kv_elements()),
            nan(ctx, "dv", shape.kv_elements()),
        );
        let g = GradTensors {
            dq: &dq,
            dk: &dk,
            dv: &dv,
            weights: None,
        };
        let io = ResidentGrad {
            dout: &dout,
            grads: g,
        };
        dense.backward(&saved, io).expect("backward");
        let read = |b: &wgpu::Buffer, len: usize| common::read_buffer(ctx, b)[..len].to_vec();
        let got = Gradients {
            dq: read(&dq, shape.elements()),
            dk: read(&dk, shape.kv_elements()),
            dv: read(&dv, shape.kv_elements()),
            weights: None,
            dsinks: None,
        };
        let r = cpu::dense_backward_varlen(
            (&widen(&x.q), &widen(&x.k), &widen(&x.v), &widen(&x.dout)),
            shape,
            seqs,
            causal,
        )
        .unwrap();
        worst = worst.max(compare_all(&label, &got, &r));
        let (_, saved) = dense.train(&problem, Host::new(&x.q, &x.k, &x.v)).unwrap();
        assert_eq!(
            dense.backward(&saved, HostGrad(&x.dout)).unwrap(),
            got,
            "{label}: host API"
        );
    }
    eprintln!("worst scaled dense error {worst:.2e}");
}
