//! Cooperative matrices (issue 29): `ContextOptions::cooperative_matrix`. Where the adapter
//! offers no fitting shape (lavapipe: none at all), `Required` is a typed error naming what it
//! lacks and `IfOffered` a context on the plain kernels; where it offers one (a GPU with
//! tensor cores), dense attention on them matches the plain kernel within f16 rounding of its
//! inputs (Q, K, V and P in f16, softmax and accumulators in f32: ~1e-3).

use crate::common::gpu;
use crate::common::Poisoned;
use crate::f16::{inputs, Half};
use multipole_attn::conformance::COOP_TOL;
use multipole_attn::cpu::{self, widen};
use multipole_attn::gpu::{Attention, ContextOptions, CoopMode, GpuContext, Host, Resident};
use multipole_attn::random::{fresh_seed, normal_tensor};
use multipole_attn::{Problem, Shape, Storage};

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
/// against the f64 reference within the f16 bound. Small shapes (the awkward and long ones:
/// `the_emulated_kernel_is_right_at_awkward_sizes`).
#[test]
fn the_cooperative_kernel_emulated_matches_the_reference() {
    use multipole_attn::Method;
    let Some(_) = gpu() else { return };
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

/// O and the LSE of the emulated kernel (read from NaN-poisoned buffers: an element no
/// dispatch writes stays NaN and fails) against the f64 reference: |got - want| <=
/// COOP_TOL (1 + |want|), COOP_TOL = 2e-2 the f16 bound of the conformance suite (Q, K, V and
/// P rounded to f16, relative 2^-11 each, a logit of N(0, 1) inputs off by ~1e-3 sqrt(d) before
/// the 1 / sqrt(d) scale; measured worst here: a few 1e-3). What the bug did is far outside
/// it: columns 1.. of O never written (NaN here), a dropped key chunk (O off by ~0.1). A row
/// with no key must be O = 0, LSE = -inf exactly. Returns the worst error.
fn check_emulated(label: &str, o: &[f32], lse: &[f32], want: &cpu::Reference) -> f64 {
    assert_eq!(o.len(), want.o.len(), "{label}: O length");
    assert_eq!(lse.len(), want.lse.len(), "{label}: LSE length");
    let mut worst = 0.0f64;
    for (at, (g, w)) in o.iter().zip(&want.o).enumerate() {
        let e = (*g as f64 - w).abs();
        assert!(
            e <= COOP_TOL * (1.0 + w.abs()),
            "{label}: O[{at}] = {g}, want {w}"
        );
        worst = worst.max(e);
    }
    for (row, (g, w)) in lse.iter().zip(&want.lse).enumerate() {
        if w.is_infinite() {
            assert_eq!(*g as f64, *w, "{label}: LSE of key-less row {row}");
            continue;
        }
        let e = (*g as f64 - w).abs();
        assert!(
            e <= COOP_TOL * (1.0 + w.abs()),
            "{label}: LSE[{row}] = {g}, want {w}"
        );
        worst = worst.max(e);
    }
    worst
}

/// Runs the emulated kernel on fresh N(0, 1) inputs through NaN-poisoned buffers (f32 or f16
/// storage) and checks it against the f64 reference ([`check_emulated`]).
fn run_emulated(ctx: &GpuContext, shape: Shape, causal: bool, storage: Storage) -> f64 {
    let seed = fresh_seed();
    let label = format!(
        "cm {:?} seed {seed} {shape} causal {causal} {storage:?}",
        ctx.cooperative_matrix().map(|s| s.size)
    );
    let p = Problem::new(shape).causal(causal);
    let dense = Attention::dense(ctx).unwrap().storage(storage).unwrap();
    // f16 storage: the inputs rounded to f16 (what its buffers hold), so the reference sees
    // the same values.
    let [q, k, v] = match storage {
        Storage::F32 => [
            normal_tensor(seed, shape.elements()),
            normal_tensor(seed + 1, shape.kv_elements()),
            normal_tensor(seed + 2, shape.kv_elements()),
        ],
        Storage::F16 => inputs(seed, shape),
    };
    let want = cpu::dense_attention(&widen(&q), &widen(&k), &widen(&v), shape, causal).unwrap();
    let (o, lse) = match storage {
        Storage::F32 => {
            let bufs = Poisoned::new(ctx, &q, &k, &v, shape);
            dense
                .forward(&p, Resident(bufs.tensors()))
                .unwrap_or_else(|e| panic!("{label}: {e}"));
            bufs.read(ctx)
        }
        Storage::F16 => {
            let bufs = Half::new(ctx, &q, &k, &v, shape);
            dense
                .forward(&p, Resident(bufs.tensors()))
                .unwrap_or_else(|e| panic!("{label}: {e}"));
            bufs.read(ctx, shape)
        }
    };
    let worst = check_emulated(&label, &o, &lse, &want);
    eprintln!("{label}: worst error {worst:.2e}");
    worst
}

/// Issue 29's report: at n = 97, d = 24 the emulated kernel wrote column 0 of O only (f32 and
/// f16 storage), because each invocation computed every 8 x 8 product in full (512 loop
/// iterations per multiply-add, ~6000 per key tile) and llvmpipe stopped its loops after
/// 65535 iterations, 13 key tiles in; from then on every loop ran once. The kernel's logic
/// was right: the same kernel run in key chunks that stay under the limit is right here.
#[test]
fn the_emulated_kernel_at_97_rows_and_d_24_writes_every_element() {
    let Some(base) = gpu() else { return };
    let f16 = base.device.features().contains(wgpu::Features::SHADER_F16);
    for size in [8, 16] {
        let ctx = GpuContext::new()
            .unwrap()
            .emulating_cooperative_matrix(size);
        let shape = Shape::new(1, 1, 97, 24);
        run_emulated(&ctx, shape, false, Storage::F32);
        if f16 {
            run_emulated(&ctx, shape, false, Storage::F16);
        }
    }
}

/// The emulated kernel at awkward sizes: n = 1, 97, 400, 1025 (query and key tails of every
/// tile size), d = 8, 24, 64, 128 (24: not a multiple of 16, the head padded), both masks,
/// cross lengths with key-less rows (causal, more queries than keys), grouped-query heads,
/// 8 x 8 and 16 x 16 matrices, f16 storage. The long ones run in several key chunks (the
/// emulation's dispatches under llvmpipe's loop limit, `emulated_keys_per_dispatch`: 712 keys
/// at d = 24 and 152 at d = 128 with 8 x 8 matrices, 544 and 160 with 16 x 16), so the
/// chunks' resume is checked too: O and LSE of the chunk before, key-less rows that stay
/// key-less (LSE = -inf) across chunks, causal tiles an earlier chunk finished. Sizes keep each
/// case near a second on lavapipe (work ~ n n_kv d: 1025 x 1025 x 128 took 5.5 s).
#[test]
fn the_emulated_kernel_is_right_at_awkward_sizes() {
    let Some(base) = gpu() else { return };
    let f16 = base.device.features().contains(wgpu::Features::SHADER_F16);
    let cases: [(u32, Shape, bool, Storage); 12] = [
        (8, Shape::new(1, 1, 1, 24), false, Storage::F32),
        (8, Shape::new(1, 1, 1025, 24), true, Storage::F32),
        (
            8,
            Shape::new(2, 4, 97, 64).with_kv_heads(2),
            true,
            Storage::F32,
        ),
        (8, Shape::cross(1, 1, 1, 1025, 24), true, Storage::F32),
        (
            8,
            Shape::cross(1, 2, 400, 330, 128).with_kv_heads(1),
            true,
            Storage::F32,
        ),
        (8, Shape::new(1, 2, 97, 128), false, Storage::F16),
        (16, Shape::new(1, 1, 1, 8), true, Storage::F32),
        (16, Shape::new(1, 1, 1025, 24), false, Storage::F32),
        (
            16,
            Shape::new(1, 2, 97, 24).with_kv_heads(1),
            true,
            Storage::F32,
        ),
        (16, Shape::cross(1, 1, 97, 1025, 64), false, Storage::F32),
        (16, Shape::new(1, 1, 1025, 24), true, Storage::F16),
        (16, Shape::cross(1, 1, 400, 330, 128), true, Storage::F16),
    ];
    for size in [8, 16] {
        let ctx = GpuContext::new()
            .unwrap()
            .emulating_cooperative_matrix(size);
        for &(_, shape, causal, storage) in cases.iter().filter(|c| c.0 == size) {
            if storage == Storage::F16 && !f16 {
                continue;
            }
            run_emulated(&ctx, shape, causal, storage);
        }
    }
}
