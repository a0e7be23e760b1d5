//! Heads longer than one storage binding (`plan::SplitPlan`): on a device whose binding limit is
//! 16 KiB, FMA cuts each head's sequence into chunks of whole fine blocks. The result must be
//! the bits of an unsplit run on a device with the default limit (same kernels and tiles, the
//! same float operations in the same order; both devices are made alike, so the tiles agree),
//! for host tensors and for the caller's buffers,
//! and close to the f64 reference (same tolerance as tests/gpu/forward.rs).

use crate::common::{
    closeness, gpu, gpu_with_binding_limit, random_learned, read_buffer, Poisoned,
};
use multipole_attn::cpu::{self, widen};
use multipole_attn::gpu::GpuContext;
use multipole_attn::gpu::{Attention, Host, Resident};
use multipole_attn::plan::KernelLimits;
use multipole_attn::plan::SplitPlan;
use multipole_attn::plan::{DenseKernel, DenseSplitPlan};
use multipole_attn::random::{fresh_seed, normal_tensor};
use multipole_attn::{Downsample, FmaConfig, FmaError, Method, Problem, Queries, Shape};

const SMALL: u64 = 16 << 10;

fn inputs(seed: u64, shape: Shape) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    (
        normal_tensor(seed, shape.elements()),
        normal_tensor(seed + 1, shape.kv_elements()),
        normal_tensor(seed + 2, shape.kv_elements()),
    )
}

/// The configurations and problems tried; every head is over 16 KiB, and each case says how
/// many chunks a head becomes (so the test cannot pass by not splitting).
fn cases() -> Vec<(FmaConfig, Problem, usize)> {
    vec![
        // 1025 x 16: 65.6 KB per head; chunks of 192 tokens plus a 32-token halo each side.
        (
            FmaConfig::new(32, 2),
            Problem::new(Shape::new(1, 2, 1025, 16)),
            6,
        ),
        (
            FmaConfig::new(32, 1),
            Problem::new(Shape::new(1, 2, 1025, 16)).causal(true),
            6,
        ),
        (
            FmaConfig::new(32, 2).queries(Queries::Coarse),
            Problem::new(Shape::new(2, 1, 1025, 16)),
            6,
        ),
        // Grouped-query heads: each split query head reads its K/V head's chunks.
        (
            FmaConfig::new(32, 2),
            Problem::new(Shape::new(1, 4, 1025, 16).with_kv_heads(2)),
            6,
        ),
        // head_dim 3 (not a multiple of 4), m = 64: 1365 rows per binding, chunks of 1216.
        (
            FmaConfig::new(64, 2),
            Problem::new(Shape::new(1, 1, 5000, 3)),
            5,
        ),
        (
            FmaConfig::new(64, 4).count_correction(false),
            Problem::new(Shape::new(1, 1, 5000, 3)),
            5,
        ),
    ]
}

/// The two ways a binding is small, as (device of the split run, device of the unsplit run,
/// cap on the library's bindings for the split run): a device whose limit is 16 KiB (kernels
/// without subgroup operations: `from_device` enables no feature), and the shared context
/// with the library capped at 16 KiB (`max_binding`; on lavapipe its kernels share tiles
/// through subgroups).
fn setups(shared: &'static GpuContext) -> Vec<(GpuContext, GpuContext, u64)> {
    vec![
        (
            gpu_with_binding_limit(SMALL),
            gpu_with_binding_limit(128 << 20),
            u64::MAX,
        ),
        (shared.clone(), shared.clone(), SMALL),
    ]
}

#[test]
fn a_head_over_the_binding_is_split_along_its_sequence_to_the_bit() {
    let Some(shared) = gpu() else { return };
    let seed = fresh_seed();
    for (small, default, cap) in setups(shared) {
        for (cfg, problem, chunks) in cases() {
            let shape = problem.shape;
            let limits = KernelLimits::from_wgpu(&small.limits);
            let plan =
                SplitPlan::new(shape.seq, shape.head_dim, &cfg, &limits.capped(cap)).unwrap();
            assert_eq!(plan.chunks.len(), chunks, "{cfg:?} {shape}");
            split_run_matches(&small, &default, cap, &cfg, &problem, seed);
        }
    }
}

/// FMA of `problem` on `small` (bindings capped at `cap`) equals the run on `default` bit for
/// bit, and the f64 reference within the tolerance of tests/gpu/forward.rs.
fn split_run_matches(
    small: &GpuContext,
    default: &GpuContext,
    cap: u64,
    cfg: &FmaConfig,
    problem: &Problem,
    seed: u64,
) {
    let (shape, causal) = (problem.shape, problem.causal);
    let (q, k, v) = inputs(seed, shape);
    let split = Attention::fma(small, cfg.clone())
        .unwrap()
        .max_binding(cap)
        .unwrap()
        .forward(problem, Host::new(&q, &k, &v))
        .unwrap();
    let whole = Attention::fma(default, cfg.clone())
        .unwrap()
        .forward(problem, Host::new(&q, &k, &v))
        .unwrap();
    assert!(
        split.o == whole.o && split.lse == whole.lse,
        "seed {seed} {cfg:?} causal {causal} {shape} cap {cap}: the split run differs from the \
         unsplit one"
    );

    let method = Method::Fma(cfg.clone());
    let r = cpu::forward(&method, problem, &widen(&q), &widen(&k), &widen(&v)).unwrap();
    let c = closeness(&split.o, &r.o, 5e-5, 5e-5);
    assert_eq!(
        c.violations, 0,
        "seed {seed} {cfg:?} causal {causal} {shape}: O {c:?}"
    );
    let c = closeness(split.lse.as_deref().unwrap(), &r.lse, 5e-5, 1e-5);
    assert_eq!(
        c.violations, 0,
        "seed {seed} {cfg:?} causal {causal} {shape}: LSE {c:?}"
    );
}

/// Grouped-query heads whose tensors exceed a binding together but not per group run in
/// runs of whole groups (8 heads of 80 x 16 floats: 20 KiB of Q per 4 heads, so runs of one
/// group of 2), and multi-query heads of one K/V head one query head at a time.
#[test]
fn grouped_heads_over_the_binding_run_in_whole_groups_to_the_bit() {
    let Some(shared) = gpu() else { return };
    let seed = fresh_seed();
    for (small, default, cap) in setups(shared) {
        for shape in [
            Shape::new(2, 4, 80, 16).with_kv_heads(2),
            Shape::new(1, 4, 200, 16).with_kv_heads(1),
        ] {
            for cfg in [
                FmaConfig::new(16, 2),
                FmaConfig::new(16, 2).queries(Queries::Coarse),
            ] {
                split_run_matches(&small, &default, cap, &cfg, &Problem::new(shape), seed);
            }
        }
    }
}

#[test]
fn caller_buffers_over_the_binding_are_copied_through_in_pieces() {
    let Some(shared) = gpu() else { return };
    let seed = fresh_seed();
    for (small, default, cap) in setups(shared) {
        buffers_split_like_host_runs(&small, &default, cap, seed);
    }
    let small = gpu_with_binding_limit(SMALL);
    // Without COPY_SRC the pieces cannot be copied out of Q: a typed error naming Q.
    let shape = Shape::new(1, 1, 1025, 16);
    let (q, k, v) = inputs(seed, shape);
    let bufs = Poisoned::new(&small, &q, &k, &v, shape);
    let e = Attention::fma(&small, FmaConfig::new(32, 2))
        .unwrap()
        .forward(&Problem::new(shape), Resident(bufs.tensors()))
        .unwrap_err();
    assert!(
        matches!(&e, FmaError::ShapeMismatch { what, .. } if what == "Q buffer usage"),
        "{e}"
    );
    // The context still works, and the output was left alone.
    assert!(read_buffer(&small, &bufs.out).iter().all(|x| x.is_nan()));
}

#[test]
fn dense_attention_over_the_binding_runs_query_and_key_chunk_pairs_to_the_bit() {
    if gpu().is_none() {
        return;
    }
    let Some(shared) = gpu() else { return };
    let seed = fresh_seed();
    for (small, default, cap) in setups(shared) {
        let limits = KernelLimits::from_wgpu(&small.limits).capped(cap);
        // 1000 x 16: 4 chunks of 256; 1400 x 3: 2 chunks (1344 rows of 12 B each fit 16 KiB).
        for (shape, chunks) in [
            (Shape::new(1, 2, 1000, 16), 4),
            (Shape::new(2, 1, 1400, 3), 2),
        ] {
            for causal in [false, true] {
                let plan = DenseSplitPlan::new(shape.seq, shape.head_dim, causal, &limits).unwrap();
                assert_eq!(plan.chunks.len(), chunks);
                let label = format!("seed {seed} {shape} causal {causal} cap {cap}");
                let problem = Problem::new(shape).causal(causal);
                let (q, k, v) = inputs(seed, shape);
                let host = Host::new(&q, &k, &v);
                let dense = |ctx, cap| Attention::dense(ctx).unwrap().max_binding(cap).unwrap();
                let split = dense(&small, cap).forward(&problem, host).unwrap();
                // Each key chunk of the split run ends the rows as a partial (O, LSE) that the
                // next one resumes from; an unsplit run with its key chunks at the same
                // boundaries does the same float operations.
                let keys = plan.chunks[0].1;
                let whole = dense(&default, u64::MAX)
                    .keys_per_dispatch(keys)
                    .unwrap()
                    .forward(&problem, host)
                    .unwrap();
                assert!(
                    split.o == whole.o && split.lse == whole.lse,
                    "{label}: the split run differs from the unsplit one"
                );
                let r = cpu::dense_attention(&widen(&q), &widen(&k), &widen(&v), shape, causal)
                    .unwrap();
                let c = closeness(&split.o, &r.o, 5e-5, 5e-5);
                assert_eq!(c.violations, 0, "{label}: O {c:?}");
                // The tiled kernel's split run (its own chunks: whole tiles of its block and
                // key tile, which depend on the adapter's memory, so only the reference is
                // shared with the unsplit run) and its resident twin, to the bit.
                let tiled = || {
                    Attention::dense(&small)
                        .unwrap()
                        .max_binding(cap)
                        .unwrap()
                        .dense_kernel(DenseKernel::Tiled)
                        .unwrap()
                };
                let split_tiled = tiled().forward(&problem, host).unwrap();
                let c = closeness(&split_tiled.o, &r.o, 5e-5, 5e-5);
                assert_eq!(c.violations, 0, "{label} tiled: O {c:?}");
                let copy = wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST;
                let bufs = Poisoned::with_usage(&small, &q, &k, &v, shape, copy);
                tiled().forward(&problem, Resident(bufs.tensors())).unwrap();
                let (o, lse) = bufs.read(&small);
                assert!(
                    o == split_tiled.o && Some(lse) == split_tiled.lse,
                    "{label} tiled"
                );

                // The caller's buffers, outputs NaN-poisoned.
                let copy = wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST;
                let bufs = Poisoned::with_usage(&small, &q, &k, &v, shape, copy);
                dense(&small, cap)
                    .forward(&problem, Resident(bufs.tensors()))
                    .unwrap();
                let (o, lse) = bufs.read(&small);
                assert!(o == whole.o && Some(lse) == whole.lse, "{label}");
            }
        }
    }
}

#[test]
fn what_cannot_split_is_a_typed_error() {
    if gpu().is_none() {
        return;
    }
    let small = gpu_with_binding_limit(SMALL);
    let shape = Shape::new(1, 1, 1025, 16);
    let problem = Problem::new(shape);
    let (q, k, v) = inputs(fresh_seed(), shape);
    let host = Host::new(&q, &k, &v).without_lse();
    // Learned weights grow with n: a head too long for a binding has weights too large too.
    let weights = random_learned(3, 16, 32, 1, shape.seq);
    let e = Attention::fma(
        &small,
        FmaConfig::new(32, 1).downsample(Downsample::Learned(weights)),
    )
    .and_then(|f| f.forward(&problem, host))
    .unwrap_err();
    assert!(matches!(e, FmaError::LimitExceeded { .. }), "{e}");
    // m = 256 needs 3 m = 768 rows of 64 B in one binding.
    let fma = Attention::fma(&small, FmaConfig::new(256, 2)).unwrap();
    let e = fma.forward(&problem, host).unwrap_err();
    // `check` says so from the problem alone, with the same message (the CLI runs it before
    // it reads the data).
    assert_eq!(fma.check(&problem).unwrap_err().to_string(), e.to_string());
    assert!(e.to_string().contains("use a smaller block size m"), "{e}");
    Attention::fma(&small, FmaConfig::new(32, 2))
        .unwrap()
        .check(&problem)
        .unwrap();
    match e {
        FmaError::LimitExceeded { requested, max, .. } => {
            assert_eq!((requested, max), (768 * 64, SMALL));
        }
        e => panic!("expected LimitExceeded, got {e}"),
    }
}

/// A forward of resident buffers on `small` (capped at `cap`) over tensors larger than its
/// bindings, outputs NaN-poisoned, equals the host run on `default` bit for bit.
fn buffers_split_like_host_runs(small: &GpuContext, default: &GpuContext, cap: u64, seed: u64) {
    let learned = |shape: Shape, m, p| {
        Downsample::Learned(random_learned(seed + 7, shape.head_dim, m, p, shape.seq))
    };
    let per_head = Shape::new(2, 4, 200, 16);
    let cases = [
        // Every head over the binding: split along the sequence, head by head.
        (
            FmaConfig::new(32, 2),
            Problem::new(Shape::new(1, 3, 1025, 16)),
        ),
        (
            FmaConfig::new(32, 2).queries(Queries::Coarse),
            Problem::new(Shape::new(1, 2, 1025, 16)),
        ),
        // Heads of 12.8 KB, 102 KB in all: one chunk per head, Learned weights too.
        (
            FmaConfig::new(32, 1).downsample(learned(per_head, 32, 1)),
            Problem::new(per_head),
        ),
        (FmaConfig::new(32, 2), Problem::new(per_head).causal(true)),
    ];
    let copy = wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST;
    for (cfg, problem) in cases {
        let (shape, causal) = (problem.shape, problem.causal);
        let (q, k, v) = inputs(seed, shape);
        // Outputs NaN-poisoned: a row no chunk copies back fails the comparison.
        let bufs = Poisoned::with_usage(small, &q, &k, &v, shape, copy);
        Attention::fma(small, cfg.clone())
            .unwrap()
            .max_binding(cap)
            .unwrap()
            .forward(&problem, Resident(bufs.tensors()))
            .unwrap();
        let (o, lse) = bufs.read(small);
        let whole = Attention::fma(default, cfg.clone())
            .unwrap()
            .forward(&problem, Host::new(&q, &k, &v))
            .unwrap();
        assert!(
            o == whole.o && Some(lse) == whole.lse,
            "seed {seed} {cfg:?} causal {causal} {shape} cap {cap}: buffers split differently \
             from the host run"
        );
    }
}

/// Heads whose coarse rows of all levels exceed the binding (a small block size m: about
/// 2 n p / m rows), as (configuration, problem, cap on the library's bindings). Each step then
/// binds compact copies of the coarse rows it reads (`plan::CoarseSplit`).
fn coarse_row_cases(seed: u64) -> Vec<(FmaConfig, Problem, u64)> {
    let learned = |d, m, p, n| Downsample::Learned(random_learned(seed + 9, d, m, p, n));
    vec![
        // 1000 x 4: the tokens (16 KB) fit one binding, the ~2000 coarse rows (32 KB) do not.
        (
            FmaConfig::new(2, 2),
            Problem::new(Shape::new(1, 2, 1000, 4)),
            SMALL,
        ),
        (
            FmaConfig::new(2, 2),
            Problem::new(Shape::new(1, 1, 1000, 4)).causal(true),
            SMALL,
        ),
        (
            FmaConfig::new(2, 2).queries(Queries::Coarse),
            Problem::new(Shape::new(1, 1, 1000, 4)),
            SMALL,
        ),
        // 3000 x 4: the tokens split too.
        (
            FmaConfig::new(4, 2),
            Problem::new(Shape::new(1, 1, 3000, 4)),
            SMALL,
        ),
        (
            FmaConfig::new(4, 2).queries(Queries::Coarse),
            Problem::new(Shape::new(1, 1, 3000, 4)),
            SMALL,
        ),
        // Learned: its weights (about d p n floats per pooled tensor) fit where the coarse rows
        // (about 2 n d) do not only for m = 1; with coarse queries (three pooled tensors) only
        // in a narrow band, here 28 KiB for n = 2048, d = 2.
        (
            FmaConfig::new(1, 1).downsample(learned(4, 1, 1, 600)),
            Problem::new(Shape::new(1, 1, 600, 4)),
            SMALL,
        ),
        (
            FmaConfig::new(1, 1)
                .queries(Queries::Coarse)
                .downsample(learned(2, 1, 1, 2048)),
            Problem::new(Shape::new(1, 1, 2048, 2)),
            28 << 10,
        ),
    ]
}

#[test]
fn coarse_row_split_equals_the_unsplit_result_under_a_16_kib_binding_limit() {
    let Some(shared) = gpu() else { return };
    let seed = fresh_seed();
    for (cfg, problem, cap) in coarse_row_cases(seed) {
        let shape = problem.shape;
        let limits = KernelLimits::from_wgpu(&shared.limits).capped(cap);
        let plan = SplitPlan::new(shape.seq, shape.head_dim, &cfg, &limits).unwrap();
        let coarse = plan
            .coarse
            .as_ref()
            .unwrap_or_else(|| panic!("{cfg:?} {shape}: not split"));
        assert!(coarse.attend.len() > 1, "{cfg:?} {shape}: one chunk");
        split_run_matches(shared, shared, cap, &cfg, &problem, seed);
    }
    // A device whose own limit is 16 KiB (kernels without subgroups), host tensors and the
    // caller's buffers.
    let (small, default) = (
        gpu_with_binding_limit(SMALL),
        gpu_with_binding_limit(128 << 20),
    );
    for (cfg, problem, _) in coarse_row_cases(seed).into_iter().take(4) {
        split_run_matches(&small, &default, u64::MAX, &cfg, &problem, seed);
    }
    let (cfg, problem, _) = coarse_row_cases(seed).swap_remove(2);
    let shape = problem.shape;
    let (q, k, v) = inputs(seed, shape);
    let copy = wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST;
    let bufs = Poisoned::with_usage(&small, &q, &k, &v, shape, copy);
    let fma = Attention::fma(&small, cfg.clone()).unwrap();
    fma.check(&problem).unwrap();
    fma.forward(&problem, Resident(bufs.tensors())).unwrap();
    let (o, lse) = bufs.read(&small);
    let whole = Attention::fma(&default, cfg)
        .unwrap()
        .forward(&problem, Host::new(&q, &k, &v))
        .unwrap();
    assert!(
        o == whole.o && Some(lse) == whole.lse,
        "seed {seed}: buffers"
    );
}
