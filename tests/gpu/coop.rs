//! Cooperative matrices (issue 29): `ContextOptions::cooperative_matrix`. Where the adapter
//! offers no fitting shape (lavapipe: none at all), `Required` is a typed error naming what it
//! lacks and `IfOffered` a context on the plain kernels; where it offers one (a GPU with
//! tensor cores), dense attention on them matches the plain kernel within f16 rounding of its
//! inputs (Q, K, V and P in f16, softmax and accumulators in f32: ~1e-3).

use crate::common::gpu;
use multipole_attn::gpu::{Attention, ContextOptions, CoopMode, GpuContext, Host};
use multipole_attn::random::normal_tensor;
use multipole_attn::{Problem, Shape};

#[test]
fn cooperative_matrices_are_used_only_where_offered() {
    let Some(_) = gpu() else { return };
    let if_offered = GpuContext::with_options(ContextOptions {
        cooperative_matrix: CoopMode::IfOffered,
        ..Default::default()
    })
    .unwrap();
    let required = GpuContext::with_options(ContextOptions {
        cooperative_matrix: CoopMode::Required,
        ..Default::default()
    });
    let plain = GpuContext::new().unwrap();
    assert_eq!(plain.cooperative_matrix(), None, "opt-in only");
    match if_offered.cooperative_matrix() {
        None => {
            let e = required.err().expect("Required without a shape must fail");
            let text = e.to_string();
            assert!(text.contains("cooperative_matrix"), "{text}");
            assert!(text.contains("lacks"), "{text}");
            eprintln!("{}: {text}", if_offered.info.name);
        }
        Some(shape) => {
            assert_eq!(required.unwrap().cooperative_matrix(), Some(shape));
            eprintln!("{}: cooperative matrices {shape:?}", if_offered.info.name);
        }
    }
    // Either way the dense forward runs and agrees with the plain kernels' (exactly where no
    // shape is offered: the same kernel; within f16 rounding on tensor cores).
    let tol = if if_offered.cooperative_matrix().is_some() {
        2e-2
    } else {
        0.0
    };
    for (shape, causal) in [
        (Shape::new(2, 3, 200, 64), false),
        (Shape::new(1, 4, 333, 40).with_kv_heads(2), true),
        (Shape::cross(1, 2, 50, 170, 16), true),
    ] {
        let q = normal_tensor(1, shape.elements());
        let k = normal_tensor(2, shape.kv_elements());
        let v = normal_tensor(3, shape.kv_elements());
        let p = Problem::new(shape).causal(causal);
        let run = |ctx: &GpuContext| {
            let out = Attention::dense(ctx)
                .unwrap()
                .forward(&p, Host::new(&q, &k, &v))
                .unwrap();
            (out.o, out.lse.unwrap())
        };
        let (o0, l0) = run(&plain);
        let (o1, l1) = run(&if_offered);
        let worst = |a: &[f32], b: &[f32]| {
            a.iter()
                .zip(b)
                .filter(|(x, y)| x.is_finite() || y.is_finite())
                .map(|(x, y)| (x - y).abs())
                .fold(0.0f32, f32::max)
        };
        assert!(
            worst(&o0, &o1) <= tol,
            "{shape} causal {causal}: O {}",
            worst(&o0, &o1)
        );
        assert!(
            worst(&l0, &l1) <= tol,
            "{shape} causal {causal}: LSE {}",
            worst(&l0, &l1)
        );
        // Rows with no key (cross, causal) keep LSE = -inf on both.
        let empty = |l: &[f32]| l.iter().filter(|x| **x == f32::NEG_INFINITY).count();
        assert_eq!(empty(&l0), empty(&l1));
    }
}
