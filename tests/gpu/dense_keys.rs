//! Dense attention over long key ranges: a query row attends its keys in dispatches of at most
//! `plan::DENSE_KEY_TILES_PER_DISPATCH` key tiles, each resuming the rows' partial (O, LSE)
//! (`shaders/dense_attention.wgsl`), because llvmpipe stops an invocation's loops after 65535
//! iterations in all: before the key chunks, 16 queries over 32768 keys came back wrong on
//! lavapipe, and from 896 keys on at d = 256 without subgroups (docs/perf.md, change 9). Few
//! queries over 40 000+ keys keep this quick: one workgroup per head.
//!
//! Tolerance: that of tests/gpu/forward.rs, |gpu - ref| <= 5e-5 + 5e-5 |ref| for O and
//! 5e-5 + 1e-5 |ref| for the LSE (N(0, 1) inputs, an f32 softmax over n positive terms: a few
//! 1e-7 measured here). A key tile skipped or attended twice, or a chunk's partial dropped, moves
//! O by ~1e-2 (the error seen before the fix was 3e-2 .. 5e-2).

use crate::common::{browser_like_gpu, closeness, gpu, Poisoned, DENSE_KERNELS};
use multipole_attn::cpu::{self, widen};
use multipole_attn::gpu::{Attention, GpuContext, Host, Resident};
use multipole_attn::random::{fresh_seed, normal_tensor};
use multipole_attn::{Problem, Sequences, Shape};

const O_ATOL: f64 = 5e-5;
const O_RTOL: f64 = 5e-5;
const LSE_ATOL: f64 = 5e-5;
const LSE_RTOL: f64 = 1e-5;

/// Random inputs of `shape` and the f64 reference.
struct Case {
    label: String,
    problem: Problem,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    r: cpu::Reference,
}

impl Case {
    fn new(shape: Shape, causal: bool) -> Self {
        let seed = fresh_seed();
        let q = normal_tensor(seed, shape.elements());
        let k = normal_tensor(seed ^ 0x9e37_79b9, shape.kv_elements());
        let v = normal_tensor(seed ^ 0x7f4a_7c15, shape.kv_elements());
        let r = cpu::dense_attention(&widen(&q), &widen(&k), &widen(&v), shape, causal).unwrap();
        let label = format!("seed {seed} {shape} causal {causal}");
        Self {
            label,
            problem: Problem::new(shape).causal(causal),
            q,
            k,
            v,
            r,
        }
    }

    /// Runs `dense` on this case's problem through NaN-poisoned caller buffers and checks O
    /// and the LSE against the reference.
    fn check(&self, ctx: &GpuContext, dense: &Attention, what: &str) {
        let label = format!("{what} {}", self.label);
        let shape = self.problem.shape;
        let bufs = Poisoned::new(ctx, &self.q, &self.k, &self.v, shape);
        dense
            .forward(&self.problem, Resident(bufs.tensors()))
            .unwrap_or_else(|e| panic!("{label}: {e}"));
        let (o, lse) = bufs.read(ctx);
        let co = closeness(&o, &self.r.o, O_ATOL, O_RTOL);
        assert_eq!(co.violations, 0, "{label}: O {co:?}");
        check_lse(&label, &lse, &self.r.lse);
    }
}

/// The LSE against the reference; a row without keys (padding, or a causal query before the
/// first key of a shorter K) must be exactly -inf.
fn check_lse(label: &str, got: &[f32], want: &[f64]) {
    assert_eq!(got.len(), want.len(), "{label}: LSE length");
    for (i, (&a, &b)) in got.iter().zip(want).enumerate() {
        if b == f64::NEG_INFINITY {
            assert_eq!(a, f32::NEG_INFINITY, "{label}: LSE of key-less row {i}");
        } else {
            assert!(
                (a as f64 - b).abs() <= LSE_ATOL + LSE_RTOL * b.abs(),
                "{label}: LSE row {i}: {a} vs {b}"
            );
        }
    }
}

/// 16 queries over 40 961 keys at d = 64 (the queries are the last 16 positions when causal),
/// on the subgroup variant and on the plain one (browser limits: 16 KiB of workgroup memory).
/// d = 256 spends the most loop iterations per key: the plain variant (BK = 7 there) was wrong
/// from 896 keys on without the chunks (240 keys per dispatch now), so 4099 keys show it.
#[test]
fn long_key_ranges_are_attended_in_chunks_on_every_variant() {
    let Some(ctx) = gpu() else { return };
    let Some(plain) = browser_like_gpu() else {
        return;
    };
    assert!(plain.subgroup_kernels().is_none());
    for (d, keys) in [(64, 40_961), (256, 4_099)] {
        for causal in [false, true] {
            let case = Case::new(Shape::cross(1, 1, 16, keys, d), causal);
            for (what, ctx) in [("default", ctx), ("browser limits", plain)] {
                for kernel in DENSE_KERNELS {
                    let dense = Attention::dense(ctx).unwrap().dense_kernel(kernel).unwrap();
                    case.check(ctx, &dense, &format!("{what} {kernel:?}"));
                }
            }
        }
    }
}

/// Small key chunks on small problems: several heads (grouped-query too), a chunk boundary
/// inside the causal diagonal of a query tile, a last chunk of one key, one tile per chunk;
/// more queries than keys (causal, bottom-right: the first 230 rows see no key, O = 0 and
/// LSE = -inf, and rows of one tile on both sides of that edge resume across chunks).
#[test]
fn small_key_chunks_merge_to_the_reference() {
    let Some(ctx) = gpu() else { return };
    for (shape, keys) in [
        (Shape::new(1, 3, 200, 16), 64),
        (Shape::cross(2, 4, 70, 257, 20).with_kv_heads(2), 32),
        (Shape::cross(1, 2, 5, 1000, 3), 1),
        (Shape::cross(1, 2, 300, 70, 16).with_kv_heads(1), 32),
    ] {
        for causal in [false, true] {
            let case = Case::new(shape, causal);
            for kernel in DENSE_KERNELS {
                let dense = Attention::dense(ctx)
                    .unwrap()
                    .keys_per_dispatch(keys)
                    .unwrap()
                    .dense_kernel(kernel)
                    .unwrap();
                case.check(ctx, &dense, &format!("{keys} keys per dispatch {kernel:?}"));
            }
        }
    }
}

/// A variable-length batch in small key chunks: each sequence's rows end in the chunk that
/// holds its last key (shorter sequences return from the later chunks untouched), packed and
/// padded, causal and not, against each sequence alone; the padding's O = 0, LSE = -inf.
#[test]
fn variable_length_batches_take_key_chunks_too() {
    let Some(ctx) = gpu() else { return };
    let seed = fresh_seed();
    for seqs in [
        Sequences::packed(vec![1, 70, 33, 129]).unwrap(),
        Sequences::padded(129, vec![129, 0, 40]).unwrap(),
    ] {
        let shape = seqs.shape(2, 1, 8);
        let q = normal_tensor(seed, shape.elements());
        let k = normal_tensor(seed ^ 0x9e37_79b9, shape.kv_elements());
        let v = normal_tensor(seed ^ 0x7f4a_7c15, shape.kv_elements());
        for (causal, kernel) in [false, true]
            .into_iter()
            .flat_map(|c| DENSE_KERNELS.map(|k| (c, k)))
        {
            let label = format!("seed {seed} {seqs:?} causal {causal} {kernel:?}");
            let problem = Problem::varlen(seqs.clone(), 2, 1, 8).causal(causal);
            let dense = Attention::dense(ctx)
                .unwrap()
                .keys_per_dispatch(32)
                .unwrap()
                .dense_kernel(kernel)
                .unwrap();
            let out = dense
                .forward(&problem, Host::new(&q, &k, &v))
                .unwrap_or_else(|e| panic!("{label}: {e}"));
            let r = cpu::dense_attention_varlen(
                &widen(&q),
                &widen(&k),
                &widen(&v),
                shape,
                &seqs,
                causal,
            )
            .unwrap();
            let co = closeness(&out.o, &r.o, O_ATOL, O_RTOL);
            assert_eq!(co.violations, 0, "{label}: O {co:?}");
            check_lse(&label, out.lse.as_ref().unwrap(), &r.lse);
        }
    }
}
