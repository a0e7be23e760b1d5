//! f16 storage (issue 29) on the pieces: host tensors over one storage binding run as f32
//! storage runs them (runs of heads, groups of sequences of a variable-length batch, one head
//! split along its sequence), each piece rounded into f16 buffers of the executor's and read
//! back widened; and variable-length batches (packed, padded) that fit. The library is capped
//! with `Attention::max_binding` on the shared context, so the capped and the uncapped runs
//! use the same kernels.
//!
//! Against the uncapped f16 run of the same inputs:
//! - runs of heads, groups of sequences, FMA's split head: O and the LSE to the bit (each piece
//!   computes its rows with the unsplit float operations, as f32's pieces do), and the
//!   training runs' dQ, dK, dV to the bit where whole K/V groups run together;
//! - FMA's split-head backward: dQ to the bit, dK and dV within (1e-5 + 4 2^-11) of their
//!   scale (max(1, max|g|)): the f32 split's regrouped sums are within 1e-5
//!   (backward_split_head.rs); a split head runs one query head at a time, so each of the
//!   group's two query heads stores its own dK, dV as f16 (a rounding of 2^-11 of the scale
//!   each) and their sum is rounded to f16 once more on the host, where the unsplit run
//!   rounds the group's f32 sum once: 3 roundings against 1, within 4 2^-11 of the scale;
//! - dense attention's split head: within the f64 reference's f16 tolerance plus
//!   (key chunks - 1) 2^-11 max|V|: a query chunk resumes its rows' partial O from the
//!   f16 O binding after each key chunk, and a partial O is a convex combination of value
//!   rows, so each resume adds one f16 rounding of at most 2^-11 max|V|.
//!
//! Against the f64 reference: f16.rs's tolerances (its header says why).
//! Outputs are NaN-poisoned where they are the caller's (resident tensors copied in pieces);
//! host outputs are fresh vectors whose every element the pieces fill (lengths checked).

use crate::common::gpu;
use crate::f16::{compare_grad, inputs, Half, LSE_ATOL, LSE_RTOL, O_ATOL, O_RTOL};
use multipole_attn::closeness::closeness;
use multipole_attn::cpu::{self, widen};
use multipole_attn::gpu::{Attention, GpuContext, Host, HostGrad, Resident};
use multipole_attn::plan::{DenseKernel, DenseSplitPlan, KernelLimits};
use multipole_attn::random::{fresh_seed, normal_tensor};
use multipole_attn::storage::{round_to_f16, F16_UNIT_ROUNDOFF};
use multipole_attn::Storage;
use multipole_attn::{FmaConfig, FmaError, Gradients, Method, Problem, Queries, Sequences, Shape};

/// One head of 97 x 16 f32 is 6,208 bytes: 16 KiB holds two heads (counted as f32, as the
/// limits count every storage), so 6 or 8 heads run in runs of two, and a head of 1025 tokens
/// splits along its sequence.
const CAP: u64 = 16 << 10;

/// The cap of the split-head test (its header says why).
const SPLIT_CAP: u64 = 20 << 10;

/// f16 storage on `ctx`, capped at `cap` bytes per binding when given.
fn half(ctx: &GpuContext, method: &Method, cap: Option<u64>, kernel: DenseKernel) -> Attention {
    let a = Attention::new(ctx, method.clone())
        .and_then(|a| a.dense_kernel(kernel))
        .and_then(|a| a.storage(Storage::F16))
        .unwrap();
    match cap {
        Some(bytes) => a.max_binding(bytes).unwrap(),
        None => a,
    }
}

fn bits(x: &[f32]) -> Vec<u32> {
    x.iter().map(|v| v.to_bits()).collect()
}

fn same_bits(label: &str, name: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{label}: {name} length");
    let differ = got
        .iter()
        .zip(want)
        .filter(|(a, b)| a.to_bits() != b.to_bits())
        .count();
    assert_eq!(
        differ,
        0,
        "{label}: {name}: {differ} of {} differ",
        got.len()
    );
}

/// O and the LSE of the f16 run within f16.rs's tolerances of the f64 reference (plus `atol`);
/// padding rows of a padded batch (reference LSE -inf) must hold LSE = -inf exactly
/// (closeness needs finite values).
fn near_reference(
    label: &str,
    (method, p): (&Method, &Problem),
    x: &[Vec<f32>; 3],
    (o, lse): (&[f32], &[f32]),
    atol: f64,
) {
    let r = cpu::forward(method, p, &widen(&x[0]), &widen(&x[1]), &widen(&x[2])).unwrap();
    let co = closeness(o, &r.o, O_ATOL + atol, O_RTOL);
    assert_eq!(co.violations, 0, "{label}: O {co:?}");
    let (mut got, mut want) = (Vec::new(), Vec::new());
    for (i, (&a, &b)) in lse.iter().zip(&r.lse).enumerate() {
        if b == f64::NEG_INFINITY {
            assert_eq!(a, f32::NEG_INFINITY, "{label}: LSE of padding row {i}");
        } else {
            got.push(a);
            want.push(b);
        }
    }
    let cl = closeness(&got, &want, LSE_ATOL, LSE_RTOL);
    assert_eq!(cl.violations, 0, "{label}: LSE {cl:?}");
}

/// The capped run of `p` must take pieces: its whole plan exceeds the cap.
fn assert_pieces(label: &str, capped: &Attention, p: &Problem) {
    let whole = capped.plan(p);
    assert!(
        matches!(whole, Err(FmaError::LimitExceeded { .. })),
        "{label}: the whole tensors fit the cap: {whole:?}"
    );
}

/// Forward, training forward and host backward of `p` capped against uncapped, f16 storage:
/// runs of whole K/V groups, so every output and gradient to the bit (module header).
fn check_runs(ctx: &GpuContext, seed: u64, method: &Method, p: &Problem, kernel: DenseKernel) {
    let shape = p.shape;
    let label = format!(
        "seed {seed} {method:?} {kernel:?} {shape} causal={}",
        p.causal
    );
    let x = inputs(seed, shape);
    let dout = round_to_f16(&normal_tensor(seed + 3, shape.elements()));
    let capped = half(ctx, method, Some(CAP), kernel);
    let whole = half(ctx, method, None, kernel);
    assert_pieces(&label, &capped, p);
    let got = capped.forward(p, Host::new(&x[0], &x[1], &x[2])).unwrap();
    let want = whole.forward(p, Host::new(&x[0], &x[1], &x[2])).unwrap();
    same_bits(&label, "O", &got.o, &want.o);
    same_bits(
        &label,
        "LSE",
        got.lse.as_deref().unwrap(),
        want.lse.as_deref().unwrap(),
    );
    near_reference(
        &label,
        (method, p),
        &x,
        (&got.o, got.lse.as_deref().unwrap()),
        coarse_atol(method, &x[2]),
    );

    let (out, saved) = capped.train(p, Host::new(&x[0], &x[1], &x[2])).unwrap();
    same_bits(&label, "training O", &out.o, &want.o);
    let g = capped.backward(&saved, HostGrad(&dout)).unwrap();
    let (_, saved_w) = whole.train(p, Host::new(&x[0], &x[1], &x[2])).unwrap();
    let w = whole.backward(&saved_w, HostGrad(&dout)).unwrap();
    same_bits(&label, "dQ", &g.dq, &w.dq);
    same_bits(&label, "dK", &g.dk, &w.dk);
    same_bits(&label, "dV", &g.dv, &w.dv);
}

/// Coarse queries store the near field's partial O as f16 before the merge (f16.rs).
fn coarse_atol(method: &Method, v: &[f32]) -> f64 {
    match method {
        Method::Fma(c) if c.queries == Queries::Coarse => {
            F16_UNIT_ROUNDOFF as f64 * v.iter().fold(0.0f32, |a, x| a.max(x.abs())) as f64
        }
        _ => 0.0,
    }
}

#[test]
fn f16_runs_of_heads_equal_the_whole_run() {
    let Some(ctx) = gpu() else { return };
    if !ctx.device.features().contains(wgpu::Features::SHADER_F16) {
        return;
    }
    let seed = fresh_seed();
    eprintln!("seed {seed}");
    let fma = Method::Fma(FmaConfig::new(16, 2));
    for shape in [
        Shape::new(2, 3, 97, 16),
        Shape::new(2, 4, 97, 16).with_kv_heads(2),
    ] {
        for causal in [false, true] {
            let p = Problem::new(shape).causal(causal);
            check_runs(ctx, seed, &fma, &p, DenseKernel::Rows);
            for kernel in [DenseKernel::Rows, DenseKernel::Tiled] {
                check_runs(ctx, seed, &Method::Dense, &p, kernel);
            }
        }
        let coarse = Method::Fma(FmaConfig::new(16, 2).queries(Queries::Coarse));
        check_runs(ctx, seed, &coarse, &Problem::new(shape), DenseKernel::Rows);
    }
}

/// f16 Q, K, V with copy usage (a split head copies them in pieces), NaN-poisoned O and LSE.
fn resident(ctx: &GpuContext, x: &[Vec<f32>; 3], shape: Shape) -> Half {
    let copy = wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST;
    Half::with_usage(ctx, [&x[0], &x[1], &x[2]], shape, copy)
}

#[test]
fn f16_split_head_equals_the_whole_run() {
    let Some(ctx) = gpu() else { return };
    if !ctx.device.features().contains(wgpu::Features::SHADER_F16) {
        return;
    }
    let seed = fresh_seed();
    eprintln!("seed {seed}");
    // One head of 1025 x 16 (65,600 bytes as f32) over a 20 KiB binding, which holds the
    // head's coarse rows of all levels (16,896 bytes: the split backward binds them whole);
    // GQA: two query heads of one K/V head.
    let shape = Shape::new(1, 2, 1025, 16).with_kv_heads(1);
    let x = inputs(seed, shape);
    let dout = round_to_f16(&normal_tensor(seed + 3, shape.elements()));
    let vmax = x[2].iter().fold(0.0f32, |a, v| a.max(v.abs())) as f64;
    let fma = Method::Fma(FmaConfig::new(16, 2));
    for causal in [false, true] {
        let p = Problem::new(shape).causal(causal);
        let label = format!("seed {seed} split head causal={causal}");
        let capped = half(ctx, &fma, Some(SPLIT_CAP), DenseKernel::Rows);
        let whole = half(ctx, &fma, None, DenseKernel::Rows);
        let want = whole.forward(&p, Host::new(&x[0], &x[1], &x[2])).unwrap();
        let got = capped.forward(&p, Host::new(&x[0], &x[1], &x[2])).unwrap();
        same_bits(&label, "O", &got.o, &want.o);
        same_bits(
            &label,
            "LSE",
            got.lse.as_deref().unwrap(),
            want.lse.as_deref().unwrap(),
        );
        near_reference(
            &label,
            (&fma, &p),
            &x,
            (&got.o, got.lse.as_deref().unwrap()),
            0.0,
        );
        // Resident tensors over the binding: copied through the chunks, poisoned O filled.
        let bufs = resident(ctx, &x, shape);
        capped.forward(&p, Resident(bufs.tensors())).unwrap();
        let (o, lse) = bufs.read(ctx, shape);
        same_bits(&label, "resident O", &o, &want.o);
        same_bits(&label, "resident LSE", &lse, want.lse.as_deref().unwrap());
        // Training: the split head's backward.
        let (out, saved) = capped.train(&p, Host::new(&x[0], &x[1], &x[2])).unwrap();
        same_bits(&label, "training O", &out.o, &want.o);
        let g = capped.backward(&saved, HostGrad(&dout)).unwrap();
        let (_, saved_w) = whole.train(&p, Host::new(&x[0], &x[1], &x[2])).unwrap();
        let w = whole.backward(&saved_w, HostGrad(&dout)).unwrap();
        same_bits(&label, "dQ", &g.dq, &w.dq);
        for (name, got, want) in [("dK", &g.dk, &w.dk), ("dV", &g.dv, &w.dv)] {
            let scale = want.iter().fold(1.0f32, |m, v| m.max(v.abs())) as f64;
            let tol = (1e-5 + 4.0 * F16_UNIT_ROUNDOFF as f64) * scale;
            let c = closeness(got, &widen(want), tol, 0.0);
            assert_eq!(c.violations, 0, "{label}: {name} {c:?}");
        }
        let r = cpu::backward(
            &fma,
            &p,
            (&widen(&x[0]), &widen(&x[1]), &widen(&x[2])),
            &widen(&dout),
        )
        .unwrap();
        compare_grad(&label, "dQ", &g.dq, &r.dq);
        compare_grad(&label, "dK", &g.dk, &r.dk);
        compare_grad(&label, "dV", &g.dv, &r.dv);

        // Dense attention: pairs of query and key chunks, the partial O resumed from f16.
        let capped = half(ctx, &Method::Dense, Some(SPLIT_CAP), DenseKernel::Rows);
        let got = capped.forward(&p, Host::new(&x[0], &x[1], &x[2])).unwrap();
        let limits = KernelLimits::from_wgpu(&ctx.limits).capped(SPLIT_CAP);
        let plan = DenseSplitPlan::new(shape.seq, shape.head_dim, causal, &limits).unwrap();
        let chunks = plan.chunks.len();
        assert!(chunks > 1, "{label}: one chunk");
        let atol = (chunks - 1) as f64 * F16_UNIT_ROUNDOFF as f64 * vmax;
        let label = format!("{label} dense ({chunks} chunks)");
        near_reference(
            &label,
            (&Method::Dense, &p),
            &x,
            (&got.o, got.lse.as_deref().unwrap()),
            atol,
        );
        assert_eq!(got.o, round_to_f16(&got.o), "{label}: O not f16");
    }
}

#[test]
fn f16_variable_length_batches() {
    let Some(ctx) = gpu() else { return };
    if !ctx.device.features().contains(wgpu::Features::SHADER_F16) {
        return;
    }
    let seed = fresh_seed();
    eprintln!("seed {seed}");
    let fma = Method::Fma(FmaConfig::new(16, 2));
    let coarse = Method::Fma(FmaConfig::new(16, 2).queries(Queries::Coarse));
    for seqs in [
        Sequences::packed(vec![1, 97, 40, 0, 130]).unwrap(),
        Sequences::padded(130, vec![97, 1, 130]).unwrap(),
    ] {
        let p0 = Problem::varlen(seqs.clone(), 2, 1, 16);
        let shape = p0.shape;
        let x = inputs(seed, shape);
        let dout = round_to_f16(&normal_tensor(seed + 3, shape.elements()));
        for (method, kernel, causal) in [
            (&fma, DenseKernel::Rows, false),
            (&fma, DenseKernel::Rows, true),
            (&coarse, DenseKernel::Rows, false),
            (&Method::Dense, DenseKernel::Rows, true),
            (&Method::Dense, DenseKernel::Tiled, false),
        ] {
            let p = p0.clone().causal(causal);
            let label =
                format!("seed {seed} varlen {method:?} {kernel:?} causal={causal} {seqs:?}");
            let a = half(ctx, method, None, kernel);
            let got = a.forward(&p, Host::new(&x[0], &x[1], &x[2])).unwrap();
            let lse = got.lse.as_deref().unwrap();
            near_reference(
                &label,
                (method, &p),
                &x,
                (&got.o, lse),
                coarse_atol(method, &x[2]),
            );
            // One rounding (fine queries, dense): the f32 path's O rounded, bit for bit.
            if !matches!(method, Method::Fma(c) if c.queries == Queries::Coarse) {
                let f32_path = Attention::new(ctx, method.clone())
                    .and_then(|a| a.dense_kernel(kernel))
                    .unwrap();
                let want = f32_path
                    .forward(&p, Host::new(&x[0], &x[1], &x[2]))
                    .unwrap();
                assert_eq!(
                    bits(&got.o),
                    bits(&round_to_f16(&want.o)),
                    "{label}: vs f32"
                );
            }
            // Resident f16 buffers, O poisoned: the same bits.
            let bufs = resident(ctx, &x, shape);
            a.forward(&p, Resident(bufs.tensors())).unwrap();
            let (o, l) = bufs.read(ctx, shape);
            same_bits(&label, "resident O", &o, &got.o);
            same_bits(&label, "resident LSE", &l, lse);
            // Over a binding: groups of sequences, the same bits (a cap that holds the
            // longest sequence of 130 x 16 x 2 heads but not the batch).
            let capped = half(ctx, method, Some(24 << 10), kernel);
            assert_pieces(&label, &capped, &p);
            let pieces = capped.forward(&p, Host::new(&x[0], &x[1], &x[2])).unwrap();
            same_bits(&label, "groups O", &pieces.o, &got.o);
            same_bits(&label, "groups LSE", pieces.lse.as_deref().unwrap(), lse);
            // Training (whole batch) against the f64 reference gradients.
            let (out, saved) = a.train(&p, Host::new(&x[0], &x[1], &x[2])).unwrap();
            same_bits(&label, "training O", &out.o, &got.o);
            let g: Gradients<f32> = a.backward(&saved, HostGrad(&dout)).unwrap();
            let r = cpu::backward(
                method,
                &p,
                (&widen(&x[0]), &widen(&x[1]), &widen(&x[2])),
                &widen(&dout),
            )
            .unwrap();
            compare_grad(&label, "dQ", &g.dq, &r.dq);
            compare_grad(&label, "dK", &g.dk, &r.dk);
            compare_grad(&label, "dV", &g.dv, &r.dv);
        }
    }
}

/// What f32 host calls return beside O under f16 storage: the learned weights' and the sinks'
/// gradients (f32, from the f16 tensors) of a host backward, against the f64 reference.
#[test]
fn f16_host_backward_returns_weight_and_sink_gradients() {
    let Some(ctx) = gpu() else { return };
    if !ctx.device.features().contains(wgpu::Features::SHADER_F16) {
        return;
    }
    let seed = fresh_seed();
    eprintln!("seed {seed}");
    let shape = Shape::new(1, 2, 97, 8);
    let learned = crate::common::random_learned(seed, 8, 16, 2, 97);
    let cfg = FmaConfig::new(16, 2).downsample(multipole_attn::Downsample::Learned(learned));
    let sinks = multipole_attn::Variants {
        sinks: Some(vec![0.3, -0.7]),
        ..Default::default()
    };
    let x = inputs(seed, shape);
    let dout = round_to_f16(&normal_tensor(seed + 3, shape.elements()));
    for (method, p) in [
        (Method::Fma(cfg), Problem::new(shape)),
        (Method::Dense, Problem::new(shape).variants(sinks.clone())),
        (
            Method::Fma(FmaConfig::new(16, 2)),
            Problem::new(shape).variants(sinks).causal(true),
        ),
    ] {
        let label = format!("seed {seed} {method:?} {:?}", p.variants);
        let a = half(ctx, &method, None, DenseKernel::Rows);
        let (_, saved) = a.train(&p, Host::new(&x[0], &x[1], &x[2])).unwrap();
        let g = a.backward(&saved, HostGrad(&dout)).unwrap();
        let r = cpu::backward(
            &method,
            &p,
            (&widen(&x[0]), &widen(&x[1]), &widen(&x[2])),
            &widen(&dout),
        )
        .unwrap();
        compare_grad(&label, "dQ", &g.dq, &r.dq);
        if let Some(ws) = &g.weights {
            let rw = r.weights.as_ref().unwrap();
            for (l, (gl, rl)) in ws.iter().zip(rw).enumerate() {
                for (name, got, want) in [
                    ("dWK", &gl.wk, &rl.wk),
                    ("dWV", &gl.wv, &rl.wv),
                    ("dbK", &gl.bk, &rl.bk),
                    ("dbV", &gl.bv, &rl.bv),
                ] {
                    weight_close(&format!("{label} level {l}"), name, got, want);
                }
            }
        } else {
            assert!(r.weights.is_none(), "{label}: no weight gradients");
        }
        match (&g.dsinks, &r.dsinks) {
            (Some(got), Some(want)) => weight_close(&label, "dsinks", got, want),
            (None, None) => {}
            _ => panic!("{label}: dsinks"),
        }
    }
}

/// A gradient that is a sum over every row (the weights', the sinks'), computed in f32 from
/// f16 tensors: within f16.rs's gradient tolerance of its scale, as dK and dV (not stored as
/// f16, so not required to be f16 values).
fn weight_close(label: &str, name: &str, got: &[f32], want: &[f64]) {
    let scale = want.iter().fold(1.0f64, |m, x| m.max(x.abs()));
    let tol = crate::f16::GRAD_TOL * scale;
    let c = closeness(got, want, tol, crate::f16::GRAD_TOL);
    assert_eq!(c.violations, 0, "{label}: {name} {c:?} (scale {scale:.3e})");
}

// ---- The merged pieces under f16 (issue 29, change 34): grouped varlen training, the split
// backward of a coarse-query head and of a 2D head, the tiled FMA pass forced (split head too).
//
// Each is held against the whole f16 run with the tolerance its f32 analogue's test states,
// widened by the f16 roundings that the pieces add (as fractions of each tensor's scale,
// max(1, max|x|); 0 = the same bits):
// - where the f32 pieces are bitwise, so are the f16 ones (the same f32 values, each rounded
//   once to f16 by the same store);
// - where the f32 pieces differ by WTOL = 1e-5 of the scale (a regrouped f32 sum or a plan that
//   follows a group's own longest sequence), two values within WTOL round to f16 values within
//   WTOL + one f16 ulp (2^-10 |x| <= 2 2^-11 of the scale): O and dQ;
// - a K/V head's dK, dV summed over its query heads on the host from per-head f16 gradients:
//   two per-head roundings and the sum's rounding against the whole run's one (the split-head
//   test above): WTOL + 4 2^-11 of the scale.
// And every O, dQ, dK, dV must be f16 values (a piece that kept f32 rows, or an upload that
// did not round, fails), O within f16.rs's tolerance of the f64 reference, the gradients
// within its gradient tolerance.

const WTOL: f64 = 1e-5;
const TWO_ULPS: f64 = WTOL + 2.0 * F16_UNIT_ROUNDOFF as f64;
const HOST_SUM: f64 = WTOL + 4.0 * F16_UNIT_ROUNDOFF as f64;

/// Tolerances of a capped run against the whole one (fractions of the scale; 0: bitwise).
#[derive(Clone, Copy, Debug)]
struct Tols {
    o: f64,
    dq: f64,
    dkv: f64,
}

const BITS: Tols = Tols {
    o: 0.0,
    dq: 0.0,
    dkv: 0.0,
};

/// `got` against `want` within `tol` of the scale (0: the same bits); non-finite elements (the
/// padding rows' LSE -inf) must be equal. Returns how many elements differ in their bits.
fn agree(label: &str, name: &str, got: &[f32], want: &[f32], tol: f64) -> usize {
    if tol == 0.0 {
        same_bits(label, name, got, want);
        return 0;
    }
    assert_eq!(got.len(), want.len(), "{label}: {name} length");
    let (mut g, mut w) = (Vec::new(), Vec::new());
    for (i, (&a, &b)) in got.iter().zip(want).enumerate() {
        if b.is_finite() {
            g.push(a);
            w.push(b as f64);
        } else {
            assert_eq!(a.to_bits(), b.to_bits(), "{label}: {name}[{i}]");
        }
    }
    let scale = w.iter().fold(1.0f64, |m, x| m.max(x.abs()));
    let c = closeness(&g, &w, tol * scale, 0.0);
    assert_eq!(c.violations, 0, "{label}: {name} {c:?} (scale {scale:.3e})");
    bits(got)
        .iter()
        .zip(bits(want))
        .filter(|(a, b)| **a != *b)
        .count()
}

/// Every element of `x` an f16 value.
fn all_f16(label: &str, name: &str, x: &[f32]) {
    let r = round_to_f16(x);
    let bad = x
        .iter()
        .zip(&r)
        .position(|(a, b)| a.to_bits() != b.to_bits());
    assert!(
        bad.is_none(),
        "{label}: {name}[{bad:?}] is not an f16 value"
    );
}

/// Training (forward and host backward) of `p` on `capped` against `whole`, both f16 storage:
/// O, the LSE (f32: `tols.o` less the ulps, as the f32 analogue) and the gradients, then the
/// f64 reference.
fn check_training(
    label: &str,
    (method, p): (&Method, &Problem),
    (capped, whole): (&Attention, &Attention),
    x: &[Vec<f32>; 3],
    dout: &[f32],
    tols: Tols,
) {
    let host = || Host::new(&x[0], &x[1], &x[2]);
    let (out_c, saved_c) = capped.train(p, host()).expect("capped train");
    let g_c = capped
        .backward(&saved_c, HostGrad(dout))
        .expect("capped backward");
    let (out_w, saved_w) = whole.train(p, host()).expect("whole train");
    let g_w = whole
        .backward(&saved_w, HostGrad(dout))
        .expect("whole backward");
    let lse = |o: &multipole_attn::gpu::Output| o.lse.clone().expect("the LSE");
    let lse_tol = if tols.o == 0.0 { 0.0 } else { WTOL };
    let differ = [
        agree(label, "O", &out_c.o, &out_w.o, tols.o),
        agree(label, "LSE", &lse(&out_c), &lse(&out_w), lse_tol),
        agree(label, "dQ", &g_c.dq, &g_w.dq, tols.dq),
        agree(label, "dK", &g_c.dk, &g_w.dk, tols.dkv),
        agree(label, "dV", &g_c.dv, &g_w.dv, tols.dkv),
    ];
    for (name, t) in [
        ("O", &out_c.o),
        ("dQ", &g_c.dq),
        ("dK", &g_c.dk),
        ("dV", &g_c.dv),
    ] {
        all_f16(label, name, t);
    }
    near_reference(
        label,
        (method, p),
        x,
        (&out_c.o, &lse(&out_c)),
        coarse_atol(method, &x[2]),
    );
    let r = cpu::backward(
        method,
        p,
        (&widen(&x[0]), &widen(&x[1]), &widen(&x[2])),
        &widen(dout),
    )
    .unwrap();
    compare_grad(label, "dQ", &g_c.dq, &r.dq);
    compare_grad(label, "dK", &g_c.dk, &r.dk);
    compare_grad(label, "dV", &g_c.dv, &r.dv);
    eprintln!("{label}: elements differing from the whole run (O, LSE, dQ, dK, dV) {differ:?}");
}

/// The capped run of `p`'s training must take pieces: its whole backward exceeds the cap.
fn assert_backward_pieces(label: &str, capped: &Attention, p: &Problem) {
    let whole = capped.backward_plan(p);
    assert!(
        matches!(whole, Err(FmaError::LimitExceeded { .. })),
        "{label}: the whole backward fits the cap: {whole:?}"
    );
}

/// Grouped varlen training over a binding (tests/gpu/varlen_backward_groups.rs's f32 analogue:
/// within WTOL, a group's plan following its own longest sequence; a sequence of 300 tokens
/// trained alone, by runs of heads summing a K/V head's gradients on the host).
#[test]
fn f16_varlen_training_over_a_binding_runs_groups_of_sequences() {
    let Some(ctx) = gpu() else { return };
    if !ctx.device.features().contains(wgpu::Features::SHADER_F16) {
        return;
    }
    let seed = fresh_seed();
    eprintln!("seed {seed}");
    let fma = Method::Fma(FmaConfig::new(16, 2));
    let coarse = Method::Fma(FmaConfig::new(16, 2).queries(Queries::Coarse));
    let seqs = Sequences::packed(vec![1, 97, 300, 7, 200, 60]).unwrap();
    let padded = Sequences::padded(300, vec![300, 0, 17, 250, 1]).unwrap();
    let tols = Tols {
        o: TWO_ULPS,
        dq: TWO_ULPS,
        dkv: HOST_SUM,
    };
    for (i, (method, seqs, causal)) in [
        (&fma, &seqs, false),
        (&fma, &padded, true),
        (&coarse, &seqs, false),
        (&Method::Dense, &seqs, true),
        (&Method::Dense, &padded, false),
    ]
    .into_iter()
    .enumerate()
    {
        let p = Problem::varlen(seqs.clone(), 4, 2, 8).causal(causal);
        let s = seed.wrapping_add(i as u64 * 7919);
        let label = format!("seed {s} grouped training {method:?} causal={causal} {seqs:?}");
        let x = inputs(s, p.shape);
        let dout = round_to_f16(&normal_tensor(s + 3, p.shape.elements()));
        let capped = half(ctx, method, Some(16 << 10), DenseKernel::Rows);
        let whole = half(ctx, method, None, DenseKernel::Rows);
        assert_backward_pieces(&label, &capped, &p);
        check_training(&label, (method, &p), (&capped, &whole), &x, &dout, tols);
    }
}

/// The split backward of one coarse-query head (tests/gpu/backward_split_coarse_q.rs: O, the
/// LSE, dQ bitwise; dK, dV bitwise with one query head per K/V head, else summed on the host).
#[test]
fn f16_split_backward_of_a_coarse_query_head() {
    let Some(ctx) = gpu() else { return };
    if !ctx.device.features().contains(wgpu::Features::SHADER_F16) {
        return;
    }
    let seed = fresh_seed();
    eprintln!("seed {seed}");
    let method = Method::Fma(FmaConfig::new(16, 2).queries(Queries::Coarse));
    // 2049 x 8 is 65,568 bytes at f32 and 32,784 at f16: over 32 KiB either way.
    let cap = 32 << 10;
    for (i, (shape, tols)) in [
        (Shape::new(1, 1, 2049, 8), BITS),
        (
            Shape::new(1, 2, 2049, 8).with_kv_heads(1),
            Tols {
                dkv: HOST_SUM,
                ..BITS
            },
        ),
    ]
    .into_iter()
    .enumerate()
    {
        let p = Problem::new(shape);
        let s = seed.wrapping_add(i as u64 * 7919);
        let label = format!("seed {s} coarse-query split backward {shape}");
        let x = inputs(s, shape);
        let dout = round_to_f16(&normal_tensor(s + 3, shape.elements()));
        let capped = half(ctx, &method, Some(cap), DenseKernel::Rows);
        let whole = half(ctx, &method, None, DenseKernel::Rows);
        let one = Problem::new(Shape::new(1, 1, shape.seq, shape.head_dim));
        assert_backward_pieces(&label, &capped, &one);
        check_training(&label, (&method, &p), (&capped, &whole), &x, &dout, tols);
    }
}

/// The split backward of one 2D head (tests/gpu/grid_backward_split.rs: O, the LSE, dQ
/// bitwise; dK, dV within WTOL, a coarse row's sum regrouped by token chunk; GQA summed on
/// the host).
#[test]
fn f16_split_backward_of_a_grid_head() {
    let Some(ctx) = gpu() else { return };
    if !ctx.device.features().contains(wgpu::Features::SHADER_F16) {
        return;
    }
    let seed = fresh_seed();
    eprintln!("seed {seed}");
    let tols = Tols {
        dkv: HOST_SUM,
        ..BITS
    };
    for (i, (h, w, r, rank, shape, cap)) in [
        (17, 29, 4, 2, Shape::new(1, 1, 493, 8), 12u64 << 10),
        (
            20,
            24,
            4,
            2,
            Shape::new(1, 2, 480, 8).with_kv_heads(1),
            12 << 10,
        ),
    ]
    .into_iter()
    .enumerate()
    {
        let grid = multipole_attn::Grid::new(h, w);
        let method = Method::Fma(FmaConfig::new(r, rank).grid(Some(grid)));
        let p = Problem::new(shape);
        let s = seed.wrapping_add(i as u64 * 7919);
        let label = format!("seed {s} grid {grid} split backward {shape}");
        let x = inputs(s, shape);
        let dout = round_to_f16(&normal_tensor(s + 3, shape.elements()));
        let capped = half(ctx, &method, Some(cap), DenseKernel::Rows);
        let whole = half(ctx, &method, None, DenseKernel::Rows);
        let one = Problem::new(Shape::new(1, 1, shape.seq, shape.head_dim));
        assert_backward_pieces(&label, &capped, &one);
        check_training(&label, (&method, &p), (&capped, &whole), &x, &dout, tols);
    }
}

/// The tiled FMA fine pass forced under f16, whole and on a split head (the split's forward
/// and training bitwise as the rows kernel's above; the split backward's dK, dV of a GQA
/// group summed on the host), and the whole tiled f16 run against the reference.
#[test]
fn f16_tiled_fma_pass_whole_and_split() {
    let Some(ctx) = gpu() else { return };
    if !ctx.device.features().contains(wgpu::Features::SHADER_F16) {
        return;
    }
    let seed = fresh_seed();
    eprintln!("seed {seed}");
    let method = Method::Fma(FmaConfig::new(16, 2));
    let tiled = |cap: Option<u64>| {
        let a = half(ctx, &method, cap, DenseKernel::Rows)
            .fma_kernel(multipole_attn::plan::FmaKernel::Tiled)
            .unwrap();
        let plan = a.plan(&Problem::new(Shape::new(1, 1, 97, 16))).unwrap();
        let pass = plan.fma().unwrap().attention.pass;
        assert_eq!(pass, multipole_attn::plan::Pass::FineTiled);
        a
    };
    let shape = Shape::new(1, 2, 1025, 16).with_kv_heads(1);
    for causal in [false, true] {
        let p = Problem::new(shape).causal(causal);
        let label = format!("seed {seed} tiled FMA f16 causal={causal}");
        let x = inputs(seed, shape);
        let dout = round_to_f16(&normal_tensor(seed + 3, shape.elements()));
        let (capped, whole) = (tiled(Some(SPLIT_CAP)), tiled(None));
        assert_pieces(&label, &capped, &p);
        let got = capped.forward(&p, Host::new(&x[0], &x[1], &x[2])).unwrap();
        let want = whole.forward(&p, Host::new(&x[0], &x[1], &x[2])).unwrap();
        same_bits(&label, "split O", &got.o, &want.o);
        same_bits(
            &label,
            "split LSE",
            got.lse.as_deref().unwrap(),
            want.lse.as_deref().unwrap(),
        );
        // Resident f16 tensors through the split, O poisoned: the same bits.
        let bufs = resident(ctx, &x, shape);
        capped.forward(&p, Resident(bufs.tensors())).unwrap();
        let (o, lse) = bufs.read(ctx, shape);
        same_bits(&label, "resident O", &o, &want.o);
        same_bits(&label, "resident LSE", &lse, want.lse.as_deref().unwrap());
        let tols = Tols {
            dkv: HOST_SUM,
            ..BITS
        };
        check_training(&label, (&method, &p), (&capped, &whole), &x, &dout, tols);
    }
}
