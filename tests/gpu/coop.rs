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

/// The kernel's logic (tiles, strides, row- and column-major loads, causal and cross masks,
/// grouped heads, the online softmax with O in workgroup memory) on lavapipe: every
/// cooperative operation emulated in scalar WGSL (`GpuContext::emulating_cooperative_matrix`),
/// against the f64 reference within the f16 bound. Small shapes: the emulation computes each
/// matrix in every invocation, and llvmpipe stops an invocation's loops after 65535
/// iterations (with d = 20 and two key tiles of 16 x 16 matrices it did, and returned zeros).
#[test]
fn the_cooperative_kernel_emulated_matches_the_reference() {
    use multipole_attn::conformance::COOP_TOL;
    use multipole_attn::cpu::widen;
    use multipole_attn::Method;
    let Some(_) = gpu() else { return };
    // 16 x 16 matrices: one row of matrices per head and at most two key tiles (each emulated
    // multiply-add is 4096 loop iterations of every invocation).
    let cases = [
        (8, Shape::new(1, 2, 37, 16), false),
        (8, Shape::new(2, 2, 29, 12).with_kv_heads(1), true),
        (8, Shape::cross(1, 1, 40, 19, 8), true),
        (8, Shape::cross(1, 1, 9, 23, 20), false),
        (16, Shape::new(1, 2, 20, 16), true),
        (16, Shape::cross(1, 1, 9, 23, 8), false),
    ];
    for size in [8, 16] {
        let ctx = GpuContext::new()
            .unwrap()
            .emulating_cooperative_matrix(size);
        for (shape, causal) in cases
            .iter()
            .filter(|c| c.0 == size)
            .map(|&(_, s, c)| (s, c))
        {
            let q = normal_tensor(7, shape.elements());
            let k = normal_tensor(8, shape.kv_elements());
            let v = normal_tensor(9, shape.kv_elements());
            let p = Problem::new(shape).causal(causal);
            let got = Attention::dense(&ctx)
                .unwrap()
                .forward(&p, Host::new(&q, &k, &v))
                .unwrap();
            let want = multipole_attn::cpu::forward(
                &Method::Dense,
                &p,
                &widen(&q),
                &widen(&k),
                &widen(&v),
            )
            .unwrap();
            let lse = got.lse.unwrap();
            let what = format!("cm {size} {shape} causal {causal}");
            let mut worst = 0.0f64;
            for (g, w) in got.o.iter().zip(&want.o).chain(lse.iter().zip(&want.lse)) {
                if w.is_infinite() {
                    assert_eq!(*g as f64, *w, "{what}: a row with no key");
                    continue;
                }
                let e = (*g as f64 - w).abs();
                assert!(e <= COOP_TOL * (1.0 + w.abs()), "{what}: {g} vs {w}");
                worst = worst.max(e);
            }
            // f16 rounding shows: the emulation is not the plain f32 kernel.
            assert!(worst > 1e-6, "{what}: error {worst:e}, no f16 rounding?");
            eprintln!("{what}: worst error {worst:.2e}");
        }
    }
}
