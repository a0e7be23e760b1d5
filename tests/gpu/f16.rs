//! f16 storage (issue 29) on a device with SHADER_F16 (lavapipe has it): the forward of FMA
//! (fine and coarse queries, Average and Learned, causal) and of dense attention with Q, K, V
//! and O stored as f16 (its rows kernel, the tiled kernel forced with `Attention::dense_kernel`
//! and the cooperative-matrix kernel emulated), and their training and backward (dO, dQ, dK,
//! dV f16), against the f64 CPU reference on the f16-rounded inputs, through
//! resident f16 buffers poisoned with NaN and through host slices; and the typed errors.
//! Host tensors over one storage binding (the pieces) are `f16_pieces.rs`.
//!
//! Tolerance: the kernels convert each f16 element to f32 exactly and compute as the f32 path
//! does, so before its store O carries the f32 path's error (forward.rs: 5e-5 + 5e-5 |ref|);
//! the store rounds it to f16, a relative error of at most 2^-11 (f16's unit roundoff; values
//! below f16's smallest normal, 6.1e-5, lose at most 2^-25 absolute). So |gpu - ref| <=
//! 5e-5 + (5e-5 + 2^-11) |ref|. Coarse queries store the near field's partial O as f16 before
//! the merge reads it: once more 2^-11 of a partial, which is a convex combination of values,
//! so 2^-11 max|V| is added to the absolute term there. The LSE is f32 and computed from the
//! same exact inputs: the f32 tolerance. Stronger still, for fine queries and dense (one
//! rounding), O must equal the f32 path's O on the same rounded inputs, rounded to f16, bit for
//! bit: the f16 variant may differ from the f32 one in its loads and stores only.

use crate::common::{browser_like_gpu, gpu, random_learned};
use multipole_attn::cpu::{self, widen};
use multipole_attn::gpu::{Attention, GpuContext, GpuTensors, Host, Resident};
use multipole_attn::plan::DenseKernel;
use multipole_attn::random::{fresh_seed, normal_tensor};
use multipole_attn::storage::{from_f16_bits, round_to_f16, to_f16_bits, F16_UNIT_ROUNDOFF};
use multipole_attn::{Downsample, FmaConfig, FmaError, Method, Problem, Queries, Shape, Storage};
use multipole_attn::{Variants, Window};
use wgpu::util::DeviceExt;

pub(crate) const O_ATOL: f64 = 5e-5;
pub(crate) const O_RTOL: f64 = 5e-5 + F16_UNIT_ROUNDOFF as f64;
pub(crate) const LSE_ATOL: f64 = 5e-5;
pub(crate) const LSE_RTOL: f64 = 1e-5;

/// f16 Q, K, V and NaN-poisoned f16 O, f32 LSE.
pub(crate) struct Half {
    q: wgpu::Buffer,
    k: wgpu::Buffer,
    v: wgpu::Buffer,
    out: wgpu::Buffer,
    lse: wgpu::Buffer,
}

pub(crate) fn f16_buffer(
    ctx: &GpuContext,
    bits: &[u16],
    usage: wgpu::BufferUsages,
) -> wgpu::Buffer {
    let mut words = bits.to_vec();
    words.resize(bits.len().next_multiple_of(2).max(2), 0);
    ctx.device
        .create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: Some("f16 test tensor"),
            contents: bytemuck::cast_slice(&words),
            usage: wgpu::BufferUsages::STORAGE | usage,
        })
}

impl Half {
    pub(crate) fn new(ctx: &GpuContext, q: &[f32], k: &[f32], v: &[f32], shape: Shape) -> Self {
        Self::with_usage(ctx, [q, k, v], shape, wgpu::BufferUsages::COPY_SRC)
    }

    /// Every buffer with `out` usage besides STORAGE (a head over a binding is copied in
    /// pieces: COPY_SRC | COPY_DST).
    pub(crate) fn with_usage(
        ctx: &GpuContext,
        [q, k, v]: [&[f32]; 3],
        shape: Shape,
        out: wgpu::BufferUsages,
    ) -> Self {
        let bits = |x: &[f32]| to_f16_bits("test", x).unwrap();
        let nan = vec![f32::NAN; shape.rows()];
        Self {
            q: f16_buffer(ctx, &bits(q), out),
            k: f16_buffer(ctx, &bits(k), out),
            v: f16_buffer(ctx, &bits(v), out),
            out: f16_buffer(ctx, &vec![0x7e00; shape.elements()], out),
            lse: ctx
                .device
                .create_buffer_init(&wgpu::util::BufferInitDescriptor {
                    label: Some("lse"),
                    contents: bytemuck::cast_slice(&nan),
                    usage: wgpu::BufferUsages::STORAGE | out,
                }),
        }
    }

    pub(crate) fn tensors(&self) -> GpuTensors<'_> {
        GpuTensors {
            q: &self.q,
            k: &self.k,
            v: &self.v,
            out: &self.out,
            lse: Some(&self.lse),
        }
    }

    /// O widened to f32 and the LSE.
    pub(crate) fn read(&self, ctx: &GpuContext, shape: Shape) -> (Vec<f32>, Vec<f32>) {
        let words = crate::common::read_buffer(ctx, &self.out);
        let bits: &[u16] = bytemuck::cast_slice(&words);
        let lse = crate::common::read_buffer(ctx, &self.lse);
        (
            from_f16_bits(&bits[..shape.elements()]),
            lse[..shape.rows()].to_vec(),
        )
    }
}

/// Inputs N(0, 1) rounded to f16 (exactly what the f16 buffers hold).
pub(crate) fn inputs(seed: u64, shape: Shape) -> [Vec<f32>; 3] {
    [
        round_to_f16(&normal_tensor(seed, shape.elements())),
        round_to_f16(&normal_tensor(seed + 1, shape.kv_elements())),
        round_to_f16(&normal_tensor(seed + 2, shape.kv_elements())),
    ]
}

/// Runs `method` on `p` with f16 storage (resident, poisoned; and host) and checks it against
/// the f64 reference and, where one rounding is all, against the f32 path bit for bit.
/// Returns the largest absolute error of O.
fn check(ctx: &GpuContext, seed: u64, method: &Method, p: &Problem, label: &str) -> f64 {
    check_on(ctx, seed, (method, Ok), p, label)
}

/// A change to an Attention before its storage is set (a forced dense kernel).
type Tweak = fn(Attention) -> Result<Attention, FmaError>;

/// [`check`] with `tweak` applied to both Attentions (the f16 one and the f32 one it is
/// compared with bit for bit): a forced dense kernel.
fn check_on(
    ctx: &GpuContext,
    seed: u64,
    (method, tweak): (&Method, Tweak),
    p: &Problem,
    label: &str,
) -> f64 {
    let shape = p.shape;
    let [q, k, v] = inputs(seed, shape);
    let half = Attention::new(ctx, method.clone())
        .and_then(tweak)
        .and_then(|a| a.storage(Storage::F16))
        .unwrap_or_else(|e| panic!("{label}: {e}"));
    let bufs = Half::new(ctx, &q, &k, &v, shape);
    half.forward(p, Resident(bufs.tensors()))
        .unwrap_or_else(|e| panic!("{label}: {e}"));
    let (o, lse) = bufs.read(ctx, shape);

    let r = cpu::forward(method, p, &widen(&q), &widen(&k), &widen(&v)).unwrap();
    let coarse = matches!(method, Method::Fma(c) if c.queries == Queries::Coarse);
    let vmax = v.iter().fold(0.0f32, |a, x| a.max(x.abs())) as f64;
    let atol = O_ATOL
        + if coarse {
            F16_UNIT_ROUNDOFF as f64 * vmax
        } else {
            0.0
        };
    let co = multipole_attn::closeness::closeness(&o, &r.o, atol, O_RTOL);
    let cl = multipole_attn::closeness::closeness(&lse, &r.lse, LSE_ATOL, LSE_RTOL);
    assert_eq!(co.violations, 0, "{label}: O {co:?}");
    assert_eq!(cl.violations, 0, "{label}: LSE {cl:?}");
    // Every element is an f16 value (the store rounded it; NaN poison would fail above).
    assert_eq!(o, round_to_f16(&o), "{label}");

    // Host slices: the same values.
    let host = half.forward(p, Host::new(&q, &k, &v)).unwrap();
    assert_eq!(host.o, o, "{label}: host vs resident");
    assert_eq!(host.lse.as_deref(), Some(&lse[..]), "{label}: host LSE");

    if !coarse {
        let f32_path = Attention::new(ctx, method.clone()).and_then(tweak).unwrap();
        let want = f32_path.forward(p, Host::new(&q, &k, &v)).unwrap();
        let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        assert_eq!(
            bits(&o),
            bits(&round_to_f16(&want.o)),
            "{label}: vs f32 path"
        );
        assert_eq!(
            bits(&lse),
            bits(want.lse.as_deref().unwrap()),
            "{label}: LSE"
        );
    }
    co.max_abs
}

#[test]
fn f16_storage_matches_the_reference() {
    let Some(ctx) = gpu() else { return };
    if !ctx.device.features().contains(wgpu::Features::SHADER_F16) {
        eprintln!("skipping: no SHADER_F16 on this adapter");
        return;
    }
    let seed = fresh_seed();
    eprintln!("seed {seed}");
    let mut worst = 0.0f64;
    // Awkward sizes: odd element counts (d = 3: f16 pairs straddle rows), a sequence shorter
    // than a block, n not a multiple of m, grouped K/V heads.
    for &(n, d, m, p) in &[
        (1, 3, 4, 1),
        (97, 40, 16, 2),
        (300, 64, 32, 2),
        (1025, 17, 64, 4),
    ] {
        let shape = Shape::new(1, 2, n, d);
        for causal in [false, true] {
            let prob = Problem::new(shape).causal(causal);
            let cfgs = [
                FmaConfig::new(m, p),
                FmaConfig::new(m, p)
                    .downsample(Downsample::Learned(random_learned(seed, d, m, p, n))),
            ];
            for cfg in cfgs {
                let label = format!("seed {seed} {shape} m={m} p={p} causal={causal}");
                worst = worst.max(check(ctx, seed, &Method::Fma(cfg), &prob, &label));
            }
            let label = format!("seed {seed} {shape} dense causal={causal}");
            worst = worst.max(check(ctx, seed, &Method::Dense, &prob, &label));
        }
        let label = format!("seed {seed} {shape} m={m} p={p} coarse queries");
        let cfg = FmaConfig::new(m, p).queries(Queries::Coarse);
        worst = worst.max(check(
            ctx,
            seed,
            &Method::Fma(cfg),
            &Problem::new(shape),
            &label,
        ));
    }
    // Grouped K/V heads.
    let shape = Shape::new(2, 4, 200, 32).with_kv_heads(2);
    let prob = Problem::new(shape).causal(true);
    worst = worst.max(check(
        ctx,
        seed,
        &Method::Fma(FmaConfig::new(16, 2)),
        &prob,
        "gqa",
    ));
    worst = worst.max(check(ctx, seed, &Method::Dense, &prob, "gqa dense"));
    eprintln!("f16 storage: worst |O - ref| {worst:.2e}");
}

#[test]
fn f16_storage_errors_are_typed() {
    let Some(ctx) = gpu() else { return };
    // A device without SHADER_F16 (the browser-like one never requests it).
    if let Some(web) = browser_like_gpu() {
        let err = Attention::dense(web)
            .unwrap()
            .storage(Storage::F16)
            .unwrap_err();
        assert!(
            matches!(
                err,
                FmaError::MissingFeature {
                    feature: "SHADER_F16",
                    ..
                }
            ),
            "{err}"
        );
        assert!(err.to_string().contains("f32"), "{err}");
    }
    if !ctx.device.features().contains(wgpu::Features::SHADER_F16) {
        return;
    }
    let shape = Shape::new(1, 1, 64, 8);
    let p = Problem::new(shape);
    let a = Attention::fma(ctx, FmaConfig::new(16, 2))
        .unwrap()
        .storage(Storage::F16)
        .unwrap();
    let x = vec![0.5f32; shape.elements()];
    // A value beyond f16's range names the tensor and the index.
    let mut big = x.clone();
    big[5] = 1.0e5;
    let err = a.forward(&p, Host::new(&x, &big, &x)).unwrap_err();
    assert!(err.to_string().contains("K[5]"), "{err}");
    // f32-sized buffers are accepted, f16-sized ones too; shorter ones are refused.
    let short = Half::new(ctx, &x[..8], &x, &x, Shape::new(1, 1, 1, 8));
    let whole = Half::new(ctx, &x, &x, &x, shape);
    let t = GpuTensors {
        q: &short.q,
        ..whole.tensors()
    };
    assert!(matches!(
        a.forward(&p, Resident(t)).unwrap_err(),
        FmaError::ShapeMismatch { .. }
    ));
    // dO beyond f16's range, in a host backward.
    let (_, saved) = a.train(&p, Host::new(&x, &x, &x)).unwrap();
    let err = a
        .backward(&saved, multipole_attn::gpu::HostGrad(&big))
        .unwrap_err();
    assert!(err.to_string().contains("dO[5]"), "{err}");
    // One f16 head over a binding with an odd head_dim: its chunks' rows would start
    // mid-word. Refused by check and by every forward, FMA and dense, host and resident.
    let odd = Shape::new(1, 1, 200, 7);
    let po = Problem::new(odd);
    let xo = vec![0.25f32; odd.elements()];
    for method in [Method::Fma(FmaConfig::new(16, 2)), Method::Dense] {
        let small = Attention::new(ctx, method)
            .and_then(|a| a.max_binding(1024))
            .and_then(|a| a.storage(Storage::F16))
            .unwrap();
        let err = small.check(&po).unwrap_err();
        assert!(err.to_string().contains("even head_dim"), "{err}");
        let err = small.forward(&po, Host::new(&xo, &xo, &xo)).unwrap_err();
        assert!(err.to_string().contains("even head_dim"), "{err}");
        let copy = wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST;
        let bufs = Half::with_usage(ctx, [&xo, &xo, &xo], odd, copy);
        let err = small.forward(&po, Resident(bufs.tensors())).unwrap_err();
        assert!(err.to_string().contains("even head_dim"), "{err}");
        // The poisoned O is untouched.
        assert!(bufs.read(ctx, odd).0.iter().all(|v| v.is_nan()));
    }
}

/// Gradient tolerance, relative to each tensor's scale max(1, max|ref|) (tests/common's
/// `compare` metric): the f32 path's 2e-4 plus 8 f16 roundings (8 * 2^-11 = 3.9e-3). Why 8:
/// dQ, dK, dV are rounded once when stored and once more where a later pass adds to them
/// (FMA's coarse keys' share in dK, dV; coarse queries' share in dQ; a dense key chunk), and
/// the saved O is f16, so D = rowsum(dO * O) carries 2^-11 of |dO||O|, which dS = P (dP - D)
/// passes on to every gradient, at the scale of the gradients themselves for N(0, 1) inputs.
pub(crate) const GRAD_TOL: f64 = 2e-4 + 8.0 * F16_UNIT_ROUNDOFF as f64;

pub(crate) fn compare_grad(label: &str, name: &str, got: &[f32], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len(), "{label}: {name}");
    let scale = want.iter().fold(1.0f64, |m, x| m.max(x.abs()));
    let c = multipole_attn::closeness::closeness(got, want, GRAD_TOL * scale, GRAD_TOL);
    assert_eq!(c.violations, 0, "{label}: {name} {c:?} (scale {scale:.3e})");
    // Gradients are stored as f16: every element is an f16 value.
    assert_eq!(got, &round_to_f16(got)[..], "{label}: {name} not f16");
    c.max_abs / scale
}

/// Training and the backward with f16 storage (host dO; and resident f16 gradient buffers
/// poisoned with NaN) against the f64 reference gradients on the f16-rounded inputs.
fn check_backward(ctx: &GpuContext, seed: u64, method: &Method, p: &Problem, label: &str) -> f64 {
    let shape = p.shape;
    let [q, k, v] = inputs(seed, shape);
    let dout = round_to_f16(&normal_tensor(seed + 3, shape.elements()));
    let a = Attention::new(ctx, method.clone())
        .and_then(|a| a.storage(Storage::F16))
        .unwrap_or_else(|e| panic!("{label}: {e}"));
    let (out, saved) = a
        .train(p, Host::new(&q, &k, &v))
        .unwrap_or_else(|e| panic!("{label}: {e}"));
    let fwd = a.forward(p, Host::new(&q, &k, &v)).unwrap();
    assert_eq!(out.o, fwd.o, "{label}: training forward vs forward");
    let g = a
        .backward(&saved, multipole_attn::gpu::HostGrad(&dout))
        .unwrap_or_else(|e| panic!("{label}: {e}"));
    let r = cpu::backward(
        method,
        p,
        (&widen(&q), &widen(&k), &widen(&v)),
        &widen(&dout),
    )
    .unwrap();
    let mut worst = 0.0f64;
    for (name, got, want) in [
        ("dQ", &g.dq, &r.dq),
        ("dK", &g.dk, &r.dk),
        ("dV", &g.dv, &r.dv),
    ] {
        worst = worst.max(compare_grad(label, name, got, want));
    }
    // Resident: f16 dO and NaN-poisoned f16 gradient buffers give the same bits.
    let bits = |x: &[f32]| to_f16_bits("test", x).unwrap();
    let usage = wgpu::BufferUsages::COPY_SRC;
    let dout_buf = f16_buffer(ctx, &bits(&dout), usage);
    let nan = |len| f16_buffer(ctx, &vec![0x7e00; len], usage);
    let (dq, dk, dv) = (
        nan(shape.elements()),
        nan(shape.kv_elements()),
        nan(shape.kv_elements()),
    );
    let grads = multipole_attn::gpu::GradTensors {
        dq: &dq,
        dk: &dk,
        dv: &dv,
        weights: None,
    };
    a.backward(
        &saved,
        multipole_attn::gpu::ResidentGrad {
            dout: &dout_buf,
            grads,
        },
    )
    .unwrap_or_else(|e| panic!("{label}: {e}"));
    for (name, buf, len, host) in [
        ("dQ", &dq, shape.elements(), &g.dq),
        ("dK", &dk, shape.kv_elements(), &g.dk),
        ("dV", &dv, shape.kv_elements(), &g.dv),
    ] {
        let words = crate::common::read_buffer(ctx, buf);
        let got = from_f16_bits(&bytemuck::cast_slice::<f32, u16>(&words)[..len]);
        assert_eq!(&got, host, "{label}: resident {name}");
    }
    worst
}

#[test]
fn f16_storage_backward_matches_the_reference() {
    let Some(ctx) = gpu() else { return };
    if !ctx.device.features().contains(wgpu::Features::SHADER_F16) {
        eprintln!("skipping: no SHADER_F16 on this adapter");
        return;
    }
    let seed = fresh_seed();
    eprintln!("seed {seed}");
    let mut worst = 0.0f64;
    for &(n, d, m, p) in &[(1, 3, 4, 1), (97, 40, 16, 2), (300, 17, 32, 4)] {
        let shape = Shape::new(1, 2, n, d);
        for causal in [false, true] {
            let prob = Problem::new(shape).causal(causal);
            let label = format!("seed {seed} {shape} m={m} p={p} causal={causal}");
            let fma = Method::Fma(FmaConfig::new(m, p));
            worst = worst.max(check_backward(ctx, seed, &fma, &prob, &label));
            let label = format!("seed {seed} {shape} dense causal={causal}");
            worst = worst.max(check_backward(ctx, seed, &Method::Dense, &prob, &label));
        }
        let cfg = FmaConfig::new(m, p).queries(Queries::Coarse);
        let label = format!("seed {seed} {shape} m={m} p={p} coarse queries");
        worst = worst.max(check_backward(
            ctx,
            seed,
            &Method::Fma(cfg),
            &Problem::new(shape),
            &label,
        ));
    }
    let shape = Shape::new(2, 4, 120, 16).with_kv_heads(2);
    let prob = Problem::new(shape).causal(true);
    let fma = Method::Fma(FmaConfig::new(16, 2));
    worst = worst.max(check_backward(ctx, seed, &fma, &prob, "gqa"));
    worst = worst.max(check_backward(
        ctx,
        seed,
        &Method::Dense,
        &prob,
        "gqa dense",
    ));
    eprintln!("f16 storage backward: worst scaled gradient error {worst:.2e}");
}

/// A device of the default adapter without subgroups (the plain kernels, as on GL or in a
/// browser) but with SHADER_F16; `None` where the adapter has no SHADER_F16.
fn plain_f16_gpu() -> Option<GpuContext> {
    use multipole_attn::gpu::{negotiate_features, negotiate_limits, ContextOptions};
    let instance =
        wgpu::Instance::new(wgpu::InstanceDescriptor::new_without_display_handle_from_env());
    let adapter = pollster::block_on(instance.request_adapter(&Default::default())).ok()?;
    let options = ContextOptions::default();
    let features = negotiate_features(adapter.features(), options) - wgpu::Features::SUBGROUP;
    if !features.contains(wgpu::Features::SHADER_F16) {
        return None;
    }
    let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
        label: Some("plain f16"),
        required_features: features,
        required_limits: negotiate_limits(&adapter.limits(), options),
        ..Default::default()
    }))
    .ok()?;
    Some(GpuContext::from_device(adapter.get_info(), device, queue))
}

/// The plain kernels' f16 variant (no subgroups), including a head above d = 128, whose row
/// loops the composer writes out before the f16 rewrite.
#[test]
fn f16_storage_on_the_plain_kernels() {
    if gpu().is_none() {
        return;
    }
    let Some(ctx) = plain_f16_gpu() else {
        eprintln!("skipping: no SHADER_F16 on this adapter");
        return;
    };
    assert_eq!(ctx.subgroup_kernels(), None);
    let seed = fresh_seed();
    eprintln!("seed {seed}");
    let shape = Shape::new(1, 2, 97, 40);
    let prob = Problem::new(shape).causal(true);
    let label = format!("plain seed {seed} {shape}");
    let fma = Method::Fma(FmaConfig::new(16, 2));
    check(&ctx, seed, &fma, &prob, &label);
    check(&ctx, seed, &Method::Dense, &prob, &label);
    check_backward(&ctx, seed, &fma, &prob, &label);
    check_backward(&ctx, seed, &Method::Dense, &prob, &label);
    // d = 132: the FMA forward only (its unrolled pipelines are slow to build on llvmpipe).
    let shape = Shape::new(1, 1, 70, 132);
    let label = format!("plain seed {seed} {shape}");
    check(&ctx, seed, &fma, &Problem::new(shape).causal(true), &label);
}

/// On a context with cooperative matrices (emulated on lavapipe), f16 storage runs dense
/// attention on the cooperative kernel too, its Q, K, V, O bindings f16: the kernel rounds Q,
/// K, V to f16 for the matrices under either storage, so on f16-rounded inputs the f16 variant
/// computes exactly what the f32 one does and stores O rounded once more: the f32 kernel's O
/// rounded to f16, bit for bit, written over a NaN-poisoned O (resident) and equal through
/// host slices.
#[test]
fn f16_storage_on_the_cooperative_kernel() {
    let Some(base) = gpu() else { return };
    if !base.device.features().contains(wgpu::Features::SHADER_F16) {
        return;
    }
    let ctx = GpuContext::new().unwrap().emulating_cooperative_matrix(8);
    let seed = fresh_seed();
    // Sizes of one key chunk of the emulation (`emulated_keys_per_dispatch`: hundreds of keys):
    // over several, each chunk resumes from the O the one before stored, which f16 storage
    // rounds (as the plain kernel's chunks), so O is no longer the f32 one rounded once; those
    // are checked against the reference (`coop::the_emulated_kernel_is_right_at_awkward_sizes`).
    for &(n, d, causal) in &[(1, 5, false), (40, 16, true), (24, 32, false)] {
        let shape = Shape::new(1, 2, n, d);
        let p = Problem::new(shape).causal(causal);
        let label = format!("seed {seed} {shape} causal={causal}");
        let [q, k, v] = inputs(seed, shape);
        let half = Attention::dense(&ctx)
            .unwrap()
            .storage(Storage::F16)
            .unwrap();
        let bufs = Half::new(&ctx, &q, &k, &v, shape);
        half.forward(&p, Resident(bufs.tensors())).unwrap();
        let (o, lse) = bufs.read(&ctx, shape);
        let host = half.forward(&p, Host::new(&q, &k, &v)).unwrap();
        assert_eq!(host.o, o, "{label}: host vs resident");
        let f32_coop = Attention::dense(&ctx).unwrap();
        let want = f32_coop.forward(&p, Host::new(&q, &k, &v)).unwrap();
        let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&o), bits(&round_to_f16(&want.o)), "{label}: O");
        assert_eq!(
            bits(&lse),
            bits(want.lse.as_deref().unwrap()),
            "{label}: LSE"
        );
        // And it is the cooperative kernel (f16 matrices), not the plain one: its O differs
        // from the plain kernel's beyond the final rounding somewhere.
        let plain = Attention::dense(base).unwrap();
        let exact = plain.forward(&p, Host::new(&q, &k, &v)).unwrap();
        if n > 1 {
            assert_ne!(round_to_f16(&exact.o), o, "{label}: the plain kernel ran");
        }
    }
}

/// The tiled dense kernel (`shaders/dense_tiled.wgsl`, what a GPU runs; forced here on
/// lavapipe) with f16 storage: its staging loads convert f16 to f32 and its store rounds O
/// once, so O is the f32 tiled kernel's O rounded to f16, bit for bit, and within the f16
/// tolerance of the f64 reference (module header). Awkward lengths (1, 97, 1025), both masks,
/// cross lengths, grouped K/V heads, head dimensions 8 to 128 (odd ones: f16 pairs straddle
/// rows), and the softcap, sinks and window variants.
#[test]
fn f16_storage_on_the_tiled_kernel() {
    let Some(ctx) = gpu() else { return };
    if !ctx.device.features().contains(wgpu::Features::SHADER_F16) {
        eprintln!("skipping: no SHADER_F16 on this adapter");
        return;
    }
    let seed = fresh_seed();
    eprintln!("seed {seed}");
    let tiled: Tweak = |a| a.dense_kernel(DenseKernel::Tiled);
    let mut worst = 0.0f64;
    for &(n, d, kv_heads) in &[
        (1, 8, 2),
        (97, 40, 1),
        (97, 128, 2),
        (1025, 8, 2),
        (300, 33, 1),
    ] {
        let shape = Shape::new(1, 2, n, d).with_kv_heads(kv_heads);
        for causal in [false, true] {
            let p = Problem::new(shape).causal(causal);
            let label = format!("tiled seed {seed} {shape} causal={causal}");
            worst = worst.max(check_on(ctx, seed, (&Method::Dense, tiled), &p, &label));
        }
    }
    // Cross lengths (causal bottom-right) and the variants.
    let cross = Shape::cross(1, 2, 50, 130, 16);
    let label = format!("tiled seed {seed} {cross}");
    let p = Problem::new(cross).causal(true);
    worst = worst.max(check_on(ctx, seed, (&Method::Dense, tiled), &p, &label));
    let shape = Shape::new(2, 2, 97, 24);
    for variants in [
        Variants {
            softcap: Some(5.0),
            ..Default::default()
        },
        Variants {
            sinks: Some(vec![0.5, -1.0]),
            ..Default::default()
        },
        Variants {
            window: Some(Window { left: 20, right: 7 }),
            ..Default::default()
        },
    ] {
        let label = format!("tiled seed {seed} {shape} {variants:?}");
        let p = Problem::new(shape).variants(variants);
        worst = worst.max(check_on(ctx, seed, (&Method::Dense, tiled), &p, &label));
    }
    eprintln!("f16 tiled kernel: worst |O - ref| {worst:.2e}");
}

/// Dense attention in several key chunks per dispatch range (`Attention::keys_per_dispatch`,
/// what a GPU does past `DENSE_KEY_TILES_PER_DISPATCH` key tiles, and lavapipe past its loop
/// limit), rows and tiled kernels: the partial O between chunks stays f32 under f16 storage
/// (the f16 variant's f32 partial binding), so O is rounded once, by the last chunk: the f32
/// path in the same chunks, rounded to f16, bit for bit (resumed from an f16 O, each chunk
/// rounded once more and this failed). Both masks, cross lengths (causal rows that finish
/// before the last chunk), grouped K/V heads, the softcap, sinks and a window across the chunk
/// boundaries, and variable-length batches (packed and padded, whose chunks cover the longest
/// sequence), resident (NaN-poisoned O) and host.
#[test]
fn f16_key_chunks_round_o_once() {
    let Some(ctx) = gpu() else { return };
    if !ctx.device.features().contains(wgpu::Features::SHADER_F16) {
        eprintln!("skipping: no SHADER_F16 on this adapter");
        return;
    }
    let seed = fresh_seed();
    eprintln!("seed {seed}");
    // At most 64 keys per dispatch: 300 keys run in 5 chunks (BK <= 64 on either kernel).
    let rows: Tweak = |a| a.keys_per_dispatch(64);
    let tiled: Tweak = |a| {
        a.dense_kernel(DenseKernel::Tiled)
            .and_then(|a| a.keys_per_dispatch(64))
    };
    let mut worst = 0.0f64;
    for (name, tweak) in [("rows", rows), ("tiled", tiled)] {
        let chunks = tweak(Attention::new(ctx, Method::Dense).unwrap())
            .unwrap()
            .storage(Storage::F16)
            .unwrap();
        let plan = chunks
            .plan(&Problem::new(Shape::new(1, 2, 300, 16)))
            .unwrap();
        let multipole_attn::gpu::Plan::Dense(plan) = plan else {
            panic!("{name}: not a dense plan")
        };
        let n_chunks = plan.key_chunks(64).len();
        assert!(n_chunks >= 5, "{name}: {n_chunks} key chunks");
        let mut problems = Vec::new();
        for causal in [false, true] {
            problems.push(Problem::new(Shape::new(1, 2, 300, 16)).causal(causal));
            problems.push(Problem::new(Shape::new(1, 4, 257, 33).with_kv_heads(2)).causal(causal));
        }
        problems.push(Problem::new(Shape::cross(1, 2, 50, 300, 16)).causal(true));
        let shape = Shape::new(1, 2, 300, 24);
        for variants in [
            Variants {
                softcap: Some(5.0),
                ..Default::default()
            },
            Variants {
                sinks: Some(vec![0.5, -1.0]),
                ..Default::default()
            },
            Variants {
                window: Some(Window {
                    left: 100,
                    right: 30,
                }),
                ..Default::default()
            },
        ] {
            problems.push(Problem::new(shape).variants(variants));
        }
        for p in &problems {
            let label = format!("{name} seed {seed} {} chunks of 64 keys", p.shape);
            worst = worst.max(check_on(ctx, seed, (&Method::Dense, tweak), p, &label));
        }
        // Variable-length batches: one dispatch per chunk of the longest sequence's keys.
        for seqs in [
            multipole_attn::Sequences::packed(vec![1, 297, 40, 0, 130]).unwrap(),
            multipole_attn::Sequences::padded(300, vec![97, 1, 300]).unwrap(),
        ] {
            for causal in [false, true] {
                let p = Problem::varlen(seqs.clone(), 2, 1, 16).causal(causal);
                let label = format!("{name} seed {seed} varlen {seqs:?} causal={causal}");
                let [q, k, v] = inputs(seed, p.shape);
                let half = tweak(Attention::new(ctx, Method::Dense).unwrap())
                    .and_then(|a| a.storage(Storage::F16))
                    .unwrap();
                let got = half.forward(&p, Host::new(&q, &k, &v)).unwrap();
                let f32_path = tweak(Attention::new(ctx, Method::Dense).unwrap()).unwrap();
                let want = f32_path.forward(&p, Host::new(&q, &k, &v)).unwrap();
                let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
                assert_eq!(
                    bits(&got.o),
                    bits(&round_to_f16(&want.o)),
                    "{label}: vs f32"
                );
                assert_eq!(
                    bits(got.lse.as_deref().unwrap()),
                    bits(want.lse.as_deref().unwrap()),
                    "{label}: LSE"
                );
                let bufs = Half::new(ctx, &q, &k, &v, p.shape);
                half.forward(&p, Resident(bufs.tensors())).unwrap();
                let (o, lse) = bufs.read(ctx, p.shape);
                assert_eq!(bits(&o), bits(&got.o), "{label}: resident O");
                assert_eq!(
                    bits(&lse),
                    bits(got.lse.as_deref().unwrap()),
                    "{label}: resident LSE"
                );
            }
        }
    }
    eprintln!("f16 key chunks: worst |O - ref| {worst:.2e}");
}

/// The f16 dense backward of `p` (training from host slices, `tweak` applied) against the f32
/// backward in the same parts (`tweak` too) on the same f16-rounded inputs and dO, its saved O
/// replaced by O rounded to f16 (what the f16 forward stores and the f16 backward's D reads):
/// dQ, dK, dV equal the f32 gradients rounded to f16 once, bit for bit, host and resident
/// (NaN-poisoned f16 gradient buffers), and within [`GRAD_TOL`] of the f64 reference. Returns
/// the largest scaled gradient error.
fn check_backward_parts(
    ctx: &GpuContext,
    seed: u64,
    tweak: Tweak,
    p: &Problem,
    label: &str,
) -> f64 {
    let shape = p.shape;
    let [q, k, v] = inputs(seed, shape);
    let dout = round_to_f16(&normal_tensor(seed + 3, shape.elements()));
    let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
    let half = tweak(Attention::new(ctx, Method::Dense).unwrap())
        .and_then(|a| a.storage(Storage::F16))
        .unwrap_or_else(|e| panic!("{label}: {e}"));
    let (out, saved) = half
        .train(p, Host::new(&q, &k, &v))
        .unwrap_or_else(|e| panic!("{label}: {e}"));
    let g = half
        .backward(&saved, multipole_attn::gpu::HostGrad(&dout))
        .unwrap_or_else(|e| panic!("{label}: {e}"));

    // The f32 path: resident training, then its O buffer holds O rounded to f16.
    let f32_path = tweak(Attention::new(ctx, Method::Dense).unwrap()).unwrap();
    let usage = wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST;
    let init = |data: &[f32]| {
        ctx.device
            .create_buffer_init(&wgpu::util::BufferInitDescriptor {
                label: Some("f32 test tensor"),
                contents: bytemuck::cast_slice(data),
                usage: wgpu::BufferUsages::STORAGE | usage,
            })
    };
    let (qb, kb, vb) = (init(&q), init(&k), init(&v));
    let ob = init(&vec![f32::NAN; shape.elements()]);
    let lb = init(&vec![f32::NAN; shape.rows()]);
    let t = GpuTensors {
        q: &qb,
        k: &kb,
        v: &vb,
        out: &ob,
        lse: Some(&lb),
    };
    let (_, saved32) = f32_path
        .train(p, Resident(t))
        .unwrap_or_else(|e| panic!("{label}: {e}"));
    let o32 = crate::common::read_buffer(ctx, &ob);
    let lse32 = crate::common::read_buffer(ctx, &lb);
    let o16 = round_to_f16(&o32[..shape.elements()]);
    // What the f16 backward reads: the f32 forward's O rounded once and its LSE (change 37).
    assert_eq!(bits(&out.o), bits(&o16), "{label}: O vs f32");
    assert_eq!(
        bits(out.lse.as_deref().unwrap()),
        bits(&lse32[..shape.rows()]),
        "{label}: LSE vs f32"
    );
    ctx.queue.write_buffer(&ob, 0, bytemuck::cast_slice(&o16));
    let want = f32_path
        .backward(&saved32, multipole_attn::gpu::HostGrad(&dout))
        .unwrap_or_else(|e| panic!("{label}: {e}"));
    for (name, got, want) in [
        ("dQ", &g.dq, &want.dq),
        ("dK", &g.dk, &want.dk),
        ("dV", &g.dv, &want.dv),
    ] {
        assert_eq!(
            bits(got),
            bits(&round_to_f16(want)),
            "{label}: {name} vs f32"
        );
    }

    let r = cpu::backward(
        &Method::Dense,
        p,
        (&widen(&q), &widen(&k), &widen(&v)),
        &widen(&dout),
    )
    .unwrap();
    let mut worst = 0.0f64;
    for (name, got, want) in [
        ("dQ", &g.dq, &r.dq),
        ("dK", &g.dk, &r.dk),
        ("dV", &g.dv, &r.dv),
    ] {
        worst = worst.max(compare_grad(label, name, got, want));
    }

    // Resident: f16 dO and NaN-poisoned f16 gradient buffers give the same bits.
    let f16_bits = |x: &[f32]| to_f16_bits("test", x).unwrap();
    let dout_buf = f16_buffer(ctx, &f16_bits(&dout), wgpu::BufferUsages::COPY_SRC);
    let nan = |len| f16_buffer(ctx, &vec![0x7e00; len], wgpu::BufferUsages::COPY_SRC);
    let (dq, dk, dv) = (
        nan(shape.elements()),
        nan(shape.kv_elements()),
        nan(shape.kv_elements()),
    );
    let grads = multipole_attn::gpu::GradTensors {
        dq: &dq,
        dk: &dk,
        dv: &dv,
        weights: None,
    };
    half.backward(
        &saved,
        multipole_attn::gpu::ResidentGrad {
            dout: &dout_buf,
            grads,
        },
    )
    .unwrap_or_else(|e| panic!("{label}: {e}"));
    for (name, buf, len, host) in [
        ("dQ", &dq, shape.elements(), &g.dq),
        ("dK", &dk, shape.kv_elements(), &g.dk),
        ("dV", &dv, shape.kv_elements(), &g.dv),
    ] {
        let words = crate::common::read_buffer(ctx, buf);
        let got = from_f16_bits(&bytemuck::cast_slice::<f32, u16>(&words)[..len]);
        assert_eq!(bits(&got), bits(host), "{label}: resident {name}");
    }
    worst
}

/// The dense backward in several parts (`Attention::keys_per_dispatch`: dQ over key parts,
/// dK and dV over query parts, what a GPU does past the backward's tiles per dispatch and
/// lavapipe past its loop limit), rows and tiled forward kernels: under f16 storage the
/// partial gradients between parts stay f32 (the f16 variants' f32 partial bindings), so dQ,
/// dK, dV are rounded once, by their last part: the f32 backward in the same parts, rounded
/// to f16, bit for bit (added through the f16 gradient bindings, each part rounded once more
/// and this failed). Both masks, cross lengths (causal query rows that see no key of the later
/// parts, keys that no query of the later parts sees), grouped K/V heads, the softcap, sinks
/// and a window across the part boundaries, and variable-length batches (packed and padded,
/// whose parts cover the longest sequence).
#[test]
fn f16_backward_parts_round_gradients_once() {
    let Some(ctx) = gpu() else { return };
    if !ctx.device.features().contains(wgpu::Features::SHADER_F16) {
        eprintln!("skipping: no SHADER_F16 on this adapter");
        return;
    }
    let seed = fresh_seed();
    eprintln!("seed {seed}");
    // At most 64 keys (dQ) and 64 queries over a K/V head's group (dK, dV) per dispatch.
    let rows: Tweak = |a| a.keys_per_dispatch(64);
    let tiled: Tweak = |a| {
        a.dense_kernel(DenseKernel::Tiled)
            .and_then(|a| a.keys_per_dispatch(64))
    };
    let parts = |p: &Problem| {
        let a = rows(Attention::new(ctx, Method::Dense).unwrap())
            .unwrap()
            .storage(Storage::F16)
            .unwrap();
        let multipole_attn::gpu::Plan::DenseBackward(plan) = a.backward_plan(p).unwrap() else {
            panic!("not a dense backward plan")
        };
        (plan.key_chunks(64).len(), plan.query_chunks(64).len())
    };
    let mut problems = Vec::new();
    for causal in [false, true] {
        problems.push(Problem::new(Shape::new(1, 2, 300, 16)).causal(causal));
        problems.push(Problem::new(Shape::new(1, 4, 257, 33).with_kv_heads(2)).causal(causal));
    }
    problems.push(Problem::new(Shape::cross(1, 2, 50, 300, 16)).causal(true));
    problems.push(Problem::new(Shape::cross(1, 2, 300, 50, 16)).causal(true));
    let shape = Shape::new(1, 2, 300, 24);
    for variants in [
        Variants {
            softcap: Some(5.0),
            ..Default::default()
        },
        Variants {
            sinks: Some(vec![0.5, -1.0]),
            ..Default::default()
        },
        Variants {
            window: Some(Window {
                left: 100,
                right: 30,
            }),
            ..Default::default()
        },
    ] {
        problems.push(Problem::new(shape).variants(variants));
    }
    for seqs in [
        multipole_attn::Sequences::packed(vec![1, 297, 40, 0, 130]).unwrap(),
        multipole_attn::Sequences::padded(300, vec![97, 1, 300]).unwrap(),
    ] {
        for causal in [false, true] {
            problems.push(Problem::varlen(seqs.clone(), 2, 1, 16).causal(causal));
        }
    }
    let (dq_parts, dkv_parts) = parts(&problems[0]);
    assert!(
        dq_parts >= 5 && dkv_parts >= 5,
        "{dq_parts}, {dkv_parts} parts"
    );
    let mut worst = 0.0f64;
    for (name, tweak) in [("rows", rows), ("tiled", tiled)] {
        for p in &problems {
            let label = format!(
                "{name} seed {seed} {} {:?} causal={} {:?} parts",
                p.shape,
                p.sequences,
                p.causal,
                parts(p)
            );
            worst = worst.max(check_backward_parts(ctx, seed, tweak, p, &label));
        }
    }
    eprintln!("f16 backward parts: worst scaled gradient error {worst:.2e}");
}

/// A device with SHADER_F16 but WebGPU's default 8 storage buffers per shader stage: the f16
/// dense dK/dV pass binds 10 (its f32 partial dK and dV), so the f16 dense backward is refused
/// with a typed error (not a validation panic at context creation or at pipeline creation),
/// while the f16 forward (8 at most) and the f32 backward run.
#[test]
fn f16_dense_backward_needs_ten_storage_buffers() {
    use multipole_attn::gpu::{negotiate_features, negotiate_limits, ContextOptions};
    if gpu().is_none() {
        return;
    }
    let instance =
        wgpu::Instance::new(wgpu::InstanceDescriptor::new_without_display_handle_from_env());
    let adapter = pollster::block_on(instance.request_adapter(&Default::default())).unwrap();
    let options = ContextOptions::default();
    let features = negotiate_features(adapter.features(), options);
    if !features.contains(wgpu::Features::SHADER_F16) {
        eprintln!("skipping: no SHADER_F16 on this adapter");
        return;
    }
    let mut limits = negotiate_limits(&adapter.limits(), options);
    limits.max_storage_buffers_per_shader_stage = 8;
    let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
        label: Some("f16, 8 storage buffers"),
        required_features: features,
        required_limits: limits,
        ..Default::default()
    }))
    .unwrap();
    let ctx = GpuContext::from_device(adapter.get_info(), device, queue);
    let seed = fresh_seed();
    eprintln!("seed {seed}");
    let p = Problem::new(Shape::new(1, 2, 40, 8));
    let [q, k, v] = inputs(seed, p.shape);
    let dout = round_to_f16(&normal_tensor(seed + 3, p.shape.elements()));
    let half = Attention::new(&ctx, Method::Dense)
        .and_then(|a| a.storage(Storage::F16))
        .unwrap();
    let (out, saved) = half.train(&p, Host::new(&q, &k, &v)).unwrap();
    assert!(out.o.iter().all(|x| x.is_finite()));
    match half.backward(&saved, multipole_attn::gpu::HostGrad(&dout)) {
        Err(FmaError::LimitExceeded {
            requested: 10,
            max: 8,
            unit,
            ..
        }) => assert_eq!(unit, "storage buffers per shader stage"),
        other => panic!("expected LimitExceeded, got {other:?}"),
    }
    let full = Attention::new(&ctx, Method::Dense).unwrap();
    let (_, saved) = full.train(&p, Host::new(&q, &k, &v)).unwrap();
    let g = full
        .backward(&saved, multipole_attn::gpu::HostGrad(&dout))
        .unwrap();
    assert!(g.dq.iter().chain(&g.dk).chain(&g.dv).all(|x| x.is_finite()));
}
