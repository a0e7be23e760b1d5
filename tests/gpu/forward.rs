//! GPU passes against the f64 CPU reference on random inputs with fresh seeds (printed, and
//! replayable with MULTIPOLE_SEED), output buffers poisoned with NaN before every run.
//!
//! Tolerance: |gpu - ref| <= 5e-5 + 5e-5 |ref| for O, 5e-5 + 1e-5 |ref| for the LSE. Why: inputs
//! are N(0, 1), so logits q.k/sqrt(d) are O(1..10) and O is a convex combination of values of
//! size O(1). An f32 dot product of d <= 128 terms carries a relative error of about
//! sqrt(d) * 6e-8, WGSL's exp is accurate to 3 + 2|x| ulp, and the softmax sums at most a few
//! hundred (FMA) or n (dense) positive terms: together a few 1e-6 absolute on O and the LSE,
//! which is what we measure (2e-7 .. 2e-6). The bound leaves ~10x headroom for other
//! drivers' exp/log while staying far below the effect of any indexing error (a key seen at
//! the wrong level or a missing count correction moves O by 1e-2 or more; see
//! `gpu_differs_from_dense`).

use crate::common::{closeness, gpu, random_learned, Poisoned};
use multipole_attn::cpu::{self, widen};
use multipole_attn::gpu::{Attention, Encode, GpuContext, Host, Plan, Resident};
use multipole_attn::random::{fresh_seed, normal_tensor};
use multipole_attn::{Downsample, FmaConfig, Method, Problem, Queries, Shape};

use crate::common::DENSE_KERNELS;
use multipole_attn::plan::{tiled_spec, DenseKernel, KernelLimits, Pass};

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

/// Runs FMA through caller buffers poisoned with NaN and checks O and the LSE.
fn check_fma(ctx: &GpuContext, seed: u64, p: &Problem, cfg: &FmaConfig) -> (f64, f64) {
    let shape = p.shape;
    let x = inputs(seed, shape);
    let label = format!(
        "seed {seed} {shape} m={} p={} causal={} {:?}",
        cfg.block,
        cfg.rank,
        p.causal,
        std::mem::discriminant(&cfg.downsample)
    );
    let fma = Attention::fma(ctx, cfg.clone()).unwrap_or_else(|e| panic!("{label}: {e}"));
    let bufs = Poisoned::new(ctx, &x.q, &x.k, &x.v, shape);
    fma.forward(p, Resident(bufs.tensors()))
        .unwrap_or_else(|e| panic!("{label}: {e}"));
    let (o, lse) = bufs.read(ctx);
    let method = Method::Fma(cfg.clone());
    let r = cpu::forward(&method, p, &widen(&x.q), &widen(&x.k), &widen(&x.v)).unwrap();
    let co = closeness(&o[..shape.elements()], &r.o, O_ATOL, O_RTOL);
    let cl = closeness(&lse[..shape.rows()], &r.lse, LSE_ATOL, LSE_RTOL);
    assert_eq!(co.violations, 0, "{label}: O {co:?}");
    assert_eq!(cl.violations, 0, "{label}: LSE {cl:?}");
    (co.max_abs, cl.max_abs)
}

fn modes(seed: u64, d: usize, m: usize, p: usize, n: usize) -> [Downsample; 2] {
    [
        Downsample::Average,
        Downsample::Learned(random_learned(seed, d, m, p, n)),
    ]
}

#[test]
fn fma_matches_reference_over_the_shape_grid() {
    let Some(ctx) = gpu() else { return };
    let seed = fresh_seed();
    eprintln!("seed {seed}");
    let ns = [1, 7, 97, 256, 1000, 1025, 4096];
    let ds = [16, 40, 64, 128];
    let ms = [4, 16, 64];
    let ps = [1, 2, 4];
    let mut worst = (0.0f64, 0.0f64);
    let mut case = 0usize;
    // Every n with both masks and both modes; d, m, p rotate so each value meets every n.
    for (ni, &n) in ns.iter().enumerate() {
        for causal in [false, true] {
            for mode in 0..2 {
                let d = ds[(ni + case) % ds.len()];
                let m = ms[(ni + 2 * case) % ms.len()];
                let p = ps[(ni + case / 2) % ps.len()].min(m);
                let (batch, heads) = if n >= 1000 { (1, 2) } else { (2, 3) };
                let shape = Shape::new(batch, heads, n, d);
                let s = seed.wrapping_add(case as u64 * 7919);
                let downsample = modes(s, d, m, p, n)[mode].clone();
                let cfg = FmaConfig::new(m, p).downsample(downsample);
                let (eo, el) = check_fma(ctx, s, &Problem::new(shape).causal(causal), &cfg);
                worst = (worst.0.max(eo), worst.1.max(el));
                case += 1;
            }
        }
    }
    eprintln!(
        "{case} cases, worst |O err| {:.2e}, worst |LSE err| {:.2e}",
        worst.0, worst.1
    );
}

#[test]
fn every_head_dim_block_and_rank() {
    let Some(ctx) = gpu() else { return };
    let seed = fresh_seed();
    eprintln!("seed {seed}");
    for (i, &d) in [16, 40, 64, 128, 3, 59].iter().enumerate() {
        for &m in &[4, 16, 64] {
            for &p in &[1, 2, 4] {
                let causal = (i + m + p) % 2 == 0;
                let cfg = FmaConfig::new(m, p);
                check_fma(
                    ctx,
                    seed + (i * 100 + m * 10 + p) as u64,
                    &Problem::new(Shape::new(1, 1, 333, d)).causal(causal),
                    &cfg,
                );
            }
        }
    }
}

#[test]
fn workgroups_that_are_not_whole_subgroups() {
    // With subgroups (lavapipe: 8 lanes) the attention passes share tile rows by subgroup
    // broadcasts only in subgroups with every lane present; m = 12, 20, 100 leave a partial last
    // subgroup (4 lanes) that must take the plain path, m = 2 a workgroup below one subgroup;
    // and head dims below, at and above one vec4 per lane (d = 3, 36, 132).
    let Some(ctx) = gpu() else { return };
    let seed = fresh_seed();
    eprintln!("seed {seed}");
    for (i, &d) in [3, 36, 132].iter().enumerate() {
        for &m in &[2, 12, 20, 100] {
            for causal in [false, true] {
                let cfg = FmaConfig::new(m, 2);
                check_fma(
                    ctx,
                    seed + (i * 1000 + m) as u64,
                    &Problem::new(Shape::new(1, 2, 1000, d)).causal(causal),
                    &cfg,
                );
            }
        }
        check_dense(ctx, seed + i as u64, Shape::new(1, 1, 300, d), true);
    }
}

#[test]
fn count_correction_off_matches_reference() {
    let Some(ctx) = gpu() else { return };
    let seed = fresh_seed();
    for causal in [false, true] {
        let cfg = FmaConfig::new(16, 2).count_correction(false);
        let problem = Problem::new(Shape::new(1, 2, 1025, 32)).causal(causal);
        check_fma(ctx, seed, &problem, &cfg);
    }
}

#[test]
fn more_than_65535_workgroups_fold_into_2d() {
    let Some(ctx) = gpu() else { return };
    let seed = fresh_seed();
    // n = 9, m = 2: 5 blocks and 2 coarse levels per head; 14000 heads -> 70000 workgroups.
    let problem = Problem::new(Shape::new(2, 7000, 9, 8));
    let cfg = FmaConfig::new(2, 2);
    let fma = Attention::fma(ctx, cfg.clone()).unwrap();
    let Plan::Fma(plan) = fma.plan(&problem).unwrap() else {
        panic!("not an FMA plan");
    };
    assert!(plan.attention.workgroups > 65535);
    check_fma(ctx, seed, &problem, &cfg);
    check_fma(ctx, seed + 1, &problem.clone().causal(true), &cfg);

    let dense_shape = Shape::new(1, 70000, 1, 8);
    let dense_problem = Problem::new(dense_shape);
    let x = inputs(seed, dense_shape);
    let dense = Attention::dense(ctx).unwrap();
    let Plan::Dense(plan) = dense.plan(&dense_problem).unwrap() else {
        panic!("not a dense plan");
    };
    assert!(plan.attention.workgroups > 65535);
    let bufs = Poisoned::new(ctx, &x.q, &x.k, &x.v, dense_shape);
    dense
        .forward(&dense_problem, Resident(bufs.tensors()))
        .unwrap();
    let (o, _) = bufs.read(ctx);
    // One key per head: the output is that head's value row.
    let c = closeness(&o, &widen(&x.v), 1e-6, 1e-6);
    assert_eq!(c.violations, 0, "{c:?}");
}

/// Asserts that `dense` runs `p` with `kernel`'s pass (the tiled kernel where its tiles fit
/// the adapter for the head dimension), so a test of the tiled kernel cannot pass on the rows
/// kernel.
pub(crate) fn assert_runs(dense: &Attention, p: &Problem, kernel: DenseKernel) {
    let Plan::Dense(plan) = dense.plan(p).unwrap() else {
        panic!("not a dense plan");
    };
    let limits = KernelLimits::from_wgpu(&dense.context().limits);
    let tiled = kernel == DenseKernel::Tiled && tiled_spec(p.shape.head_dim, &limits).is_some();
    let want = if tiled {
        Pass::DenseTiled
    } else {
        Pass::DenseAttention
    };
    assert_eq!(plan.attention.pass, want, "{kernel:?} {}", p.shape);
}

/// Dense attention with each forward kernel (`DENSE_KERNELS`: the rows kernel and the tiled
/// one, whatever the adapter would pick) against one reference; the worst |O err|.
fn check_dense(ctx: &GpuContext, seed: u64, shape: Shape, causal: bool) -> f64 {
    let x = inputs(seed, shape);
    let r = cpu::dense_attention(&widen(&x.q), &widen(&x.k), &widen(&x.v), shape, causal).unwrap();
    let mut worst = 0.0f64;
    for kernel in DENSE_KERNELS {
        let dense = Attention::dense(ctx).unwrap().dense_kernel(kernel).unwrap();
        assert_runs(&dense, &Problem::new(shape).causal(causal), kernel);
        let bufs = Poisoned::new(ctx, &x.q, &x.k, &x.v, shape);
        dense
            .forward(
                &Problem::new(shape).causal(causal),
                Resident(bufs.tensors()),
            )
            .unwrap();
        let (o, lse) = bufs.read(ctx);
        let co = closeness(&o, &r.o, O_ATOL, O_RTOL);
        let cl = closeness(&lse, &r.lse, LSE_ATOL, LSE_RTOL);
        assert_eq!(
            co.violations, 0,
            "seed {seed} {shape} causal={causal} {kernel:?}: O {co:?}"
        );
        assert_eq!(
            cl.violations, 0,
            "seed {seed} {shape} causal={causal} {kernel:?}: LSE {cl:?}"
        );
        worst = worst.max(co.max_abs);
    }
    worst
}

#[test]
fn dense_matches_reference() {
    let Some(ctx) = gpu() else { return };
    let seed = fresh_seed();
    eprintln!("seed {seed}");
    let mut worst = 0.0f64;
    for (i, &(n, d)) in [
        (1, 16),
        (7, 40),
        (97, 64),
        (256, 128),
        (1025, 40),
        (2048, 64),
    ]
    .iter()
    .enumerate()
    {
        for causal in [false, true] {
            worst = worst.max(check_dense(
                ctx,
                seed + i as u64,
                Shape::new(1, 2, n, d),
                causal,
            ));
        }
    }
    eprintln!("dense worst |O err| {worst:.2e}");
}

#[test]
fn host_api_matches_buffer_api_and_is_deterministic() {
    let Some(ctx) = gpu() else { return };
    let seed = fresh_seed();
    let shape = Shape::new(2, 2, 1000, 64);
    let problem = Problem::new(shape).causal(true);
    let x = inputs(seed, shape);
    let fma = Attention::fma(ctx, FmaConfig::new(64, 2)).unwrap();
    let host = Host::new(&x.q, &x.k, &x.v);
    let a = fma.forward(&problem, host).unwrap();
    let b = fma.forward(&problem, host).unwrap();
    assert_eq!(a.o, b.o, "two runs differ");
    assert_eq!(a.lse, b.lse);
    let bufs = Poisoned::new(ctx, &x.q, &x.k, &x.v, shape);
    fma.forward(&problem, Resident(bufs.tensors())).unwrap();
    let (o, lse) = bufs.read(ctx);
    assert_eq!(a.o, o);
    assert_eq!(a.lse.unwrap(), lse);
    let no_lse = fma.forward(&problem, host.without_lse()).unwrap();
    assert!(no_lse.lse.is_none());
    assert_eq!(no_lse.o, a.o);
    // The tiled dense kernel: its row maxima and sums meet across lanes in a fixed order.
    let tiled = Attention::dense(ctx)
        .unwrap()
        .dense_kernel(DenseKernel::Tiled)
        .unwrap();
    let a = tiled.forward(&problem, host).unwrap();
    let b = tiled.forward(&problem, host).unwrap();
    assert_eq!(a.o, b.o, "two tiled dense runs differ");
    assert_eq!(a.lse, b.lse);
}

#[test]
fn gpu_differs_from_dense() {
    // Guards the tolerance: FMA's approximation error is orders above it, so a GPU pass that
    // silently computed dense attention (or dropped the far field) would fail the tests above.
    let Some(ctx) = gpu() else { return };
    let seed = fresh_seed();
    let problem = Problem::new(Shape::new(1, 1, 1024, 32));
    let x = inputs(seed, problem.shape);
    let host = Host::new(&x.q, &x.k, &x.v).without_lse();
    let f = Attention::fma(ctx, FmaConfig::new(16, 2))
        .unwrap()
        .forward(&problem, host)
        .unwrap();
    let d = Attention::dense(ctx)
        .unwrap()
        .forward(&problem, host)
        .unwrap();
    let diff =
        f.o.iter()
            .zip(&d.o)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
    assert!(diff as f64 > 100.0 * O_ATOL, "FMA equals dense to {diff}");
}

#[test]
fn encode_into_callers_encoder_matches_forward_buffers() {
    // `Encode` records into the caller's command stream: two forwards (FMA with its scratch
    // LSE, then dense into other buffers) in one encoder and one submit must give the bits of
    // `Resident`, and bad input must be refused before anything is recorded.
    let Some(ctx) = gpu() else { return };
    let seed = fresh_seed();
    eprintln!("seed {seed}");
    let shape = Shape::new(1, 2, 1000, 40);
    let (bidirectional, causal) = (Problem::new(shape), Problem::new(shape).causal(true));
    let x = inputs(seed, shape);
    let fma = Attention::fma(ctx, FmaConfig::new(16, 2)).unwrap();
    let dense = Attention::dense(ctx).unwrap();
    let (a, b) = (
        Poisoned::new(ctx, &x.q, &x.k, &x.v, shape),
        Poisoned::new(ctx, &x.q, &x.k, &x.v, shape),
    );
    fma.forward(&bidirectional, Resident(a.tensors())).unwrap();
    dense.forward(&causal, Resident(b.tensors())).unwrap();
    let (want_fma, want_dense) = (a.read(ctx), b.read(ctx));

    let (c, e) = (
        Poisoned::new(ctx, &x.q, &x.k, &x.v, shape),
        Poisoned::new(ctx, &x.q, &x.k, &x.v, shape),
    );
    let mut enc = ctx.device.create_command_encoder(&Default::default());
    let mut without_lse = c.tensors();
    without_lse.lse = None;
    fma.forward(&bidirectional, Encode(&mut enc, without_lse))
        .unwrap();
    dense
        .forward(&causal, Encode(&mut enc, e.tensors()))
        .unwrap();
    let small = Problem::new(Shape::new(1, 2, 2000, 40));
    assert!(fma.forward(&small, Encode(&mut enc, e.tensors())).is_err());
    assert!(dense
        .forward(&small.causal(true), Encode(&mut enc, e.tensors()))
        .is_err());
    ctx.queue.submit([enc.finish()]);
    let (got_fma, got_dense) = (c.read(ctx), e.read(ctx));
    assert_eq!(got_fma.0, want_fma.0, "FMA O differs");
    assert!(
        got_fma.1.iter().all(|l| l.is_nan()),
        "LSE written without a buffer"
    );
    assert_eq!(got_dense, want_dense, "dense O or LSE differs");
}

/// K or V of `shape` (batch, kv_heads, n, d) with each K/V head repeated for its group:
/// the multi-head tensors that grouped-query attention must equal.
fn repeat_kv(x: &[f32], shape: Shape) -> Vec<f64> {
    let per_head = shape.seq_kv * shape.head_dim;
    (0..shape.batch_heads())
        .flat_map(|bh| &x[(bh / shape.group()) * per_head..(bh / shape.group() + 1) * per_head])
        .map(|&v| v as f64)
        .collect()
}

/// Grouped-query (and multi-query) heads, FMA and dense, through NaN-poisoned caller buffers,
/// against the reference run on K and V with every K/V head repeated for its group. The
/// pooling then runs once per K/V head on the GPU and once per query head in the reference,
/// so a query head reading the wrong K/V head, or a coarse row of the wrong head, fails.
#[test]
fn grouped_query_heads_equal_multi_head_attention_on_repeated_keys() {
    let Some(ctx) = gpu() else { return };
    let seed = fresh_seed();
    eprintln!("seed {seed}");
    let mut worst = 0.0f64;
    // (batch, heads, kv_heads, n, head_dim, m, p)
    let cases = [
        (2, 4, 2, 97, 16, 8, 2),
        (1, 8, 1, 1025, 16, 64, 4),
        (2, 6, 3, 1, 16, 8, 2),
    ];
    for (i, &(batch, heads, kv_heads, n, d, m, p)) in cases.iter().enumerate() {
        let shape = Shape::new(batch, heads, n, d).with_kv_heads(kv_heads);
        let mha = Shape::new(batch, heads, n, d);
        let seed = seed + i as u64;
        let x = inputs(seed, shape);
        let (k, v) = (repeat_kv(&x.k, shape), repeat_kv(&x.v, shape));
        let q = widen(&x.q);
        let check = |label: &str, o: &[f32], lse: &[f32], r: &cpu::Reference| {
            let co = closeness(&o[..shape.elements()], &r.o, O_ATOL, O_RTOL);
            let cl = closeness(&lse[..shape.rows()], &r.lse, LSE_ATOL, LSE_RTOL);
            assert_eq!(co.violations, 0, "seed {seed} {shape} {label}: O {co:?}");
            assert_eq!(cl.violations, 0, "seed {seed} {shape} {label}: LSE {cl:?}");
            co.max_abs
        };
        for causal in [false, true] {
            let queries: &[Queries] = if causal {
                &[Queries::Fine]
            } else {
                &[Queries::Fine, Queries::Coarse]
            };
            for &queries in queries {
                for ds in modes(seed, d, m, p, n) {
                    let cfg = FmaConfig::new(m, p).queries(queries).downsample(ds);
                    let label = format!("causal={causal} {queries:?} m={m} p={p}");
                    let problem = Problem::new(shape).causal(causal);
                    let fma = Attention::fma(ctx, cfg.clone()).unwrap();
                    let bufs = Poisoned::new(ctx, &x.q, &x.k, &x.v, shape);
                    fma.forward(&problem, Resident(bufs.tensors())).unwrap();
                    let (o, lse) = bufs.read(ctx);
                    let multi_head = Problem::new(mha).causal(causal);
                    let r = cpu::forward(&Method::Fma(cfg), &multi_head, &q, &k, &v).unwrap();
                    worst = worst.max(check(&label, &o, &lse, &r));
                    // The host API (runs of whole groups when the tensors are large) agrees.
                    let host = Host::new(&x.q, &x.k, &x.v).without_lse();
                    let host = fma.forward(&problem, host).unwrap();
                    assert_eq!(host.o, o[..shape.elements()], "{label}: host vs buffers");
                }
            }
            let r = cpu::dense_attention(&q, &k, &v, mha, causal).unwrap();
            for kernel in DENSE_KERNELS {
                let dense = Attention::dense(ctx).unwrap().dense_kernel(kernel).unwrap();
                let bufs = Poisoned::new(ctx, &x.q, &x.k, &x.v, shape);
                dense
                    .forward(
                        &Problem::new(shape).causal(causal),
                        Resident(bufs.tensors()),
                    )
                    .unwrap();
                let (o, lse) = bufs.read(ctx);
                let label = format!("dense causal={causal} {kernel:?}");
                worst = worst.max(check(&label, &o, &lse, &r));
            }
        }
    }
    eprintln!("grouped-query worst |O err| {worst:.2e}");
}

#[test]
fn kv_heads_that_do_not_divide_heads_are_a_typed_error() {
    let Some(ctx) = gpu() else { return };
    let shape = Shape::new(1, 6, 64, 16).with_kv_heads(4);
    let x = vec![0.5f32; shape.elements()];
    let kv = vec![0.5f32; 4 * 64 * 16];
    let fma = Attention::fma(ctx, FmaConfig::new(16, 2)).unwrap();
    let e = fma
        .forward(&Problem::new(shape), Host::new(&x, &kv, &kv).without_lse())
        .unwrap_err();
    assert!(
        matches!(
            e,
            multipole_attn::FmaError::InvalidConfig {
                what: "kv_heads",
                ..
            }
        ),
        "{e}"
    );
    assert!(e.to_string().contains("divisor of heads = 6"), "{e}");
}
