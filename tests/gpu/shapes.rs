//! Shapes beyond one fixed self-attention length: dense attention with fewer or more queries
//! than keys (`Shape::cross`, causal queries aligned to the last keys, bottom-right, as new
//! tokens attending to a cache; queries before the first key get O = 0, LSE = -inf), FMA's
//! causal chunk against longer keys, the typed errors where lengths cannot differ, and buffers
//! that grow by capacity: a call after a larger one gives the bits a fresh instance gives.
//!
//! Tolerance as `gpu_forward.rs` (5e-5 + 5e-5 |ref| on O, 5e-5 + 1e-5 |ref| on the LSE): the
//! same kernel over a different key range, so the same error budget.

use crate::common::{closeness, gpu, Poisoned};
use multipole_attn::cpu::{self, widen};
use multipole_attn::gpu::{Attention, GpuTensors, Host, HostGrad, Resident};
use multipole_attn::random::{fresh_seed, normal_tensor};
use multipole_attn::{FmaConfig, FmaError, Method, Problem, Queries, Shape};
use wgpu::util::DeviceExt;

const O_ATOL: f64 = 5e-5;
const O_RTOL: f64 = 5e-5;
const LSE_ATOL: f64 = 5e-5;
const LSE_RTOL: f64 = 1e-5;

/// Q (batch, heads, seq, d) and K, V (batch, heads, seq_kv, d) of N(0, 1).
fn inputs(seed: u64, shape: Shape) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    (
        normal_tensor(seed, shape.elements()),
        normal_tensor(seed ^ 0x9e37_79b9, shape.kv_elements()),
        normal_tensor(seed ^ 0x7f4a_7c15, shape.kv_elements()),
    )
}

#[test]
fn dense_attention_with_fewer_or_more_queries_than_keys() {
    let Some(ctx) = gpu() else { return };
    let seed = fresh_seed();
    eprintln!("seed {seed}");
    for (causal, seq, seq_kv) in [
        (false, 1, 1025),
        (false, 97, 1025),
        (false, 1025, 97),
        (true, 1, 1025),
        (true, 97, 1025),
        (true, 200, 201),
        (true, 97, 40),
    ] {
        let shape = Shape::cross(2, 3, seq, seq_kv, 24);
        let (q, k, v) = inputs(seed, shape);
        let label = format!("seed {seed} {shape} causal {causal}");
        let problem = Problem::new(shape).causal(causal);
        let dense = Attention::dense(ctx).unwrap();
        // Through NaN-poisoned caller buffers: an unwritten row fails.
        let (o, lse) = {
            let bufs = Poisoned::new(ctx, &q, &k, &v, shape);
            dense
                .forward(&problem, Resident(bufs.tensors()))
                .unwrap_or_else(|e| panic!("{label}: {e}"));
            bufs.read(ctx)
        };
        let r = cpu::dense_attention(&widen(&q), &widen(&k), &widen(&v), shape, causal).unwrap();
        let co = closeness(&o[..shape.elements()], &r.o, O_ATOL, O_RTOL);
        assert_eq!(co.violations, 0, "{label}: O {co:?}");
        // Rows that see no key: exactly -inf; the others within the tolerance.
        let empty: Vec<bool> = r.lse.iter().map(|&x| x == f64::NEG_INFINITY).collect();
        for (i, &a) in lse[..shape.rows()].iter().enumerate() {
            if empty[i] {
                assert_eq!(a, f32::NEG_INFINITY, "{label}: LSE of key-less row {i}");
            }
        }
        let keep = |x: &[f32]| -> Vec<f32> {
            x.iter()
                .zip(&empty)
                .filter(|(_, &e)| !e)
                .map(|(&v, _)| v)
                .collect()
        };
        let want: Vec<f64> = r.lse.iter().copied().filter(|x| x.is_finite()).collect();
        let cl = closeness(&keep(&lse[..shape.rows()]), &want, LSE_ATOL, LSE_RTOL);
        assert_eq!(cl.violations, 0, "{label}: LSE {cl:?}");
        // The host path gives the same bits.
        let host = dense.forward(&problem, Host::new(&q, &k, &v)).unwrap();
        assert_eq!(host.o, o[..shape.elements()], "{label}");
    }
}

/// FMA's causal chunk: n queries against seq_kv > n keys are rows seq_kv - n .. of the causal
/// FMA over seq_kv tokens (`multipole_attn::cross`), on the GPU as in the reference, forward
/// and backward (dQ of the chunk's rows, dK, dV of every key).
#[test]
fn fma_causal_chunks_are_the_last_rows_of_the_full_causal_forward() {
    let Some(ctx) = gpu() else { return };
    let seed = fresh_seed();
    let method = Method::Fma(FmaConfig::new(8, 2));
    let fma = Attention::new(ctx, method.clone()).unwrap();
    for (seq, seq_kv) in [(1, 97), (37, 200)] {
        let shape = Shape::cross(2, 2, seq, seq_kv, 16).with_kv_heads(1);
        let problem = Problem::new(shape).causal(true);
        let (q, k, v) = inputs(seed, shape);
        let label = format!("seed {seed} {shape}");
        let r = cpu::forward(&method, &problem, &widen(&q), &widen(&k), &widen(&v)).unwrap();
        let out = fma.forward(&problem, Host::new(&q, &k, &v)).unwrap();
        let co = closeness(&out.o, &r.o, O_ATOL, O_RTOL);
        let cl = closeness(out.lse.as_ref().unwrap(), &r.lse, LSE_ATOL, LSE_RTOL);
        assert_eq!(co.violations, 0, "{label}: O {co:?}");
        assert_eq!(cl.violations, 0, "{label}: LSE {cl:?}");
        // The reference is the full causal FMA's last rows, not a restatement of the chunk.
        let full = Shape::new(2, 2, seq_kv, 16).with_kv_heads(1);
        let mut q_full = normal_tensor(seed ^ 5, full.elements());
        for bh in 0..4 {
            let dst = (bh * seq_kv + seq_kv - seq) * 16;
            q_full[dst..dst + seq * 16].copy_from_slice(&q[bh * seq * 16..(bh + 1) * seq * 16]);
        }
        let whole = fma
            .forward(
                &Problem::new(full).causal(true),
                Host::new(&q_full, &k, &v).without_lse(),
            )
            .unwrap();
        for bh in 0..4 {
            let at = (bh * seq_kv + seq_kv - seq) * 16;
            assert_eq!(
                &whole.o[at..at + seq * 16],
                &out.o[bh * seq * 16..(bh + 1) * seq * 16],
                "{label}: head {bh}: the chunk's rows of the full forward"
            );
        }
        let dout = normal_tensor(seed ^ 7, shape.elements());
        let (_, saved) = fma.train(&problem, Host::new(&q, &k, &v)).unwrap();
        let g = fma.backward(&saved, HostGrad(&dout)).unwrap();
        let rg = cpu::backward(
            &method,
            &problem,
            (&widen(&q), &widen(&k), &widen(&v)),
            &widen(&dout),
        )
        .unwrap();
        for (name, got, want) in [
            ("dQ", &g.dq, &rg.dq),
            ("dK", &g.dk, &rg.dk),
            ("dV", &g.dv, &rg.dv),
        ] {
            assert_eq!(got.len(), want.len(), "{label}: {name} length");
            // Within tests/gpu/backward.rs's bound (2e-4 of the scale; N(0, 1) inputs here too).
            let c = closeness(got, want, 1e-4, 1e-4);
            assert_eq!(c.violations, 0, "{label}: {name} {c:?}");
        }
    }
}

#[test]
fn fma_with_two_lengths_and_short_buffers_are_typed_errors() {
    let Some(ctx) = gpu() else { return };
    let shape = Shape::cross(1, 1, 64, 32, 16);
    let (q, k, v) = inputs(1, shape);
    let problem = Problem::new(shape);
    let e = Attention::fma(ctx, FmaConfig::new(8, 2))
        .unwrap()
        .forward(&problem, Host::new(&q, &k, &v).without_lse())
        .unwrap_err();
    assert!(matches!(e, FmaError::ShapeMismatch { .. }), "{e}");
    // Also where the head would be cut along its sequence (a binding of a quarter head).
    let e = Attention::fma(ctx, FmaConfig::new(8, 2))
        .unwrap()
        .max_binding(1024)
        .unwrap()
        .forward(&problem, Host::new(&q, &k, &v).without_lse())
        .unwrap_err();
    assert!(matches!(e, FmaError::ShapeMismatch { .. }), "{e}");
    // K sized for seq rather than seq_kv is refused before anything is recorded.
    let e = Attention::dense(ctx)
        .unwrap()
        .forward(&problem, Host::new(&q, &q, &q).without_lse())
        .unwrap_err();
    assert!(matches!(e, FmaError::ShapeMismatch { .. }), "{e}");
    let buf = |data: &[f32]| {
        ctx.device
            .create_buffer_init(&wgpu::util::BufferInitDescriptor {
                label: None,
                contents: bytemuck::cast_slice(data),
                usage: wgpu::BufferUsages::STORAGE,
            })
    };
    let long = Shape::cross(1, 1, 32, 64, 16);
    let (qb, kb, out) = (buf(&q[..512]), buf(&k), buf(&q[..512]));
    let t = GpuTensors {
        q: &qb,
        k: &kb,
        v: &kb,
        out: &out,
        lse: None,
    };
    let e = Attention::dense(ctx)
        .unwrap()
        .forward(&Problem::new(long), Resident(t))
        .unwrap_err();
    assert!(matches!(e, FmaError::ShapeMismatch { .. }), "{e}");
}

#[test]
fn buffers_grown_for_a_larger_shape_give_a_fresh_instances_bits() {
    let Some(ctx) = gpu() else { return };
    let seed = fresh_seed();
    eprintln!("seed {seed}");
    // (configuration, causal mask)
    let cases = [
        (FmaConfig::new(8, 2), true),
        (FmaConfig::new(8, 2).queries(Queries::Coarse), false),
    ];
    for (cfg, causal) in cases {
        let reused = Attention::fma(ctx, cfg.clone()).unwrap();
        // Grow, shrink, grow one token at a time, as a decoder's prefixes would.
        for n in [300, 97, 1, 98, 99, 301, 500] {
            let shape = Shape::new(1, 2, n, 16);
            let problem = Problem::new(shape).causal(causal);
            let (q, k, v) = inputs(seed + n as u64, shape);
            let got = reused.forward(&problem, Host::new(&q, &k, &v)).unwrap();
            let fresh = Attention::fma(ctx, cfg.clone())
                .unwrap()
                .forward(&problem, Host::new(&q, &k, &v))
                .unwrap();
            assert_eq!(got.o, fresh.o, "seed {seed} n {n} {:?}", cfg.queries);
            assert_eq!(got.lse, fresh.lse, "seed {seed} n {n}");
            if n == 500 {
                // and both are right.
                let method = Method::Fma(cfg.clone());
                let (q, k, v) = (widen(&q), widen(&k), widen(&v));
                let r = cpu::forward(&method, &problem, &q, &k, &v).unwrap();
                let c = closeness(&got.o, &r.o, O_ATOL, O_RTOL);
                assert_eq!(c.violations, 0, "seed {seed}: {c:?}");
            }
        }
        // The backward's scratch grows the same way.
        for n in [200, 50, 201] {
            if cfg.queries == Queries::Coarse {
                break;
            }
            let shape = Shape::new(1, 1, n, 16);
            let problem = Problem::new(shape).causal(causal);
            let (q, k, v) = inputs(seed + 7 * n as u64, shape);
            let dout = normal_tensor(seed + 1, shape.elements());
            let (_, saved) = reused.train(&problem, Host::new(&q, &k, &v)).unwrap();
            let got = reused.backward(&saved, HostGrad(&dout)).unwrap();
            let fresh_fma = Attention::fma(ctx, cfg.clone()).unwrap();
            let (_, saved) = fresh_fma.train(&problem, Host::new(&q, &k, &v)).unwrap();
            let fresh = fresh_fma.backward(&saved, HostGrad(&dout)).unwrap();
            assert_eq!(got.dq, fresh.dq, "seed {seed} n {n}");
            assert_eq!(got.dk, fresh.dk, "seed {seed} n {n}");
            assert_eq!(got.dv, fresh.dv, "seed {seed} n {n}");
        }
    }
}
