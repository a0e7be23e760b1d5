//! 2D grids whose heads exceed one storage binding (`plan::SplitPlan` on a grid, algorithm.md
//! §9): on a 16 KiB binding, FMA cuts each head into chunks of whole rows of fine cells (r W
//! tokens), each bound with one row of cells of halo above and below. The result must be the
//! bits of the unsplit run (same kernels and tiles, the same float operations in the same
//! order), through host slices and through the caller's NaN-poisoned buffers, and close to the
//! f64 reference with the tolerance of `tests/gpu/grid.rs` (5e-5 + 5e-5 |ref| on O, 5e-5 +
//! 1e-5 |ref| on the LSE: N(0, 1) inputs, dots of d <= 16 terms and softmaxes over at most
//! 9 r^2 + 27 p L keys give errors of a few 1e-6, while a cell attended twice, missed, or read
//! from the wrong bound row moves O by 1e-2 or more).
//!
//! Sizes: at 16 KiB a binding holds 4096 / d rows, which must hold three rows of cells
//! (3 r W tokens) and the grid's coarse rows (about 4 H W p / (3 r^2)): hence d = 4 on the
//! 45 x 70 grid and d = 8 or 16 on 33 x 20. Causal is not allowed in 2D (`tests/gpu/grid.rs`).

use std::sync::OnceLock;

use crate::common::{closeness, gpu, gpu_with_binding_limit, Poisoned};
use multipole_attn::cpu::{self, widen};
use multipole_attn::gpu::{Attention, GpuContext, Host, Resident};
use multipole_attn::plan::{KernelLimits, SplitPlan};
use multipole_attn::random::{fresh_seed, normal_tensor};
use multipole_attn::{
    Downsample, FmaConfig, FmaError, Grid, LearnedWeights, Problem, Queries, Shape,
};

const SMALL: u64 = 16 << 10;

/// A device whose binding limit is 16 KiB and one alike but for a 128 MiB limit (neither
/// enables subgroup operations, so their kernels agree), made once for the file.
fn devices() -> &'static (GpuContext, GpuContext) {
    static DEVICES: OnceLock<(GpuContext, GpuContext)> = OnceLock::new();
    DEVICES.get_or_init(|| {
        (
            gpu_with_binding_limit(SMALL),
            gpu_with_binding_limit(128 << 20),
        )
    })
}

fn inputs(seed: u64, shape: Shape) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    (
        normal_tensor(seed, shape.elements()),
        normal_tensor(seed ^ 0x9e37_79b9, shape.kv_elements()),
        normal_tensor(seed ^ 0x7f4a_7c15, shape.kv_elements()),
    )
}

/// (config, shape, chunks per head at 16 KiB): every case but the last has heads over the
/// binding, and says how many chunks a head becomes, so the test cannot pass by not
/// splitting.
fn cases() -> Vec<(FmaConfig, Shape, usize)> {
    let g = |h, w| Some(Grid::new(h, w));
    vec![
        // 45 x 70, d = 4: 1024 rows per binding, rows of cells of 280 tokens: one row of cells
        // per chunk (the last holds one grid row), two heads.
        (
            FmaConfig::new(4, 1).grid(g(45, 70)),
            Shape::new(1, 2, 3150, 4),
            12,
        ),
        (
            FmaConfig::new(4, 2)
                .grid(g(45, 70))
                .queries(Queries::Coarse),
            Shape::new(1, 1, 3150, 4),
            12,
        ),
        // 33 x 20, d = 16: 256 rows per binding; r = 2: chunks of 4 rows of cells (160
        // tokens), the last holding a partial row of cells (one grid row).
        (
            FmaConfig::new(2, 1).grid(g(33, 20)),
            Shape::new(2, 1, 660, 16),
            5,
        ),
        (
            FmaConfig::new(4, 2)
                .grid(g(33, 20))
                .queries(Queries::Coarse),
            Shape::new(1, 2, 660, 16),
            9,
        ),
        // d = 8, grouped K/V heads: each query head reads its K/V head's chunks.
        (
            FmaConfig::new(2, 2).grid(g(33, 20)),
            Shape::new(1, 4, 660, 8).with_kv_heads(2),
            2,
        ),
        // Heads that fit (10.6 KB each) in tensors that do not: the caller's buffers run
        // through the split path, one chunk a head.
        (
            FmaConfig::new(2, 1).grid(g(33, 20)),
            Shape::new(1, 4, 660, 4),
            1,
        ),
    ]
}

/// The two ways a binding is small, as (device of the split run, device of the unsplit run,
/// cap on the library's bindings for the split run): the 16 KiB device, and the shared
/// context with the library capped at 16 KiB (its kernels may use subgroups).
fn setups(shared: &'static GpuContext) -> Vec<(&'static GpuContext, &'static GpuContext, u64)> {
    let (small, default) = devices();
    vec![(small, default, u64::MAX), (shared, shared, SMALL)]
}

#[test]
fn a_grid_over_the_binding_runs_in_rows_of_cells_to_the_bit() {
    let Some(shared) = gpu() else { return };
    let seed = fresh_seed();
    eprintln!("seed {seed}");
    let mut worst = (0.0f64, 0.0f64);
    for (i, (cfg, shape, chunks)) in cases().into_iter().enumerate() {
        let s = seed.wrapping_add(i as u64 * 7919);
        let label = format!("seed {s} {shape} grid {} {cfg:?}", cfg.grid.unwrap());
        let (q, k, v) = inputs(s, shape);
        let problem = Problem::new(shape);
        let r = cpu::fma_forward(&widen(&q), &widen(&k), &widen(&v), shape, &cfg).unwrap();
        for (small, default, cap) in setups(shared) {
            let limits = KernelLimits::from_wgpu(&small.limits).capped(cap);
            let plan = SplitPlan::new(shape.seq, shape.head_dim, &cfg, &limits).unwrap();
            assert_eq!(plan.chunks.len(), chunks, "{label}");
            let fma = |ctx| Attention::fma(ctx, cfg.clone()).unwrap();
            let whole = fma(default)
                .forward(&problem, Host::new(&q, &k, &v))
                .unwrap();
            let lse = whole.lse.clone().unwrap();

            // Host slices (runs of whole heads when a head fits).
            let split = fma(small)
                .max_binding(cap)
                .unwrap()
                .forward(&problem, Host::new(&q, &k, &v))
                .unwrap_or_else(|e| panic!("{label}: {e}"));
            assert!(
                split.o == whole.o && split.lse == whole.lse,
                "{label} cap {cap}: the split run differs from the unsplit one"
            );

            // The caller's buffers, outputs NaN-poisoned: every row must be written.
            let copy = wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST;
            let bufs = Poisoned::with_usage(small, &q, &k, &v, shape, copy);
            fma(small)
                .max_binding(cap)
                .unwrap()
                .forward(&problem, Resident(bufs.tensors()))
                .unwrap_or_else(|e| panic!("{label}: {e}"));
            let (o, l) = bufs.read(small);
            assert!(
                o == whole.o && l == lse,
                "{label} cap {cap}: the split run on buffers differs from the unsplit one"
            );

            let co = closeness(&o, &r.o, 5e-5, 5e-5);
            let cl = closeness(&l, &r.lse, 5e-5, 1e-5);
            assert_eq!(co.violations, 0, "{label}: O {co:?}");
            assert_eq!(cl.violations, 0, "{label}: LSE {cl:?}");
            worst = (worst.0.max(co.max_abs), worst.1.max(cl.max_abs));
        }
    }
    eprintln!(
        "worst |O err| {:.2e}, worst |LSE err| {:.2e}",
        worst.0, worst.1
    );
}

/// What a 2D head cannot split is a typed error, from `check` and from the forward, and the
/// outputs are left alone.
#[test]
fn what_a_grid_cannot_split_is_a_typed_error() {
    if gpu().is_none() {
        return;
    }
    let (small, _) = devices();
    let grid = Grid::new(45, 70);
    let shape = |d| Shape::new(1, 1, 45 * 70, d);
    let lw = LearnedWeights::box_init_grid_for(4, 4, 1, grid);
    for (cfg, d, needle) in [
        // Three rows of cells of side 8: 1680 tokens, 26.9 KB at d = 4.
        (
            FmaConfig::new(8, 1).grid(Some(grid)),
            4,
            "row of fine cells",
        ),
        // The coarse rows of r = 2, p = 2 (2192 rows of 32 B) exceed the binding.
        (FmaConfig::new(2, 2).grid(Some(grid)), 8, "coarse"),
        // Learned weights (d p s_l^2 floats per level and tensor: the top level's s_L^2 is
        // about the grid's longer side squared) outgrow a binding before a head does: the error
        // comes when the attention is made, or else from the plan.
        (
            FmaConfig::new(4, 1)
                .grid(Some(grid))
                .downsample(Downsample::Learned(lw)),
            4,
            "earned",
        ),
    ] {
        let fma = match Attention::fma(small, cfg.clone()) {
            Ok(fma) => fma,
            Err(e) => {
                assert!(
                    matches!(&e, FmaError::LimitExceeded { what, .. } if what.contains(needle)),
                    "{cfg:?}: {e}"
                );
                continue;
            }
        };
        let problem = Problem::new(shape(d));
        let e = fma.check(&problem).unwrap_err();
        assert!(
            matches!(&e, FmaError::LimitExceeded { what, .. } if what.contains(needle)),
            "{cfg:?}: {e}"
        );
        let x = vec![0.25f32; shape(d).elements()];
        let copy = wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST;
        let bufs = Poisoned::with_usage(small, &x, &x, &x, shape(d), copy);
        let e = fma.forward(&problem, Resident(bufs.tensors())).unwrap_err();
        assert!(matches!(e, FmaError::LimitExceeded { .. }), "{cfg:?}: {e}");
        let e = fma
            .forward(&problem, Host::new(&x, &x, &x).without_lse())
            .unwrap_err();
        assert!(matches!(e, FmaError::LimitExceeded { .. }), "{cfg:?}: {e}");
        assert!(bufs.read(small).0.iter().all(|v| v.is_nan()));
    }
    // The backward splits a 2D head of fine queries in rows of cells too (its gradients are
    // checked in tests/gpu/grid_backward_split.rs); one of coarse queries, which the forward
    // splits, cannot train yet: a typed error that says so.
    let x = vec![0.25f32; shape(4).elements()];
    let fine = Attention::fma(small, FmaConfig::new(4, 1).grid(Some(grid))).unwrap();
    fine.train(&Problem::new(shape(4)), Host::new(&x, &x, &x))
        .expect("a split 2D head of fine queries trains");
    let coarse = FmaConfig::new(4, 2)
        .grid(Some(grid))
        .queries(Queries::Coarse);
    let e = Attention::fma(small, coarse)
        .unwrap()
        .train(&Problem::new(shape(4)), Host::new(&x, &x, &x))
        .err();
    assert!(
        matches!(&e, Some(FmaError::LimitExceeded { what, .. }) if what.contains("coarse queries")),
        "{e:?}"
    );
}
