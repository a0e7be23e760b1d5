//! The softmax variants of issue 30 (softcap, sinks, sliding window; docs/variants.md) on the
//! GPU against the f64 reference (`cpu::forward` and `cpu::backward` of the same `Problem`, themselves checked against finite differences in
//! `src/cpu/tests_variants.rs`): dense and FMA fine queries, each variant alone and combined,
//! causal and not, grouped-query heads, cross-length dense, packed variable-length batches,
//! awkward lengths (n = 1, 97), fresh seeds (printed), forward outputs poisoned with NaN.
//! Both kernel variants: the default context (the subgroup path where the adapter has
//! subgroups) and `mismatched_subgroup_gpu` (the plain fallback inside the subgroup variant).
//!
//! Tolerances: the forward's of tests/gpu/forward.rs (|gpu - ref| <= 5e-5 + 5e-5 |ref| for O,
//! 5e-5 + 1e-5 |ref| for the LSE) and the backward's of tests/gpu/backward.rs (TOL = 2e-4 of
//! each tensor's scale), for the same reasons: the cap C tanh(l / C) has slope <= 1, so it
//! does not amplify the logits' f32 error (its own tanh is exact to a few ulp of C); a sink is
//! one more term of the same size in the sum; a window removes terms. dsinks sums n f32
//! products per head in f64 on the host: held to the gradients' TOL. A missing cap, a sink
//! counted twice or a key outside its window moves O by >= 1e-2.

use crate::common::gradients::{compare, compare_all, inputs};
use crate::common::{gpu, mismatched_subgroup_gpu, random_learned, Poisoned, DENSE_KERNELS};
use multipole_attn::closeness::closeness;
use multipole_attn::cpu::{self, widen};
use multipole_attn::gpu::{Attention, GpuContext, Host, HostGrad, Resident};
use multipole_attn::plan::DenseKernel;
use multipole_attn::random::{fresh_seed, normal_tensor};
use multipole_attn::{
    Downsample, FmaConfig, FmaError, Method, Problem, Sequences, Shape, Variants, Window,
};

const O_ATOL: f64 = 5e-5;
const O_RTOL: f64 = 5e-5;
const LSE_ATOL: f64 = 5e-5;
const LSE_RTOL: f64 = 1e-5;

/// Every variant alone and the combinations models use, for `heads` query heads; the window's
/// right extent is 0 under the causal mask.
fn variant_cases(seed: u64, heads: usize, causal: bool, window: Window) -> Vec<Variants> {
    let sinks = Some(normal_tensor(seed ^ 0x51, heads));
    let window = Some(Window {
        right: if causal { 0 } else { window.right },
        ..window
    });
    vec![
        Variants {
            softcap: Some(1.5),
            ..Variants::default()
        },
        Variants {
            sinks: sinks.clone(),
            ..Variants::default()
        },
        Variants {
            window,
            ..Variants::default()
        },
        Variants {
            sinks: sinks.clone(),
            window,
            ..Variants::default()
        },
        Variants {
            softcap: Some(2.0),
            window,
            ..Variants::default()
        },
        Variants {
            softcap: Some(3.0),
            sinks,
            window: None,
        },
    ]
}

fn check_forward(label: &str, o: &[f32], lse: &[f32], r: &cpu::Reference, shape: Shape) {
    let co = closeness(&o[..shape.elements()], &r.o, O_ATOL, O_RTOL);
    let cl = closeness(&lse[..shape.rows()], &r.lse, LSE_ATOL, LSE_RTOL);
    assert_eq!(co.violations, 0, "{label}: O {co:?}");
    assert_eq!(cl.violations, 0, "{label}: LSE {cl:?}");
}

fn check_dsinks(label: &str, got: &Option<Vec<f32>>, want: &Option<Vec<f64>>) {
    match (got, want) {
        (None, None) => {}
        (Some(g), Some(w)) => {
            compare(label, "dsinks", g, w);
        }
        other => panic!("{label}: dsinks {other:?}"),
    }
}

/// One case of `method` on the problem `p` (its mask and variants): the forward through
/// NaN-poisoned resident buffers, the backward through host tensors, both against the f64
/// reference.
/// `kernel`: dense attention's forward kernel (no effect on FMA).
fn case(ctx: &GpuContext, seed: u64, method: &Method, p: &Problem, kernel: DenseKernel) {
    let shape = p.shape;
    let name = if method.fma().is_some() {
        "FMA"
    } else {
        "dense"
    };
    let label = format!(
        "seed {seed} {name} {shape} causal={} {:?} {kernel:?}",
        p.causal, p.variants
    );
    let x = inputs(seed, shape);
    let attention = Attention::new(ctx, method.clone())
        .and_then(|a| a.dense_kernel(kernel))
        .unwrap_or_else(|e| panic!("{label}: {e}"));
    let bufs = Poisoned::new(ctx, &x.q, &x.k, &x.v, shape);
    attention
        .forward(p, Resident(bufs.tensors()))
        .unwrap_or_else(|e| panic!("{label}: {e}"));
    let (o, lse) = bufs.read(ctx);
    let (q, k, v, dout) = (widen(&x.q), widen(&x.k), widen(&x.v), widen(&x.dout));
    let r = cpu::forward(method, p, &q, &k, &v).unwrap();
    check_forward(&label, &o, &lse, &r, shape);
    let (_, saved) = attention
        .train(p, Host::new(&x.q, &x.k, &x.v))
        .unwrap_or_else(|e| panic!("{label}: {e}"));
    let g = attention.backward(&saved, HostGrad(&x.dout)).unwrap();
    let rg = cpu::backward(method, p, (&q, &k, &v), &dout).unwrap();
    compare_all(&label, &g, &rg);
    check_dsinks(&label, &g.dsinks, &rg.dsinks);
}

fn fma16() -> Method {
    Method::Fma(FmaConfig::new(16, 2))
}

/// Dense: n = 97 with grouped-query heads, n = 1, cross-length (more keys than queries),
/// causal and not, every variant case; a window of (20, 7) skips most key tiles.
#[test]
fn dense_variants_match_the_reference() {
    let Some(ctx) = gpu() else { return };
    let seed = fresh_seed();
    eprintln!("seed {seed}");
    let shapes = [
        Shape::new(1, 4, 97, 16).with_kv_heads(2),
        Shape::new(2, 2, 1, 8),
        Shape::cross(1, 2, 33, 150, 12),
    ];
    for (c, shape) in shapes.into_iter().enumerate() {
        for causal in [false, true] {
            let s = seed.wrapping_add(10 * c as u64 + causal as u64);
            let window = Window { left: 20, right: 7 };
            for v in variant_cases(s, shape.heads, causal, window) {
                let p = Problem::new(shape).causal(causal).variants(v);
                for kernel in DENSE_KERNELS {
                    case(ctx, s, &Method::Dense, &p, kernel);
                }
            }
        }
    }
}

/// FMA fine queries: n = 97 over m = 16 (three coarse levels, partial windows) with grouped-
/// query heads, causal and not: the softcap on fine and coarse logits, sinks in FMA's one
/// softmax, and a window inside the near field (L, R <= m) alone and combined.
#[test]
fn fma_variants_match_the_reference() {
    let Some(ctx) = gpu() else { return };
    let seed = fresh_seed();
    eprintln!("seed {seed}");
    let shape = Shape::new(1, 4, 97, 16).with_kv_heads(2);
    for causal in [false, true] {
        let s = seed.wrapping_add(causal as u64);
        let window = Window { left: 16, right: 9 };
        for v in variant_cases(s, shape.heads, causal, window) {
            let p = Problem::new(shape).causal(causal).variants(v);
            case(ctx, s, &fma16(), &p, DenseKernel::Rows);
        }
    }
    // n = 1: one query, one key.
    let one = Shape::new(1, 2, 1, 8);
    for v in variant_cases(seed, 2, true, Window { left: 3, right: 0 }) {
        case(
            ctx,
            seed,
            &fma16(),
            &Problem::new(one).causal(true).variants(v),
            DenseKernel::Rows,
        );
    }
}

/// FMA's window equals dense attention's with the same window: `Attention` runs FMA with a
/// window (Average downsampling) on dense attention's banded kernel, so its plans are dense
/// plans and its forward, training forward and backward are dense attention's bits; FMA's
/// own near-field kernel (still run by a Learned configuration, whose unused weights get zero
/// gradients) gives the same O, LSE and gradients to f32 rounding (1e-5 absolute and
/// relative: both are exact windowed attention, summing the same terms in another order,
/// O(1) inputs).
#[test]
fn fma_window_equals_dense_window() {
    let Some(ctx) = gpu() else { return };
    let seed = fresh_seed();
    eprintln!("seed {seed}");
    let shape = Shape::new(1, 2, 200, 16);
    let x = inputs(seed, shape);
    let host = Host::new(&x.q, &x.k, &x.v);
    let bits = |a: &[f32]| a.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
    let weights = Downsample::Learned(random_learned(seed, 16, 32, 2, 200));
    let learned = FmaConfig::new(32, 2).downsample(weights);
    for causal in [false, true] {
        let v = Variants {
            window: Some(Window {
                left: 32,
                right: if causal { 0 } else { 5 },
            }),
            sinks: Some(vec![0.5, -1.0]),
            softcap: Some(4.0),
        };
        let label = format!("seed {seed} causal={causal}");
        let p = Problem::new(shape).causal(causal).variants(v);
        let fma = Attention::fma(ctx, FmaConfig::new(32, 2)).unwrap();
        let dense = Attention::dense(ctx).unwrap();
        let near = Attention::fma(ctx, learned.clone()).unwrap();
        assert!(fma.plan(&p).unwrap().dense().is_some(), "{label}: plan");
        assert!(fma.backward_plan(&p).unwrap().dense_backward().is_some());
        assert!(near.plan(&p).unwrap().fma().is_some(), "{label}: Learned");
        let a = fma.forward(&p, host).unwrap();
        let b = dense.forward(&p, host).unwrap();
        let n = near.forward(&p, host).unwrap();
        assert_eq!(bits(&a.o), bits(&b.o), "{label}: O");
        let c = closeness(&n.o, &widen(&b.o), 1e-5, 1e-5);
        assert_eq!(c.violations, 0, "{label}: FMA's near field {c:?}");
        let (_, sa) = fma.train(&p, host).unwrap();
        let (_, sb) = dense.train(&p, host).unwrap();
        let (_, sn) = near.train(&p, host).unwrap();
        let ga = fma.backward(&sa, HostGrad(&x.dout)).unwrap();
        let gb = dense.backward(&sb, HostGrad(&x.dout)).unwrap();
        let gn = near.backward(&sn, HostGrad(&x.dout)).unwrap();
        for (name, a, b, n) in [
            ("dQ", &ga.dq, &gb.dq, &gn.dq),
            ("dK", &ga.dk, &gb.dk, &gn.dk),
            ("dV", &ga.dv, &gb.dv, &gn.dv),
        ] {
            assert_eq!(bits(a), bits(b), "{label}: {name}");
            let c = closeness(n, &widen(b), 1e-5, 1e-5);
            assert_eq!(c.violations, 0, "{label}: FMA's near field {name} {c:?}");
        }
        assert_eq!(ga.dsinks, gb.dsinks, "{label}: dsinks");
        assert!(ga.weights.is_none(), "{label}: Average has no weights");
        let w = gn.weights.expect("Learned: the weights' gradients");
        assert!(
            w.iter()
                .all(|l| l.wk.iter().chain(&l.wv).all(|&g| g == 0.0)),
            "{label}: no coarse level, zero weight gradients"
        );
        // FMA's rules still hold: a window wider than the block is refused as before.
        let wide = Problem::new(shape).causal(causal).variants(Variants {
            window: Some(Window { left: 40, right: 0 }),
            ..Variants::default()
        });
        assert!(
            matches!(
                fma.forward(&wide, host),
                Err(FmaError::InvalidConfig { what: "window", .. })
            ),
            "{label}: L > m"
        );
    }
}

/// Packed variable-length batches (lengths 1, 7, 97, 40) with grouped-query heads: dense and
/// FMA, forward and backward, against each sequence alone in the reference.
#[test]
fn packed_batches_with_variants() {
    let Some(ctx) = gpu() else { return };
    let seed = fresh_seed();
    eprintln!("seed {seed}");
    let seqs = Sequences::packed(vec![1, 7, 97, 40]).unwrap();
    let shape = seqs.shape(4, 2, 16);
    let x = inputs(seed, shape);
    let (q, k, v, dout) = (widen(&x.q), widen(&x.k), widen(&x.v), widen(&x.dout));
    let dense = Attention::dense(ctx).unwrap();
    let tiled = Attention::dense(ctx)
        .unwrap()
        .dense_kernel(DenseKernel::Tiled)
        .unwrap();
    let fma = Attention::new(ctx, fma16()).unwrap();
    for causal in [false, true] {
        for var in variant_cases(seed, 4, causal, Window { left: 16, right: 3 }) {
            let p = Problem {
                sequences: Some(seqs.clone()),
                ..Problem::new(shape).causal(causal).variants(var)
            };
            let all = [
                (Method::Dense, &dense, "rows"),
                (Method::Dense, &tiled, "tiled"),
                (fma16(), &fma, ""),
            ];
            for (method, attention, kernel) in all {
                let label = format!(
                    "seed {seed} packed {method:?} {kernel} causal={causal} {:?}",
                    p.variants
                );
                let out = attention.forward(&p, Host::new(&x.q, &x.k, &x.v)).unwrap();
                let r = cpu::forward(&method, &p, &q, &k, &v).unwrap();
                check_forward(&label, &out.o, out.lse.as_ref().unwrap(), &r, shape);
                let (_, saved) = attention.train(&p, Host::new(&x.q, &x.k, &x.v)).unwrap();
                let g = attention.backward(&saved, HostGrad(&x.dout)).unwrap();
                let rg = cpu::backward(&method, &p, (&q, &k, &v), &dout).unwrap();
                compare_all(&label, &g, &rg);
                check_dsinks(&label, &g.dsinks, &rg.dsinks);
            }
        }
    }
}

/// The subgroup variant's fallback path (a subgroup that is not full) gives the reference too.
#[test]
fn the_fallback_path_matches_the_reference() {
    let Some(ctx) = mismatched_subgroup_gpu() else {
        return;
    };
    let seed = fresh_seed();
    eprintln!("seed {seed}");
    let shape = Shape::new(1, 2, 97, 16);
    let v = Variants {
        softcap: Some(2.0),
        sinks: Some(vec![0.3, -0.7]),
        window: Some(Window { left: 16, right: 0 }),
    };
    let no_window = Variants {
        window: None,
        ..v.clone()
    };
    case(
        ctx,
        seed,
        &Method::Dense,
        &Problem::new(shape).causal(true).variants(v.clone()),
        DenseKernel::Rows,
    );
    case(
        ctx,
        seed,
        &fma16(),
        &Problem::new(shape).causal(true).variants(no_window),
        DenseKernel::Rows,
    );
    case(
        ctx,
        seed,
        &fma16(),
        &Problem::new(shape).causal(true).variants(v),
        DenseKernel::Rows,
    );
}
