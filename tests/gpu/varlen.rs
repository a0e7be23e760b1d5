//! Variable-length batches (`Sequences`): packed (cu_seqlens) and padded, FMA (fine and coarse
//! queries, causal and bidirectional, Average and Learned, grouped-query heads) and dense,
//! against the f64 reference run sequence by sequence alone (`cpu::fma_forward_varlen`), with
//! output buffers poisoned with NaN; padded equals packed to the bit; fresh seeds (printed).
//!
//! Tolerance: tests/gpu/forward.rs's (|gpu - ref| <= 5e-5 + 5e-5 |ref| for O, 5e-5 + 1e-5 |ref|
//! for the LSE), for the same reasons: each sequence is an ordinary FMA problem. A token that
//! attended across a sequence boundary, or a sequence run with another's levels or windows,
//! moves O by far more.

use crate::common::{closeness, gpu, random_learned, Poisoned};
use multipole_attn::cpu::{self, widen};
use multipole_attn::gpu::{Attention, GpuContext, Host, Plan, Resident};
use multipole_attn::random::{fresh_seed, normal_tensor};
use multipole_attn::{Downsample, FmaConfig, Method, Problem, Queries, Sequences, Shape};

const O_ATOL: f64 = 5e-5;
const O_RTOL: f64 = 5e-5;
const LSE_ATOL: f64 = 5e-5;
const LSE_RTOL: f64 = 1e-5;

struct Inputs {
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
}

fn inputs(seed: u64, shape: Shape) -> Inputs {
    Inputs {
        q: normal_tensor(seed, shape.elements()),
        k: normal_tensor(seed ^ 0x9e37_79b9, shape.kv_elements()),
        v: normal_tensor(seed ^ 0x7f4a_7c15, shape.kv_elements()),
    }
}

/// The variable-length problem of `seqs` laid out as `shape`.
fn varlen(shape: Shape, seqs: &Sequences, causal: bool) -> Problem {
    Problem {
        sequences: Some(seqs.clone()),
        ..Problem::new(shape).causal(causal)
    }
}

/// O and the LSE of one run of `p` (a variable-length batch) through NaN-poisoned caller
/// buffers.
fn run_fma(ctx: &GpuContext, fma: &Attention, x: &Inputs, p: &Problem) -> (Vec<f32>, Vec<f32>) {
    let shape = p.shape;
    let bufs = Poisoned::new(ctx, &x.q, &x.k, &x.v, shape);
    fma.forward(p, Resident(bufs.tensors()))
        .unwrap_or_else(|e| panic!("{shape}: {e}"));
    let (o, lse) = bufs.read(ctx);
    (o[..shape.elements()].to_vec(), lse[..shape.rows()].to_vec())
}

fn check(label: &str, o: &[f32], lse: &[f32], r: &cpu::Reference) -> f64 {
    let co = closeness(o, &r.o, O_ATOL, O_RTOL);
    assert_eq!(co.violations, 0, "{label}: O {co:?}");
    // Padding rows: -inf in both (closeness needs finite values there).
    for (i, (&a, &b)) in lse.iter().zip(&r.lse).enumerate() {
        if b == f64::NEG_INFINITY {
            assert_eq!(a, f32::NEG_INFINITY, "{label}: LSE of padding row {i}");
        } else {
            assert!(
                (a as f64 - b).abs() <= LSE_ATOL + LSE_RTOL * b.abs(),
                "{label}: LSE row {i}: {a} vs {b}"
            );
        }
    }
    co.max_abs
}

/// The awkward lengths 1, 7, 97 and 1025 in one pack, every mode, FMA and dense.
#[test]
fn a_pack_of_awkward_lengths_equals_each_sequence_alone() {
    let Some(ctx) = gpu() else { return };
    let seed = fresh_seed();
    eprintln!("seed {seed}");
    let seqs = Sequences::packed(vec![1, 7, 97, 1025]).unwrap();
    let (heads, kv_heads, d, m, p) = (2, 1, 16, 16, 2);
    let shape = seqs.shape(heads, kv_heads, d);
    let x = inputs(seed, shape);
    let (q, k, v) = (widen(&x.q), widen(&x.k), widen(&x.v));
    let mut worst = 0.0f64;
    for causal in [false, true] {
        let problem = varlen(shape, &seqs, causal);
        let queries: &[Queries] = if causal {
            &[Queries::Fine]
        } else {
            &[Queries::Fine, Queries::Coarse]
        };
        for &queries in queries {
            for learned in [false, true] {
                let mut cfg = FmaConfig::new(m, p).queries(queries);
                if learned {
                    cfg = cfg.downsample(Downsample::Learned(random_learned(seed, d, m, p, 1025)));
                }
                let label = format!("seed {seed} causal={causal} {queries:?} learned={learned}");
                let method = Method::Fma(cfg);
                let fma = Attention::new(ctx, method.clone()).unwrap();
                let (o, lse) = run_fma(ctx, &fma, &x, &problem);
                let r = cpu::forward(&method, &problem, &q, &k, &v).unwrap();
                worst = worst.max(check(&label, &o, &lse, &r));
                // The host API and a second run give the same bits.
                let host = fma.forward(&problem, Host::new(&x.q, &x.k, &x.v)).unwrap();
                assert_eq!(host.o, o, "{label}: host vs buffers");
                assert_eq!(host.lse.unwrap(), lse, "{label}: host LSE vs buffers");
            }
        }
        let dense = Attention::dense(ctx).unwrap();
        let out = dense
            .forward(&problem, Host::new(&x.q, &x.k, &x.v))
            .unwrap();
        let r = cpu::dense_attention_varlen(&q, &k, &v, shape, &seqs, causal).unwrap();
        worst = worst.max(check(
            &format!("dense causal={causal}"),
            &out.o,
            out.lse.as_deref().unwrap(),
            &r,
        ));
    }
    eprintln!("worst |O err| {worst:.2e}");
}

/// Ten thousand sequences of 1..9 tokens in one call (one dispatch per pass, not per
/// sequence), next to one long sequence.
#[test]
fn ten_thousand_short_sequences_and_a_long_one_in_one_call() {
    let Some(ctx) = gpu() else { return };
    let seed = fresh_seed();
    eprintln!("seed {seed}");
    let mut lengths: Vec<usize> = (0..10_000)
        .map(|i| 1 + (i * 7 + seed as usize) % 9)
        .collect();
    lengths.insert(5000, 700);
    let seqs = Sequences::packed(lengths).unwrap();
    let shape = seqs.shape(1, 1, 8);
    let x = inputs(seed, shape);
    let (q, k, v) = (widen(&x.q), widen(&x.k), widen(&x.v));
    let cfg = FmaConfig::new(8, 2);
    let fma = Attention::fma(ctx, cfg.clone()).unwrap();
    let problem = varlen(shape, &seqs, false);
    let Plan::Fma(plan) = fma.plan(&problem).unwrap() else {
        panic!("not an FMA plan")
    };
    assert_eq!(
        plan.steps().len(),
        plan.levels.count() + 1,
        "one dispatch per pass"
    );
    let (o, lse) = run_fma(ctx, &fma, &x, &problem);
    let r = cpu::fma_forward_varlen(&q, &k, &v, shape, &seqs, &cfg).unwrap();
    let e = check(&format!("seed {seed} FMA"), &o, &lse, &r);
    let dense = Attention::dense(ctx).unwrap();
    let out = dense
        .forward(&varlen(shape, &seqs, true), Host::new(&x.q, &x.k, &x.v))
        .unwrap();
    let r = cpu::dense_attention_varlen(&q, &k, &v, shape, &seqs, true).unwrap();
    let f = check(
        &format!("seed {seed} dense"),
        &out.o,
        out.lse.as_deref().unwrap(),
        &r,
    );
    eprintln!("worst |O err| FMA {e:.2e}, dense {f:.2e}");
}

/// A padded batch equals the same sequences packed, to the bit, with O = 0 and LSE = -inf on
/// its padding (NaN-poisoned before the run), and a row of length 0 all padding.
#[test]
fn padded_equals_packed_to_the_bit_and_its_padding_is_written() {
    let Some(ctx) = gpu() else { return };
    let seed = fresh_seed();
    eprintln!("seed {seed}");
    let lengths = vec![100, 37, 0, 129];
    let (heads, kv_heads, d, n) = (4, 2, 16, 129);
    let packed = Sequences::packed(vec![100, 37, 129]).unwrap();
    let padded = Sequences::padded(n, lengths.clone()).unwrap();
    let (ps, qs) = (
        packed.shape(heads, kv_heads, d),
        padded.shape(heads, kv_heads, d),
    );
    let x = inputs(seed, ps);
    // The packed tensors laid out padded (padding rows hold other random values).
    let pad = |t: &[f32], hh: usize, seed: u64| {
        let mut out = normal_tensor(seed, lengths.len() * hh * n * d);
        let mut s_packed = 0;
        for (b, &len) in lengths.iter().enumerate() {
            if len == 0 {
                continue;
            }
            let (stride, row) = packed.rows(hh, s_packed);
            for h in 0..hh {
                let (src, dst) = ((h * stride + row) * d, (b * hh + h) * n * d);
                out[dst..dst + len * d].copy_from_slice(&t[src..src + len * d]);
            }
            s_packed += 1;
        }
        out
    };
    let y = Inputs {
        q: pad(&x.q, heads, seed + 1),
        k: pad(&x.k, kv_heads, seed + 2),
        v: pad(&x.v, kv_heads, seed + 3),
    };
    for (cfg, causal) in [
        (FmaConfig::new(16, 2), false),
        (FmaConfig::new(16, 2), true),
        (FmaConfig::new(16, 2).queries(Queries::Coarse), false),
    ] {
        let label = format!("seed {seed} causal={causal} {cfg:?}");
        let method = Method::Fma(cfg);
        let fma = Attention::new(ctx, method.clone()).unwrap();
        let padded_problem = varlen(qs, &padded, causal);
        let (po, pl) = run_fma(ctx, &fma, &x, &varlen(ps, &packed, causal));
        let (qo, ql) = run_fma(ctx, &fma, &y, &padded_problem);
        let padded_out = Inputs {
            q: qo.clone(),
            k: Vec::new(),
            v: Vec::new(),
        };
        assert_eq!(pad(&po, heads, 0).len(), padded_out.q.len());
        let mut s_packed = 0;
        for (b, &len) in lengths.iter().enumerate() {
            for h in 0..heads {
                let pb = (b * heads + h) * n;
                if len > 0 {
                    let (stride, row) = packed.rows(heads, s_packed);
                    let pa = h * stride + row;
                    assert!(
                        qo[pb * d..(pb + len) * d] == po[pa * d..(pa + len) * d],
                        "{label}: row {b} head {h} differs from packed"
                    );
                    assert!(ql[pb..pb + len] == pl[pa..pa + len], "{label}: LSE");
                }
                assert!(
                    qo[(pb + len) * d..(pb + n) * d].iter().all(|&z| z == 0.0),
                    "{label}: padding O of row {b}"
                );
                assert!(
                    ql[pb + len..pb + n].iter().all(|&z| z == f32::NEG_INFINITY),
                    "{label}: padding LSE of row {b}"
                );
            }
            if len > 0 {
                s_packed += 1;
            }
        }
        let (yq, yk, yv) = (widen(&y.q), widen(&y.k), widen(&y.v));
        let r = cpu::forward(&method, &padded_problem, &yq, &yk, &yv).unwrap();
        check(&label, &qo, &ql, &r);
    }
}

#[test]
fn lengths_that_do_not_match_the_tensors_are_typed_errors() {
    let Some(ctx) = gpu() else { return };
    let fma = Attention::fma(ctx, FmaConfig::new(8, 2)).unwrap();
    let seqs = Sequences::packed(vec![10, 20]).unwrap();
    let shape = Shape::new(1, 1, 31, 8);
    let x = vec![0.25f32; shape.elements()];
    let e = fma
        .forward(
            &varlen(shape, &seqs, false),
            Host::new(&x, &x, &x).without_lse(),
        )
        .unwrap_err();
    assert!(
        e.to_string().contains("lengths sum to 30 packed tokens"),
        "{e}"
    );
    let padded = Sequences::padded(16, vec![3, 4]).unwrap();
    let three = Shape::new(3, 1, 16, 8);
    let y = vec![0.25f32; three.elements()];
    let e = fma
        .forward(
            &varlen(three, &padded, false),
            Host::new(&y, &y, &y).without_lse(),
        )
        .unwrap_err();
    assert!(
        e.to_string().contains("one batch row per length (2)"),
        "{e}"
    );
}

/// Under a 16 KiB binding cap the batch runs in groups of sequences that fit, and a sequence
/// too long alone (1025 x 16 floats per head) is split along itself: the result matches the
/// uncapped run to float rounding (tiles follow each group's longest sequence) and the
/// reference within the forward's tolerance; padded rows stay padding.
#[test]
fn a_batch_over_the_binding_runs_in_groups_with_the_unsplit_result() {
    let Some(ctx) = gpu() else { return };
    let seed = fresh_seed();
    eprintln!("seed {seed}");
    let cap = 16 << 10;
    for seqs in [
        Sequences::packed(vec![5, 60, 1025, 3, 200, 90]).unwrap(),
        Sequences::padded(300, vec![300, 0, 17, 250]).unwrap(),
    ] {
        let shape = seqs.shape(2, 1, 16);
        let x = inputs(seed, shape);
        let (q, k, v) = (widen(&x.q), widen(&x.k), widen(&x.v));
        for causal in [false, true] {
            let cfg = FmaConfig::new(16, 2);
            let label = format!("seed {seed} {seqs:?} causal={causal} {cfg:?}");
            let problem = varlen(shape, &seqs, causal);
            let method = Method::Fma(cfg);
            let small = Attention::new(ctx, method.clone())
                .unwrap()
                .max_binding(cap)
                .unwrap();
            assert!(small.plan(&problem).is_err(), "{label}: must split");
            let split = small
                .forward(&problem, Host::new(&x.q, &x.k, &x.v))
                .unwrap_or_else(|e| panic!("{label}: {e}"));
            let r = cpu::forward(&method, &problem, &q, &k, &v).unwrap();
            check(&label, &split.o, split.lse.as_deref().unwrap(), &r);
            let whole = Attention::new(ctx, method)
                .unwrap()
                .forward(&problem, Host::new(&x.q, &x.k, &x.v))
                .unwrap();
            let c = closeness(&split.o, &widen(&whole.o), 1e-6, 1e-6);
            assert_eq!(c.violations, 0, "{label}: split vs whole {c:?}");
        }
        let dense = Attention::dense(ctx).unwrap().max_binding(cap).unwrap();
        let out = dense
            .forward(&varlen(shape, &seqs, true), Host::new(&x.q, &x.k, &x.v))
            .unwrap();
        let r = cpu::dense_attention_varlen(&q, &k, &v, shape, &seqs, true).unwrap();
        check("dense split", &out.o, out.lse.as_deref().unwrap(), &r);
    }
}
