//! The softmax variants on host tensors over one storage binding, which the executors run a
//! run of heads at a time (`engine::front::head_chunks`; training: `fma/backward_runs.rs`,
//! `dense/backward_runs.rs`): each run's parameter block says which of the caller's heads it
//! holds (`HeadSpan`), so every problem meets its own head's sink.
//!
//! The shapes are chosen so that runs start inside a batch's heads and wrap into the next
//! batch (2 x 3 heads in runs of 2: first heads 0, 2 and 1 of their batches) and start on
//! the second group of a GQA batch (2 x 4 heads over 2 K/V heads, runs of one group), and a
//! group too large for one binding runs one head at a time (6 heads over 2 K/V heads). A sink
//! read from the wrong head moves O by far more than rounding (sinks ~ N(0, 1), one term of a
//! row's sum of ~100 exp terms of the same size).
//!
//! Dense attention runs both forward kernels (rows and tiled: `DENSE_KERNELS`). Against the
//! same Attention without the binding cap: O, the LSE, dQ, dK and dV to the bit
//! (a run's dispatches compute each head as the unsplit dispatch does; K/V heads are summed
//! inside one run; a group run a head at a time: dK and dV within 1e-5 of their scale); dsinks within 1e-6 of its scale (each run's f64 sum over its rows is
//! rounded to f32 and the runs are added in f32: a few ulp). Against the f64 reference: the
//! tolerances of tests/gpu/variants.rs.

use crate::common::gradients::{compare, compare_all, inputs};
use crate::common::split::same_bits;
use crate::common::{gpu, DENSE_KERNELS};
use multipole_attn::closeness::closeness;
use multipole_attn::cpu::{self, widen};
use multipole_attn::gpu::{Attention, Host, HostGrad, Resident};
use multipole_attn::plan::DenseKernel;
use multipole_attn::random::{fresh_seed, normal_tensor};
use multipole_attn::{FmaConfig, FmaError, Method, Problem, Shape, Variants, Window};

/// One head of 97 x 16 f32 is 6,208 bytes: 16 KiB holds two heads' Q (or K, V, O) but not
/// three, so the 6 and 8 heads below run in runs of two.
const CAP: u64 = 16 << 10;

/// Forward, training forward and backward of `p` under `CAP` against the uncapped run and the
/// f64 reference. `kv_bits`: whole K/V groups per run, so dK and dV are the unsplit bits;
/// else (a group run one head at a time) their heads' terms are added across runs in head
/// order, the same terms regrouped: within 1e-5 of each tensor's scale.
/// `kernel`: dense attention's forward kernel (no effect on FMA).
fn check(method: &Method, p: &Problem, seed: u64, kv_bits: bool, kernel: DenseKernel) {
    let shape = p.shape;
    let label = format!(
        "seed {seed} {method:?} {kernel:?} {shape} causal={} {:?}",
        p.causal, p.variants
    );
    let x = inputs(seed, shape);
    let host = Host::new(&x.q, &x.k, &x.v);
    let make = || Attention::new(gpu().unwrap(), method.clone())?.dense_kernel(kernel);
    let whole = make().unwrap();
    let capped = make().and_then(|a| a.max_binding(CAP)).unwrap();
    assert!(
        shape.elements() as u64 * 4 > CAP,
        "{label}: the tensors must exceed the cap"
    );

    let a = capped
        .forward(p, host)
        .unwrap_or_else(|e| panic!("{label}: {e}"));
    let b = whole.forward(p, host).unwrap();
    same_bits(&label, "forward O", &a.o, &b.o);
    let (la, lb) = (a.lse.unwrap(), b.lse.unwrap());
    same_bits(&label, "forward LSE", &la, &lb);
    let (q, k, v, dout) = (widen(&x.q), widen(&x.k), widen(&x.v), widen(&x.dout));
    let r = cpu::forward(method, p, &q, &k, &v).unwrap();
    let c = closeness(&a.o, &r.o, 5e-5, 5e-5);
    assert_eq!(c.violations, 0, "{label}: O against the reference {c:?}");
    let c = closeness(&la, &r.lse, 5e-5, 1e-5);
    assert_eq!(c.violations, 0, "{label}: LSE against the reference {c:?}");

    let (ta, sa) = capped
        .train(p, host)
        .unwrap_or_else(|e| panic!("{label}: train {e}"));
    let (tb, sb) = whole.train(p, host).unwrap();
    same_bits(&label, "training O", &ta.o, &tb.o);
    let ga = capped.backward(&sa, HostGrad(&x.dout)).unwrap();
    let gb = whole.backward(&sb, HostGrad(&x.dout)).unwrap();
    for (name, g, w) in [
        ("dQ", &ga.dq, &gb.dq),
        ("dK", &ga.dk, &gb.dk),
        ("dV", &ga.dv, &gb.dv),
    ] {
        if kv_bits || name == "dQ" {
            same_bits(&label, name, g, w);
        } else {
            let scale = w.iter().fold(1.0f64, |m, x| m.max(f64::from(x.abs())));
            let c = closeness(g, &widen(w), 1e-5 * scale, 0.0);
            assert_eq!(c.violations, 0, "{label}: {name} {c:?}");
        }
    }
    let rg = cpu::backward(method, p, (&q, &k, &v), &dout).unwrap();
    compare_all(&label, &ga, &rg);
    match (&ga.dsinks, &gb.dsinks, &rg.dsinks) {
        (Some(g), Some(w), Some(r)) => {
            let scale = w.iter().fold(1.0f32, |m, x| m.max(x.abs()));
            for (h, (x, y)) in g.iter().zip(w).enumerate() {
                assert!(
                    (x - y).abs() <= 1e-6 * scale,
                    "{label}: dsinks[{h}] {x} in runs, {y} whole"
                );
            }
            compare(&label, "dsinks", g, r);
        }
        (None, None, None) => {}
        other => panic!("{label}: dsinks {other:?}"),
    }
}

/// Sinks alone and with a window and a softcap, causal and not, dense and FMA (m = 16: three
/// coarse levels), on runs that start mid-batch (MHA) and on a GQA group (one run per group).
#[test]
fn sinks_on_runs_of_heads_match_the_unsplit_run_and_the_reference() {
    let Some(_) = gpu() else { return };
    let seed = fresh_seed();
    eprintln!("seed {seed}");
    let shapes = [
        Shape::new(2, 3, 97, 16),
        Shape::new(2, 4, 97, 16).with_kv_heads(2),
    ];
    for (i, shape) in shapes.into_iter().enumerate() {
        for causal in [false, true] {
            let s = seed.wrapping_add(2 * i as u64 + causal as u64);
            let sinks = Some(normal_tensor(s ^ 0x51, shape.heads));
            let window = Some(Window {
                left: 16,
                right: if causal { 0 } else { 5 },
            });
            let cases = [
                Variants {
                    sinks: sinks.clone(),
                    ..Variants::default()
                },
                Variants {
                    softcap: Some(2.0),
                    sinks,
                    window,
                },
            ];
            for v in cases {
                let p = Problem::new(shape).causal(causal).variants(v);
                for kernel in DENSE_KERNELS {
                    check(&Method::Dense, &p, s, true, kernel);
                }
                check(
                    &Method::Fma(FmaConfig::new(16, 2)),
                    &p,
                    s,
                    true,
                    DenseKernel::Rows,
                );
            }
        }
    }
}

/// What stays refused, precisely: resident tensors over one binding (the executors copy them
/// through a head at a time, a path not planned with the variants) name the variants and
/// the binding, for dense and FMA; the same tensors from the host run.
#[test]
fn resident_tensors_over_a_binding_with_variants_are_a_typed_error() {
    let Some(ctx) = gpu() else { return };
    let shape = Shape::new(1, 4, 97, 16);
    let x = inputs(fresh_seed(), shape);
    let p = Problem::new(shape).causal(true).variants(Variants {
        sinks: Some(vec![0.5, -1.0, 1.5, 0.0]),
        ..Variants::default()
    });
    for method in [Method::Dense, Method::Fma(FmaConfig::new(16, 2))] {
        let a = Attention::new(ctx, method.clone())
            .and_then(|a| a.max_binding(CAP))
            .unwrap();
        // Copy usages, so the refusal is the variants' and not the buffers'.
        let usage = wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST;
        let bufs = crate::common::Poisoned::with_usage(ctx, &x.q, &x.k, &x.v, shape, usage);
        let e = a
            .forward(&p, Resident(bufs.tensors()))
            .expect_err("resident over a binding");
        match &e {
            FmaError::LimitExceeded { what, .. } => {
                assert!(what.contains("softmax variant"), "{method:?}: {e}")
            }
            other => panic!("{method:?}: {other}"),
        }
        assert!(
            a.forward(&p, Host::new(&x.q, &x.k, &x.v)).is_ok(),
            "{method:?}"
        );
    }
}

/// A K/V group too large for one binding (3 heads of 6,208 bytes over 16 KiB) runs one query
/// head at a time, never a run straddling two groups (which ran two K/V heads under a shape of
/// one: a GPU validation error before), with the sinks of each head: the unsplit bits for O,
/// the LSE and dQ, dense and FMA, dK and dV to rounding (`check`).
#[test]
fn a_group_over_the_binding_runs_one_head_at_a_time_with_its_sink() {
    let Some(_) = gpu() else { return };
    let seed = fresh_seed();
    eprintln!("seed {seed}");
    let shape = Shape::new(1, 6, 97, 16).with_kv_heads(2);
    let p = Problem::new(shape).causal(true).variants(Variants {
        sinks: Some(normal_tensor(seed ^ 0x51, 6)),
        ..Variants::default()
    });
    for kernel in DENSE_KERNELS {
        check(&Method::Dense, &p, seed, false, kernel);
    }
    check(
        &Method::Fma(FmaConfig::new(16, 2)),
        &p,
        seed,
        false,
        DenseKernel::Rows,
    );
}
