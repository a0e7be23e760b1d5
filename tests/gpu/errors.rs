//! Bad input on the GPU path: every case returns a typed error naming what was wrong, and the
//! context keeps working afterwards. Plus the browser's limits on a native adapter.

use crate::common::{browser_like_gpu, closeness, gpu, gpu_with_binding_limit, Poisoned};
use multipole_attn::cpu::{self, widen};
use multipole_attn::gpu::{Attention, GpuTensors, Host, Plan, Resident};
use multipole_attn::random::{fresh_seed, normal_tensor};
use multipole_attn::{Downsample, FmaConfig, FmaError, LearnedWeights, Method, Problem, Shape};

#[test]
fn bad_shapes_and_configs_are_typed_errors() {
    let Some(ctx) = gpu() else { return };
    let shape = Shape::new(1, 2, 100, 16);
    let problem = Problem::new(shape);
    let x = normal_tensor(1, shape.elements());
    let fma = Attention::fma(ctx, FmaConfig::new(16, 2)).unwrap();

    let e = fma
        .forward(&problem, Host::new(&x, &x, &x[1..]).without_lse())
        .unwrap_err();
    assert!(
        matches!(&e, FmaError::ShapeMismatch { what, .. } if what == "V"),
        "{e}"
    );
    let e = fma
        .forward(
            &Problem::new(Shape::new(1, 0, 100, 16)),
            Host::new(&x, &x, &x).without_lse(),
        )
        .unwrap_err();
    assert!(
        matches!(e, FmaError::InvalidConfig { what: "heads", .. }),
        "{e}"
    );

    let wide = Problem::new(Shape::new(1, 1, 10, 300));
    let y = normal_tensor(2, wide.shape.elements());
    let e = fma
        .forward(&wide, Host::new(&y, &y, &y).without_lse())
        .unwrap_err();
    assert!(
        matches!(
            e,
            FmaError::InvalidConfig {
                what: "head_dim",
                ..
            }
        ),
        "{e}"
    );
    assert!(e.to_string().contains("1 ..= 256"), "{e}");
    let e = Attention::dense(ctx)
        .unwrap()
        .forward(&wide, Host::new(&y, &y, &y).without_lse())
        .unwrap_err();
    assert!(
        matches!(
            e,
            FmaError::InvalidConfig {
                what: "head_dim",
                ..
            }
        ),
        "{e}"
    );

    let e = Attention::fma(ctx, FmaConfig::new(16, 3)).expect_err("p = 3 does not divide m = 16");
    assert!(
        matches!(e, FmaError::InvalidConfig { what: "rank p", .. }),
        "{e}"
    );

    // Weights for n = 100 (3 levels at m = 8) used on n = 1000 (6 levels).
    let w = LearnedWeights::box_init_for(16, 8, 2, 100);
    let learned =
        Attention::fma(ctx, FmaConfig::new(8, 2).downsample(Downsample::Learned(w))).unwrap();
    let long = Problem::new(Shape::new(1, 1, 1000, 16));
    let z = normal_tensor(3, long.shape.elements());
    let e = learned
        .forward(&long, Host::new(&z, &z, &z).without_lse())
        .unwrap_err();
    assert!(
        matches!(&e, FmaError::Weights(m) if m.contains("missing level 4")),
        "{e}"
    );

    let mut bad = LearnedWeights::box_init_for(16, 8, 2, 100);
    bad.levels[1].bv[3] = f32::NAN;
    let e = Attention::fma(
        ctx,
        FmaConfig::new(8, 2).downsample(Downsample::Learned(bad)),
    )
    .expect_err("NaN weight");
    assert!(
        matches!(&e, FmaError::Weights(m) if m.contains("v_b2")),
        "{e}"
    );

    // The context is still usable after all of that.
    assert!(fma
        .forward(&problem, Host::new(&x, &x, &x).without_lse())
        .is_ok());
}

#[test]
fn caller_buffers_are_checked() {
    let Some(ctx) = gpu() else { return };
    let shape = Shape::new(1, 1, 64, 16);
    let x = normal_tensor(4, shape.elements());
    let problem = Problem::new(shape);
    let bufs = Poisoned::new(ctx, &x, &x, &x, shape);
    let fma = Attention::fma(ctx, FmaConfig::new(16, 2)).unwrap();
    let bigger = Problem::new(Shape::new(1, 2, 64, 16));
    let e = fma.forward(&bigger, Resident(bufs.tensors())).unwrap_err();
    assert!(
        matches!(&e, FmaError::ShapeMismatch { what, .. } if what == "Q buffer"),
        "{e}"
    );

    let not_storage = ctx.device.create_buffer(&wgpu::BufferDescriptor {
        label: None,
        size: shape.elements() as u64 * 4,
        usage: wgpu::BufferUsages::COPY_DST,
        mapped_at_creation: false,
    });
    let t = GpuTensors {
        out: &not_storage,
        ..bufs.tensors()
    };
    let e = fma.forward(&problem, Resident(t)).unwrap_err();
    assert!(
        matches!(&e, FmaError::ShapeMismatch { what, .. } if what == "O buffer usage"),
        "{e}"
    );

    // O aliasing Q is a WebGPU validation error, caught in an error scope and returned.
    let t = GpuTensors {
        out: &bufs.q,
        ..bufs.tensors()
    };
    let e = fma.forward(&problem, Resident(t)).unwrap_err();
    assert!(matches!(e, FmaError::Gpu { .. }), "{e}");
}

#[test]
fn tensors_over_the_binding_limit_are_split_by_heads() {
    if gpu().is_none() {
        return;
    }
    // Two devices with WebGPU's default limits but for the storage-binding size: 1 MiB (the
    // split run) and 128 MiB (the unsplit one). Same tiles on both, so the bits must agree.
    let ctx = gpu_with_binding_limit(1 << 20);
    let big = &gpu_with_binding_limit(128 << 20);
    let seed = fresh_seed();
    // 5 heads of 1024 x 64: 1.25 MiB per tensor, processed as runs of 4 heads and 1 head.
    let shape = Shape::new(1, 5, 1024, 64);
    let (q, k, v) = (
        normal_tensor(seed, shape.elements()),
        normal_tensor(seed + 1, shape.elements()),
        normal_tensor(seed + 2, shape.elements()),
    );
    let host = Host::new(&q, &k, &v);
    for (cfg, causal) in [
        (FmaConfig::new(64, 2), false),
        (FmaConfig::new(16, 2), true),
    ] {
        let problem = Problem::new(shape).causal(causal);
        let split = Attention::fma(&ctx, cfg.clone())
            .unwrap()
            .forward(&problem, host)
            .unwrap();
        let whole = Attention::fma(big, cfg)
            .unwrap()
            .forward(&problem, host)
            .unwrap();
        assert_eq!(
            split.o, whole.o,
            "seed {seed}: split run differs from the unsplit one"
        );
        assert_eq!(split.lse, whole.lse);
    }
    let problem = Problem::new(shape);
    let split = Attention::dense(&ctx)
        .unwrap()
        .forward(&problem, host.without_lse())
        .unwrap();
    let whole = Attention::dense(big)
        .unwrap()
        .forward(&problem, host.without_lse())
        .unwrap();
    assert_eq!(split.o, whole.o);

    // One head alone over the limit is split along its sequence: tests/gpu/split.rs.
}

#[test]
fn browser_limits_on_a_native_adapter() {
    // 256 invocations per workgroup and 16 KiB of workgroup memory, as in Chromium's WebGPU:
    // m = 512 needs 2 query tiles of 256 per block; d = 128 leaves room for 15 keys per tile.
    let Some(ctx) = browser_like_gpu() else {
        return;
    };
    assert!(ctx.limits.max_compute_invocations_per_workgroup <= 256);
    assert!(ctx.limits.max_compute_workgroup_storage_size <= 16384);
    assert!(!ctx.device.features().contains(wgpu::Features::SHADER_F16));
    let seed = fresh_seed();
    for &(n, d, m, p, causal) in &[
        (1100, 128, 512, 4, false),
        (1100, 128, 512, 2, true),
        (777, 40, 300, 3, false),
    ] {
        let shape = Shape::new(1, 2, n, d);
        let (q, k, v) = (
            normal_tensor(seed, shape.elements()),
            normal_tensor(seed + 1, shape.elements()),
            normal_tensor(seed + 2, shape.elements()),
        );
        let problem = Problem::new(shape).causal(causal);
        let cfg = FmaConfig::new(m, p);
        let fma = Attention::fma(ctx, cfg.clone()).unwrap();
        let Plan::Fma(plan) = fma.plan(&problem).unwrap() else {
            panic!("not an FMA plan");
        };
        assert!(plan.attention.spec.wg <= 256);
        let bufs = Poisoned::new(ctx, &q, &k, &v, shape);
        fma.forward(&problem, Resident(bufs.tensors())).unwrap();
        let (o, lse) = bufs.read(ctx);
        let method = Method::Fma(cfg);
        let r = cpu::forward(&method, &problem, &widen(&q), &widen(&k), &widen(&v)).unwrap();
        let co = closeness(&o, &r.o, 5e-5, 5e-5);
        let cl = closeness(&lse, &r.lse, 5e-5, 1e-5);
        assert_eq!(
            co.violations + cl.violations,
            0,
            "seed {seed} n={n} d={d} m={m}: {co:?} {cl:?}"
        );
    }
}

#[test]
fn a_lost_device_is_a_typed_error_on_every_later_call() {
    if gpu().is_none() {
        return;
    }
    // A device of its own (destroying the shared one would break the other tests).
    let ctx = gpu_with_binding_limit(128 << 20);
    let shape = Shape::new(1, 2, 300, 16);
    let problem = Problem::new(shape);
    let x = normal_tensor(fresh_seed(), shape.elements());
    let host = Host::new(&x, &x, &x);
    let fma = Attention::fma(&ctx, FmaConfig::new(16, 2)).unwrap();
    let dense = Attention::dense(&ctx).unwrap();
    let bufs = Poisoned::new(&ctx, &x, &x, &x, shape);
    fma.forward(&problem, host).unwrap();

    // What a driver reset or a removed adapter looks like to wgpu.
    ctx.device.destroy();
    let lost = |e: FmaError| assert!(matches!(e, FmaError::DeviceLost(_)), "{e}");
    lost(fma.forward(&problem, host).unwrap_err());
    lost(fma.forward(&problem, Resident(bufs.tensors())).unwrap_err());
    lost(dense.forward(&problem, host.without_lse()).unwrap_err());
    lost(Attention::fma(&ctx, FmaConfig::new(16, 2)).err().unwrap());
    lost(Attention::dense(&ctx).err().unwrap());
}
