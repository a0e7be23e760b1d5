//! The GPU backward against the f64 CPU reference gradients (`cpu::fma_backward`, itself
//! checked against finite differences) on random inputs with fresh seeds (printed; replay
//! with MULTIPOLE_SEED), every gradient buffer poisoned with NaN before the run.
//!
//! Tolerance, per tensor: |gpu - ref| <= TOL * (max(1, max|ref|) + |ref|), TOL = 2e-4, i.e.
//! relative to the tensor's own scale, or to 1, the size of the terms summed, when the
//! gradient is smaller (n = 1: dQ is exactly 0, a sum of terms that cancel).
//! Why: Q, K, V, dO are N(0, 1); a gradient element is a sum of up to a few hundred terms
//! P (dP - D) q (fine keys), or up to 3 w_l query rows for a coarse key, spread back over
//! w_l / p tokens, and a weight gradient sums batch*heads*n/w_l such terms. The GPU uses f32
//! everywhere (and P = exp(s - LSE) from the f32 LSE of the forward, WGSL's exp within
//! 3 + 2|x| ulp), so each term carries ~1e-6 relative error and sums cancel: we measure worst
//! errors of ~5e-7 .. 1e-6 of the tensor's scale (printed), so the bound leaves ~200x headroom
//! for other drivers' exp and summation orders. A wrong index, a missing far-list window or a
//! missing term moves some element by >= 1e-2 of the scale (`gpu_gradients_are_not_trivially_
//! close` and a mutation of the coarse pass's inverse far list, tried by hand, show this),
//! 50x above the bound.

use crate::common::gradients::{
    buffer, compare, compare_all, gpu_gradients, inputs, nan, Inputs, TOL,
};

use crate::common::{browser_like_gpu, gpu, mismatched_subgroup_gpu, random_learned};
use multipole_attn::cpu::{self, widen};
use multipole_attn::gpu::{
    Attention, GpuContext, GpuTensors, GradTensors, Host, HostGrad, Plan, Resident, ResidentGrad,
    WeightGradTensors,
};
use multipole_attn::random::fresh_seed;
use multipole_attn::{Downsample, FmaConfig, FmaError, Gradients, Method, Problem, Shape};

/// Checks every gradient of one case; returns the worst scaled error.
fn check_backward(ctx: &GpuContext, seed: u64, p: &Problem, cfg: &FmaConfig) -> f64 {
    let shape = p.shape;
    let label = format!(
        "seed {seed} {shape} m={} p={} causal={} learned={}",
        cfg.block,
        cfg.rank,
        p.causal,
        matches!(cfg.downsample, Downsample::Learned(_))
    );
    let x = inputs(seed, shape);
    let fma = Attention::fma(ctx, cfg.clone()).unwrap_or_else(|e| panic!("{label}: {e}"));
    let g = gpu_gradients(ctx, &fma, &x, p);
    let r = cpu::backward(
        &Method::Fma(cfg.clone()),
        p,
        (&widen(&x.q), &widen(&x.k), &widen(&x.v)),
        &widen(&x.dout),
    )
    .unwrap();
    compare_all(&label, &g, &r)
}

#[test]
fn backward_matches_reference_over_awkward_shapes() {
    let Some(ctx) = gpu() else { return };
    let seed = fresh_seed();
    eprintln!("seed {seed}");
    let ns = [1, 7, 97, 256, 1025];
    let ds = [16, 40, 64];
    let ms = [4, 16];
    let ps = [1, 2];
    let mut worst = 0.0f64;
    let mut case = 0usize;
    for (ni, &n) in ns.iter().enumerate() {
        for causal in [false, true] {
            for learned in [false, true] {
                let d = ds[(ni + case) % ds.len()];
                let m = ms[(ni + case / 2) % ms.len()];
                let p = ps[(case / 4 + ni) % ps.len()];
                let shape = if n >= 1000 {
                    Shape::new(1, 2, n, d)
                } else {
                    Shape::new(2, 2, n, d)
                };
                let s = seed.wrapping_add(case as u64 * 7919);
                let mut cfg = FmaConfig::new(m, p);
                if learned {
                    cfg = cfg.downsample(Downsample::Learned(random_learned(s, d, m, p, n)));
                }
                let problem = Problem::new(shape).causal(causal);
                worst = worst.max(check_backward(ctx, s, &problem, &cfg));
                case += 1;
            }
        }
    }
    eprintln!("{case} cases, worst scaled gradient error {worst:.2e}");
}

#[test]
fn backward_without_count_correction_and_odd_head_dims() {
    let Some(ctx) = gpu() else { return };
    let seed = fresh_seed();
    eprintln!("seed {seed}");
    let mut worst = 0.0f64;
    for (i, &(n, d, m, p, causal)) in [
        (333, 3, 4, 2, false),
        (200, 59, 16, 2, true),
        (130, 8, 8, 8, false),
    ]
    .iter()
    .enumerate()
    {
        let s = seed + i as u64;
        let cfg = FmaConfig::new(m, p).count_correction(i != 0);
        let problem = Problem::new(Shape::new(1, 2, n, d)).causal(causal);
        worst = worst.max(check_backward(ctx, s, &problem, &cfg));
        let learned = cfg.downsample(Downsample::Learned(random_learned(s, d, m, p, n)));
        worst = worst.max(check_backward(ctx, s, &problem, &learned));
    }
    eprintln!("worst scaled gradient error {worst:.2e}");
}

#[test]
fn backward_is_deterministic_and_host_api_agrees() {
    let Some(ctx) = gpu() else { return };
    let seed = fresh_seed();
    let shape = Shape::new(2, 2, 300, 32);
    let problem = Problem::new(shape);
    let (m, p) = (16, 2);
    let x = inputs(seed, shape);
    let w = random_learned(seed, 32, m, p, shape.seq + 500); // an extra level the call ignores
    let fma = Attention::fma(ctx, FmaConfig::new(m, p).downsample(Downsample::Learned(w))).unwrap();
    let host = || Host::new(&x.q, &x.k, &x.v);
    let (out, saved) = fma.train(&problem, host()).unwrap();
    let plain = fma.forward(&problem, host()).unwrap();
    assert_eq!(out.o, plain.o);
    assert_eq!(out.lse, plain.lse);
    let a = fma.backward(&saved, HostGrad(&x.dout)).unwrap();
    let b = fma.backward(&saved, HostGrad(&x.dout)).unwrap();
    assert_eq!(a, b, "two backward runs differ");
    let (_, saved2) = fma.train(&problem, host()).unwrap();
    assert_eq!(a, fma.backward(&saved2, HostGrad(&x.dout)).unwrap());
    let c = gpu_gradients(ctx, &fma, &x, &problem);
    assert_eq!(a.dq, c.dq);
    assert_eq!(a.dk, c.dk);
    assert_eq!(a.dv, c.dv);
    let (aw, cw) = (a.weights.unwrap(), c.weights.unwrap());
    assert_eq!(aw.len(), cw.len() + 1, "the unused level is returned too");
    assert_eq!(aw[..cw.len()], cw[..]);
    let extra = aw.last().unwrap();
    assert!(extra.wk.iter().chain(&extra.bk).all(|&x| x == 0.0));
}

#[test]
fn gpu_gradients_are_not_trivially_close() {
    // Guards the tolerance: dropping the far field (the gradient through coarse keys) moves
    // dK by far more than TOL of its scale.
    let Some(ctx) = gpu() else { return };
    let seed = fresh_seed();
    let shape = Shape::new(1, 1, 512, 16);
    let x = inputs(seed, shape);
    let fma = Attention::fma(ctx, FmaConfig::new(16, 2)).unwrap();
    let (_, saved) = fma
        .train(&Problem::new(shape), Host::new(&x.q, &x.k, &x.v))
        .unwrap();
    let g = fma.backward(&saved, HostGrad(&x.dout)).unwrap();
    let near_only = FmaConfig::new(16, 2);
    let r = cpu::fma_backward(
        &widen(&x.q),
        &widen(&x.k),
        &widen(&x.v),
        &widen(&x.dout),
        shape,
        &near_only.count_correction(false),
    )
    .unwrap();
    let scale = r.dk.iter().fold(0.0f64, |m, x| m.max(x.abs()));
    let diff =
        g.dk.iter()
            .zip(&r.dk)
            .map(|(a, b)| (*a as f64 - b).abs())
            .fold(0.0, f64::max);
    assert!(diff > 50.0 * TOL * scale, "{diff} vs scale {scale}");
}

#[test]
fn bad_backward_input_is_a_typed_error() {
    let Some(ctx) = gpu() else { return };
    let shape = Shape::new(1, 2, 100, 16);
    let problem = Problem::new(shape);
    let x = inputs(1, shape);
    let fma = Attention::fma(ctx, FmaConfig::new(16, 2)).unwrap();
    let (_, saved) = fma.train(&problem, Host::new(&x.q, &x.k, &x.v)).unwrap();

    let e = fma.backward(&saved, HostGrad(&x.dout[1..])).unwrap_err();
    assert!(
        matches!(&e, FmaError::ShapeMismatch { what, .. } if what == "dO"),
        "{e}"
    );

    // Saved by another instance (one that has also run the problem causally: the mask is the
    // problem's, so any other Attention must refuse the tensors), or by dense attention.
    let other = Attention::fma(ctx, FmaConfig::new(16, 2)).unwrap();
    other
        .train(&problem.clone().causal(true), Host::new(&x.q, &x.k, &x.v))
        .unwrap();
    let e = other.backward(&saved, HostGrad(&x.dout)).unwrap_err();
    assert!(matches!(e, FmaError::NoSavedForward(_)), "{e}");
    let dense = Attention::dense(ctx).unwrap();
    let e = dense.backward(&saved, HostGrad(&x.dout)).unwrap_err();
    assert!(matches!(e, FmaError::NoSavedForward(_)), "{e}");

    // Buffers without the forward's LSE.
    let (q, o) = (buffer(ctx, "q", &x.q), nan(ctx, "o", shape.elements()));
    let t = GpuTensors {
        q: &q,
        k: &q,
        v: &q,
        out: &o,
        lse: None,
    };
    let e = fma
        .train(&problem, Resident(t))
        .expect_err("buffers without an LSE");
    assert!(matches!(e, FmaError::NoSavedForward(_)), "{e}");
    assert!(e.to_string().contains("LSE"), "{e}");

    // A dO buffer too small, and weight gradients asked for in Average mode.
    let small = buffer(ctx, "small", &x.dout[..100]);
    let full = buffer(ctx, "dout", &x.dout);
    let g = GradTensors {
        dq: &o,
        dk: &o,
        dv: &o,
        weights: None,
    };
    let e = fma
        .backward(
            &saved,
            ResidentGrad {
                dout: &small,
                grads: g,
            },
        )
        .unwrap_err();
    assert!(
        matches!(&e, FmaError::ShapeMismatch { what, .. } if what == "dO buffer"),
        "{e}"
    );
    let gw = GradTensors {
        weights: Some(WeightGradTensors {
            wk: &o,
            wv: &o,
            bk: &o,
            bv: &o,
            queries: None,
        }),
        ..g
    };
    let e = fma
        .backward(
            &saved,
            ResidentGrad {
                dout: &full,
                grads: gw,
            },
        )
        .unwrap_err();
    assert!(matches!(e, FmaError::InvalidConfig { .. }), "{e}");

    // Weights whose shapes do not match the config, or that miss a level the call needs.
    let w = random_learned(1, 16, 8, 2, 100);
    let e = Attention::fma(
        ctx,
        FmaConfig::new(16, 2).downsample(Downsample::Learned(w)),
    )
    .expect_err("weights made for m = 8 used with m = 16");
    assert!(matches!(e, FmaError::Weights(_)), "{e}");
    let short = random_learned(1, 16, 16, 2, 40);
    let learned = Attention::fma(
        ctx,
        FmaConfig::new(16, 2).downsample(Downsample::Learned(short)),
    )
    .unwrap();
    let e = learned
        .train(&problem, Host::new(&x.q, &x.k, &x.v))
        .expect_err("weights without the levels of n = 100");
    assert!(matches!(e, FmaError::Weights(_)), "{e}");

    // The context still works.
    fma.backward(&saved, HostGrad(&x.dout)).unwrap();
}

#[test]
fn more_than_65535_workgroups_fold_into_2d() {
    let Some(ctx) = gpu() else { return };
    let seed = fresh_seed();
    eprintln!("seed {seed}");
    // n = 9, m = 2: 5 blocks and 2 coarse levels per head; 14000 heads -> 70000 workgroups of
    // the dQ and near-field dK/dV passes (bidirectional only: the folding does not depend on
    // the mask, and each case costs ~15 s on lavapipe).
    let problem = Problem::new(Shape::new(2, 7000, 9, 8));
    let cfg = FmaConfig::new(2, 2);
    let Plan::FmaBackward(plan) = Attention::fma(ctx, cfg.clone())
        .unwrap()
        .backward_plan(&problem)
        .unwrap()
    else {
        panic!("not an FMA backward plan");
    };
    assert!(plan.dkv_fine.workgroups > 65535 && plan.dkv_fine.grid[1] > 1);
    check_backward(ctx, seed, &problem, &cfg);
}

#[test]
fn backward_under_browser_limits() {
    // 256 invocations and 16 KiB of workgroup memory: smaller query tiles, same gradients.
    let Some(ctx) = browser_like_gpu() else {
        return;
    };
    let seed = fresh_seed();
    eprintln!("seed {seed}");
    let (n, d, m, p) = (300, 64, 16, 2);
    let cfg =
        FmaConfig::new(m, p).downsample(Downsample::Learned(random_learned(seed, d, m, p, n)));
    let problem = Problem::new(Shape::new(1, 2, n, d)).causal(true);
    let worst = check_backward(ctx, seed, &problem, &cfg);
    eprintln!("browser limits: worst scaled gradient error {worst:.2e}");
}

#[test]
fn backward_where_subgroups_are_not_the_composed_size() {
    // Every subgroup kernel's fallback (a subgroup without exactly SG lanes): the forward's and
    // the dQ / dK / dV passes' plain sweeps, and the coarse rows' per-lane dots.
    let Some(ctx) = mismatched_subgroup_gpu() else {
        return;
    };
    let seed = fresh_seed();
    eprintln!("seed {seed}");
    let mut worst = 0.0f64;
    for (i, &(n, d, m, p, causal)) in [(97, 40, 16, 2, false), (200, 8, 8, 2, true)]
        .iter()
        .enumerate()
    {
        let s = seed + i as u64;
        let cfg =
            FmaConfig::new(m, p).downsample(Downsample::Learned(random_learned(s, d, m, p, n)));
        let problem = Problem::new(Shape::new(1, 2, n, d)).causal(causal);
        worst = worst.max(check_backward(ctx, s, &problem, &cfg));
    }
    eprintln!("fallback paths: worst scaled gradient error {worst:.2e}");
}

/// K or V of `shape` with each K/V head repeated for its group (multi-head tensors).
fn repeat_kv(x: &[f32], shape: Shape) -> Vec<f64> {
    let per_head = shape.seq * shape.head_dim;
    (0..shape.batch_heads())
        .flat_map(|bh| &x[(bh / shape.group()) * per_head..(bh / shape.group() + 1) * per_head])
        .map(|&v| v as f64)
        .collect()
}

/// Sums a multi-head gradient over each group of query heads: the grouped-query dK or dV.
fn sum_groups(g: &[f64], shape: Shape) -> Vec<f64> {
    let per_head = shape.seq * shape.head_dim;
    let mut out = vec![0.0; shape.kv_elements()];
    for (bh, head) in g.chunks(per_head).enumerate() {
        let kv = bh / shape.group();
        for (o, x) in out[kv * per_head..(kv + 1) * per_head].iter_mut().zip(head) {
            *o += x;
        }
    }
    out
}

/// Grouped-query heads: dQ of Q's shape, dK and dV of K's shape, against the multi-head
/// reference on repeated K/V heads with its dK, dV summed over each group; NaN-poisoned
/// gradient buffers; two runs bit-identical (the group is summed in head order, no atomics).
#[test]
fn grouped_query_gradients_sum_each_group() {
    let Some(ctx) = gpu() else { return };
    let seed = fresh_seed();
    eprintln!("seed {seed}");
    let mut worst = 0.0f64;
    // (batch, heads, kv_heads, n, d, m, p)
    for (i, &(batch, heads, kv_heads, n, d, m, p)) in
        [(2, 4, 2, 97, 16, 8, 2), (1, 4, 1, 257, 16, 16, 2)]
            .iter()
            .enumerate()
    {
        let shape = Shape::new(batch, heads, n, d).with_kv_heads(kv_heads);
        let mha = Shape::new(batch, heads, n, d);
        for causal in [false, true] {
            for learned in [false, true] {
                let s = seed + 4 * i as u64 + 2 * causal as u64 + learned as u64;
                let mut cfg = FmaConfig::new(m, p);
                if learned {
                    cfg = cfg.downsample(Downsample::Learned(random_learned(s, d, m, p, n)));
                }
                let label = format!("seed {s} {shape} causal={causal} learned={learned}");
                let x = inputs(s, shape);
                let problem = Problem::new(shape).causal(causal);
                let fma = Attention::fma(ctx, cfg.clone()).unwrap();
                let g = gpu_gradients(ctx, &fma, &x, &problem);
                let r = cpu::backward(
                    &Method::Fma(cfg),
                    &Problem::new(mha).causal(causal),
                    (
                        &widen(&x.q),
                        &repeat_kv(&x.k, shape),
                        &repeat_kv(&x.v, shape),
                    ),
                    &widen(&x.dout),
                )
                .unwrap();
                worst = worst.max(compare(&label, "dQ", &g.dq, &r.dq));
                worst = worst.max(compare(&label, "dK", &g.dk, &sum_groups(&r.dk, shape)));
                worst = worst.max(compare(&label, "dV", &g.dv, &sum_groups(&r.dv, shape)));
                if let (Some(gw), Some(rw)) = (&g.weights, &r.weights) {
                    for (l, (a, b)) in gw.iter().zip(rw).enumerate() {
                        let name = format!("k_w{}", l + 1);
                        worst = worst.max(compare(&label, &name, &a.wk, &b.wk));
                        let name = format!("v_b{}", l + 1);
                        worst = worst.max(compare(&label, &name, &a.bv, &b.bv));
                    }
                }
                let again = gpu_gradients(ctx, &fma, &x, &problem);
                assert_eq!(g, again, "{label}: two runs differ");
            }
        }
    }
    eprintln!("grouped-query worst scaled gradient error {worst:.2e}");
}

// The dense backward (`Attention::backward` of `Method::Dense`, FlashAttention-2's structure) against
// `cpu::dense_backward` (checked against finite differences), at the same tolerance: its sums
// are of the same terms P (dP - D) q, over every key (dQ) or every query of a K/V head's
// group (dK, dV) instead of a near field, a few hundred here.

/// Dense forward then backward through caller buffers, O, the LSE and every gradient poisoned
/// with NaN.
fn dense_gradients(ctx: &GpuContext, dense: &Attention, x: &Inputs, p: &Problem) -> Gradients<f32> {
    let shape = p.shape;
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
    let ((), saved) = dense.train(p, Resident(t)).expect("dense forward");
    let dout = buffer(ctx, "dout", &x.dout);
    let (len, kv_len) = (shape.elements(), shape.kv_elements());
    let (dq, dk, dv) = (
        nan(ctx, "dq", len),
        nan(ctx, "dk", kv_len),
        nan(ctx, "dv", kv_len),
    );
    let g = GradTensors {
        dq: &dq,
        dk: &dk,
        dv: &dv,
        weights: None,
    };
    dense
        .backward(
            &saved,
            ResidentGrad {
                dout: &dout,
                grads: g,
            },
        )
        .expect("dense backward");
    let read = |b: &wgpu::Buffer, len: usize| crate::common::read_buffer(ctx, b)[..len].to_vec();
    Gradients {
        dq: read(&dq, len),
        dk: read(&dk, kv_len),
        dv: read(&dv, kv_len),
        weights: None,
        dsinks: None,
    }
}

/// Checks one dense case against the reference; returns the worst scaled error. `keys`: keys
/// (and queries) per dispatch, `None` for the default (one chunk at these sizes).
fn check_dense(
    ctx: &GpuContext,
    seed: u64,
    shape: Shape,
    causal: bool,
    keys: Option<usize>,
) -> f64 {
    let label = format!("dense seed {seed} {shape} causal={causal} keys/dispatch {keys:?}");
    let x = inputs(seed, shape);
    let mut dense = Attention::dense(ctx).unwrap();
    if let Some(keys) = keys {
        dense = dense.keys_per_dispatch(keys).unwrap();
    }
    let (q, k, v, dout) = (widen(&x.q), widen(&x.k), widen(&x.v), widen(&x.dout));
    let g = dense_gradients(ctx, &dense, &x, &Problem::new(shape).causal(causal));
    let r = cpu::dense_backward(&q, &k, &v, &dout, shape, causal).unwrap();
    compare_all(&label, &g, &r)
}

#[test]
fn dense_backward_matches_reference() {
    let Some(ctx) = gpu() else { return };
    let seed = fresh_seed();
    eprintln!("seed {seed}");
    let mut worst = 0.0f64;
    let cases = [
        (Shape::new(1, 2, 1, 16), None),
        (Shape::new(2, 2, 97, 40), None),
        (Shape::cross(1, 2, 97, 130, 16), None),
        (Shape::cross(1, 4, 130, 66, 59).with_kv_heads(2), None),
        // Chunks of one tile (BK = 32 at d = 8): dK/dV walk 4 query ranges (40 / 3 queries
        // per head of the group, rounded up to a tile), dQ 5 key ranges.
        (Shape::cross(1, 3, 97, 130, 8).with_kv_heads(1), Some(40)),
    ];
    for (c, (shape, keys)) in cases.into_iter().enumerate() {
        for causal in [false, true] {
            let s = seed.wrapping_add(c as u64 * 7919 + causal as u64);
            worst = worst.max(check_dense(ctx, s, shape, causal, keys));
        }
    }
    // The plain variant (no subgroups, as in a browser) and the subgroup variant's fallback
    // for subgroups that are not the composed size: one small causal GQA case each.
    let shape = Shape::cross(1, 2, 37, 50, 16).with_kv_heads(1);
    for other in [browser_like_gpu(), mismatched_subgroup_gpu()]
        .into_iter()
        .flatten()
    {
        worst = worst.max(check_dense(other, seed ^ 0x5bd1, shape, true, Some(40)));
    }
    eprintln!("worst scaled dense gradient error {worst:.2e}");
}

#[test]
fn dense_backward_is_deterministic_and_host_api_agrees() {
    let Some(ctx) = gpu() else { return };
    let seed = fresh_seed();
    let shape = Shape::cross(1, 4, 70, 90, 24).with_kv_heads(2);
    let problem = Problem::new(shape).causal(true);
    let x = inputs(seed, shape);
    let dense = Attention::dense(ctx).unwrap();
    let host = || Host::new(&x.q, &x.k, &x.v);
    let (out, saved) = dense.train(&problem, host()).unwrap();
    let plain = dense.forward(&problem, host()).unwrap();
    assert_eq!(out.o, plain.o);
    assert_eq!(out.lse, plain.lse);
    let a = dense.backward(&saved, HostGrad(&x.dout)).unwrap();
    assert_eq!(
        a,
        dense.backward(&saved, HostGrad(&x.dout)).unwrap(),
        "two runs differ"
    );
    assert_eq!(a, dense_gradients(ctx, &dense, &x, &problem));
}

#[test]
fn bad_dense_backward_input_is_a_typed_error() {
    let Some(ctx) = gpu() else { return };
    let shape = Shape::new(1, 2, 20, 8);
    let problem = Problem::new(shape);
    let x = inputs(1, shape);
    let dense = Attention::dense(ctx).unwrap();
    let (_, saved) = dense.train(&problem, Host::new(&x.q, &x.k, &x.v)).unwrap();
    let e = dense.backward(&saved, HostGrad(&x.dout[1..])).unwrap_err();
    assert!(
        matches!(&e, FmaError::ShapeMismatch { what, .. } if what == "dO"),
        "{e}"
    );
    // Saved by another instance (one that has run a causal problem too), or by FMA.
    let other = Attention::dense(ctx).unwrap();
    other
        .train(&problem.clone().causal(true), Host::new(&x.q, &x.k, &x.v))
        .unwrap();
    let e = other.backward(&saved, HostGrad(&x.dout)).unwrap_err();
    assert!(matches!(e, FmaError::NoSavedForward(_)), "{e}");
    let fma = Attention::fma(ctx, FmaConfig::new(4, 2)).unwrap();
    let e = fma.backward(&saved, HostGrad(&x.dout)).unwrap_err();
    assert!(matches!(e, FmaError::NoSavedForward(_)), "{e}");
    // Query heads that K/V heads do not divide.
    let odd = Shape::new(1, 3, 20, 8).with_kv_heads(2);
    let y = inputs(2, odd);
    let e = dense
        .train(&Problem::new(odd), Host::new(&y.q, &y.k, &y.v))
        .expect_err("3 query heads over 2 K/V heads");
    assert!(matches!(e, FmaError::InvalidConfig { .. }), "{e}");
    let (full, small) = (
        buffer(ctx, "dout", &x.dout),
        buffer(ctx, "small", &x.q[..10]),
    );
    let g = |b| GradTensors {
        dq: b,
        dk: &full,
        dv: &full,
        weights: None,
    };
    let e = dense
        .backward(
            &saved,
            ResidentGrad {
                dout: &full,
                grads: g(&small),
            },
        )
        .unwrap_err();
    assert!(
        matches!(&e, FmaError::ShapeMismatch { what, .. } if what.contains("dQ")),
        "{e}"
    );
    let e = dense
        .backward(
            &saved,
            ResidentGrad {
                dout: &small,
                grads: g(&full),
            },
        )
        .unwrap_err();
    assert!(
        matches!(&e, FmaError::ShapeMismatch { what, .. } if what.contains("dO")),
        "{e}"
    );
    let w = WeightGradTensors {
        wk: &full,
        wv: &full,
        bk: &full,
        bv: &full,
        queries: None,
    };
    let e = dense
        .backward(
            &saved,
            ResidentGrad {
                dout: &full,
                grads: GradTensors {
                    weights: Some(w),
                    ..g(&full)
                },
            },
        )
        .unwrap_err();
    assert!(matches!(e, FmaError::InvalidConfig { .. }), "{e}");
    let t = GpuTensors {
        q: &full,
        k: &full,
        v: &full,
        out: &full,
        lse: None,
    };
    let e = dense
        .train(&problem, Resident(t))
        .expect_err("buffers without an LSE");
    assert!(matches!(e, FmaError::NoSavedForward(_)), "{e}");
    // Tensors over one storage binding: the backward does not split them.
    let small = Attention::dense(ctx).unwrap().max_binding(512).unwrap();
    let e = small
        .train(&problem, Host::new(&x.q, &x.k, &x.v))
        .expect_err("tensors over a 512-byte binding");
    assert!(matches!(e, FmaError::LimitExceeded { .. }), "{e}");
}
