//! The backward tests' shared half: a backward of saved tensors into NaN-poisoned caller
//! buffers with the gradients read back (the weights' split per level, as the host API does),
//! and the comparison of one gradient with the f64 reference at the backward tolerance.

use multipole_attn::gpu::{
    Attention, GpuContext, GpuTensors, GradTensors, Host, HostGrad, Output, Plan, Resident,
    ResidentGrad, Saved, WeightGradTensors,
};
use multipole_attn::random::normal_tensor;
use multipole_attn::{Downsample, Gradients, Method, Problem, Shape};
use wgpu::util::DeviceExt;

use super::{closeness, read_buffer};

/// The backward tolerance, per tensor: |gpu - ref| <= TOL (max(1, max|ref|) + |ref|) (why:
/// tests/gpu/backward.rs's header).
pub const TOL: f64 = 2e-4;

/// A split run's gradients against the unsplit run's where the split regroups a sum (a K/V
/// head's over runs of heads, the learned weights' over runs or groups): |a - b| <= WTOL
/// max(1, max|b|) per tensor (why it holds: the header of each module that uses it).
pub const WTOL: f64 = 1e-5;

/// Largest |a - b| over the scale max(1, max|b|) (a NaN counts as infinite); asserts it is
/// within [`WTOL`].
pub fn regrouped(label: &str, name: &str, a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len(), "{label}: {name} length");
    let scale = b.iter().fold(1.0f64, |m, &x| m.max(f64::from(x).abs()));
    let worst = a
        .iter()
        .zip(b)
        .map(|(&x, &y)| (f64::from(x) - f64::from(y)).abs())
        .fold(
            0.0,
            |m: f64, d| if d.is_nan() { f64::INFINITY } else { m.max(d) },
        );
    assert!(
        worst <= WTOL * scale,
        "{label}: {name} split vs unsplit {worst:.3e} (scale {scale:.3e})"
    );
    worst / scale
}

/// The training forward and backward of host tensors on `att`: its output and gradients.
pub fn host_gradients(att: &Attention, p: &Problem, x: &Inputs) -> (Output, Gradients<f32>) {
    host_gradients_with(att, p, x, &x.dout)
}

/// [`host_gradients`] with dO = `dout` instead of the inputs' own.
pub fn host_gradients_with(
    att: &Attention,
    p: &Problem,
    x: &Inputs,
    dout: &[f32],
) -> (Output, Gradients<f32>) {
    let (out, saved) = att.train(p, Host::new(&x.q, &x.k, &x.v)).expect("train");
    let g = att.backward(&saved, HostGrad(dout)).expect("backward");
    (out, g)
}

/// Q, K, V and dO of a backward test, N(0, 1) from one seed.
pub struct Inputs {
    pub q: Vec<f32>,
    pub k: Vec<f32>,
    pub v: Vec<f32>,
    pub dout: Vec<f32>,
}

/// Q and dO of `shape`'s query heads, K and V of its K/V heads.
pub fn inputs(seed: u64, shape: Shape) -> Inputs {
    let (len, kv_len) = (shape.elements(), shape.kv_elements());
    Inputs {
        q: normal_tensor(seed, len),
        k: normal_tensor(seed ^ 0x9e37_79b9, kv_len),
        v: normal_tensor(seed ^ 0x7f4a_7c15, kv_len),
        dout: normal_tensor(seed ^ 0x2545_f491, len),
    }
}

/// A storage buffer holding `data`, readable back.
pub fn buffer(ctx: &GpuContext, label: &str, data: &[f32]) -> wgpu::Buffer {
    ctx.device
        .create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: Some(label),
            contents: bytemuck::cast_slice(data),
            usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC,
        })
}

/// A storage buffer of `len` NaNs (at least 4), so an unwritten element fails a comparison.
pub fn nan(ctx: &GpuContext, label: &str, len: usize) -> wgpu::Buffer {
    buffer(ctx, label, &vec![f32::NAN; len.max(4)])
}

/// The training forward of `p` on resident buffers (O and the LSE poisoned with NaN), then
/// [`backward_poisoned`]: the GPU gradients of one case, read back.
pub fn gpu_gradients(ctx: &GpuContext, fma: &Attention, x: &Inputs, p: &Problem) -> Gradients<f32> {
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
    let ((), saved) = fma.train(p, Resident(t)).expect("forward");
    backward_poisoned(ctx, fma, &saved, &x.dout)
}

/// The FMA backward of `saved` with dO = `dout` through resident buffers, every gradient
/// buffer poisoned with NaN; dQ, dK, dV read back and, in Learned mode, the weights' gradients
/// split per level: (d, p, w_l), or (d, p, s_l, s_l) on a 2D grid.
pub fn backward_poisoned(
    ctx: &GpuContext,
    fma: &Attention,
    saved: &Saved,
    dout: &[f32],
) -> Gradients<f32> {
    let shape = saved.problem().shape;
    let Ok(Plan::FmaBackward(plan)) = fma.backward_plan(saved.problem()) else {
        panic!("not an FMA backward");
    };
    let dout = buffer(ctx, "dout", dout);
    let (len, kv_len) = (shape.elements(), shape.kv_elements());
    let (dq, dk, dv) = (
        nan(ctx, "dq", len),
        nan(ctx, "dk", kv_len),
        nan(ctx, "dv", kv_len),
    );
    let learned = matches!(
        fma.method(),
        Method::Fma(cfg) if matches!(cfg.downsample, Downsample::Learned(_))
    );
    let wbufs = learned.then(|| {
        [
            nan(ctx, "dwk", plan.weight_elements),
            nan(ctx, "dwv", plan.weight_elements),
            nan(ctx, "dbk", plan.bias_elements),
            nan(ctx, "dbv", plan.bias_elements),
        ]
    });
    // Coarse queries: the query weights' gradients too (fine queries have none: zeros).
    let coarse_q = !plan.coarse_dq.is_empty();
    let qbufs = (learned && coarse_q).then(|| {
        [
            nan(ctx, "dwq", plan.weight_elements),
            nan(ctx, "dbq", plan.bias_elements),
        ]
    });
    let g = GradTensors {
        dq: &dq,
        dk: &dk,
        dv: &dv,
        weights: wbufs.as_ref().map(|[wk, wv, bk, bv]| WeightGradTensors {
            wk,
            wv,
            bk,
            bv,
            queries: qbufs.as_ref().map(|[wq, bq]| (wq, bq)),
        }),
    };
    let io = ResidentGrad {
        dout: &dout,
        grads: g,
    };
    fma.backward(saved, io).expect("backward");
    let read = |b: &wgpu::Buffer, len: usize| read_buffer(ctx, b)[..len].to_vec();
    let weights = wbufs.as_ref().map(|[wk, wv, bk, bv]| {
        let (wk, wv) = (
            read(wk, plan.weight_elements),
            read(wv, plan.weight_elements),
        );
        let (bk, bv) = (read(bk, plan.bias_elements), read(bv, plan.bias_elements));
        let (wq, bq) = match &qbufs {
            Some([wq, bq]) => (read(wq, plan.weight_elements), read(bq, plan.bias_elements)),
            None => (
                vec![0.0; plan.weight_elements],
                vec![0.0; plan.bias_elements],
            ),
        };
        plan.split_weight_gradients([&wk, &wv, &wq], [&bk, &bv, &bq])
    });
    Gradients {
        dq: read(&dq, len),
        dk: read(&dk, kv_len),
        dv: read(&dv, kv_len),
        weights,
        dsinks: None,
    }
}

/// Largest error of one tensor relative to its scale; asserts it is within TOL (and finite:
/// a NaN left by an unwritten element is a violation).
pub fn compare(label: &str, name: &str, gpu: &[f32], reference: &[f64]) -> f64 {
    assert_eq!(gpu.len(), reference.len(), "{label}: {name} length");
    let scale = reference.iter().fold(1.0f64, |m, x| m.max(x.abs()));
    let c = closeness(gpu, reference, TOL * scale, TOL);
    assert_eq!(
        c.violations, 0,
        "{label}: {name} {c:?} (scale {scale:.3e}, gpu {}, ref {})",
        gpu[c.worst_index], reference[c.worst_index]
    );
    c.max_abs / scale
}

/// Compares every gradient of `gpu` with `reference` (dQ, dK, dV and, in Learned mode, each
/// used level's six weight and bias gradients: the query weights' are zeros on both sides with
/// fine queries); returns the worst scaled error.
pub fn compare_all(label: &str, gpu: &Gradients<f32>, reference: &Gradients<f64>) -> f64 {
    let mut worst = 0.0f64;
    for (name, a, b) in [
        ("dQ", &gpu.dq, &reference.dq),
        ("dK", &gpu.dk, &reference.dk),
        ("dV", &gpu.dv, &reference.dv),
    ] {
        worst = worst.max(compare(label, name, a, b));
    }
    for (name, a, b) in weight_pairs(label, gpu, reference) {
        worst = worst.max(compare(label, &name, a, b));
    }
    worst
}

/// Each used level's six weight and bias gradients of `a` beside `b`'s, named `k_w1`, `k_b1`,
/// `v_w1`, ... (`a`'s levels against `b`'s first ones: the reference has one entry per level of
/// the weights, the GPU the used ones); none in Average mode. Weights on one side only panic.
pub fn weight_pairs<'a, T, U>(
    label: &str,
    a: &'a Gradients<T>,
    b: &'a Gradients<U>,
) -> Vec<(String, &'a [T], &'a [U])> {
    match (&a.weights, &b.weights) {
        (Some(aw), Some(bw)) => {
            assert!(bw.len() >= aw.len(), "{label}: levels");
            let mut out = Vec::new();
            for (l, (x, y)) in aw.iter().zip(bw).enumerate() {
                for (name, p, q) in [
                    ("k_w", &x.wk, &y.wk),
                    ("k_b", &x.bk, &y.bk),
                    ("v_w", &x.wv, &y.wv),
                    ("v_b", &x.bv, &y.bv),
                    ("q_w", &x.wq, &y.wq),
                    ("q_b", &x.bq, &y.bq),
                ] {
                    out.push((format!("{name}{}", l + 1), p.as_slice(), q.as_slice()));
                }
            }
            out
        }
        (None, None) => Vec::new(),
        _ => panic!("{label}: weight gradients on one side only"),
    }
}
