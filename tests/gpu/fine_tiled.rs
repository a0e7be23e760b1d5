//! FMA's fused fine-query pass in FlashAttention-2's shape (`shaders/fine_attention_tiled.wgsl`,
//! `FmaKernel::Tiled`, issue 29), forced on lavapipe (`Attention::fma_kernel`), against the f64
//! CPU reference and against the rows kernel (the CPU adapters' default, itself checked against
//! the reference by `forward.rs`), on random inputs with fresh seeds (printed) through
//! NaN-poisoned output buffers; every case checks that the plan runs the tiled pass.
//!
//! Tolerances: against the reference, `forward.rs`'s (5e-5 + 5e-5 |ref| on O, 5e-5 + 1e-5 |ref|
//! on the LSE; its header says why). Against the rows kernel, 1e-5 + 1e-5 |rows| on O and
//! 1e-5 + 1e-6 |rows| on the LSE: both kernels compute each score as the same f32 vec4 dot
//! product in the same order and differ only in where key tiles cut the online softmax's
//! rescaling and in the order their positive terms are added (per lane, then over 16 lanes):
//! a few ulps of O(1) values over a few hundred terms (measured 1e-7 .. 1e-6), ten times under
//! the bound, and far under what a key seen twice, missed or at the wrong level does (1e-2).
//!
//! Sizes stay small: the tiled kernel costs ~4x the rows kernel on lavapipe (docs/perf.md,
//! change 29), and each (head_dim, block, variants) is a pipeline to build.

use crate::common::{
    browser_like_gpu, closeness, gpu, gpu_with_binding_limit, random_learned, Poisoned,
};
use crate::grid::random_grid_weights;
use multipole_attn::cpu::{self, widen};
use multipole_attn::gpu::{Attention, GpuContext, Host, HostGrad, Resident};
use multipole_attn::plan::{FmaKernel, Pass};
use multipole_attn::random::{fresh_seed, normal_tensor};
use multipole_attn::storage::round_to_f16;
use multipole_attn::{
    Downsample, FmaConfig, Grid, Method, Problem, Queries, Sequences, Shape, Storage, Variants,
    Window,
};

const O_ATOL: f64 = 5e-5;
const O_RTOL: f64 = 5e-5;
const LSE_ATOL: f64 = 5e-5;
const LSE_RTOL: f64 = 1e-5;
/// Against the rows kernel (module header).
const KERNELS_ATOL: f64 = 1e-5;
const KERNELS_O_RTOL: f64 = 1e-5;
const KERNELS_LSE_RTOL: f64 = 1e-6;

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

/// FMA of `cfg` with the fused pass of shape `kernel` on `ctx`.
fn fma(ctx: &GpuContext, cfg: &FmaConfig, kernel: FmaKernel) -> Attention {
    Attention::fma(ctx, cfg.clone())
        .and_then(|a| a.fma_kernel(kernel))
        .unwrap()
}

/// O and the LSE of `p` through NaN-poisoned caller buffers.
fn run(ctx: &GpuContext, a: &Attention, x: &Inputs, p: &Problem) -> (Vec<f32>, Vec<f32>) {
    let shape = p.shape;
    let bufs = Poisoned::new(ctx, &x.q, &x.k, &x.v, shape);
    a.forward(p, Resident(bufs.tensors()))
        .unwrap_or_else(|e| panic!("{shape}: {e}"));
    let (o, lse) = bufs.read(ctx);
    (o[..shape.elements()].to_vec(), lse[..shape.rows()].to_vec())
}

/// The pass `a`'s plan of `p` runs for the fine queries.
fn fine_pass(a: &Attention, p: &Problem) -> Pass {
    a.plan(p).unwrap().fma().unwrap().attention.pass
}

/// Checks the tiled kernel on `p` against the reference and the rows kernel; returns the
/// largest |tiled - reference| on O.
fn check(ctx: &GpuContext, seed: u64, p: &Problem, cfg: &FmaConfig) -> f64 {
    let shape = p.shape;
    let label = format!(
        "seed {seed} {shape} m={} p={} causal={} {:?} {:?} grid {:?} seqs {:?}",
        cfg.block,
        cfg.rank,
        p.causal,
        cfg.queries,
        std::mem::discriminant(&cfg.downsample),
        cfg.grid,
        p.sequences.as_ref().map(|s| s.lengths.clone()),
    );
    let started = std::time::Instant::now();
    let x = inputs(seed, shape);
    let tiled = fma(ctx, cfg, FmaKernel::Tiled);
    assert_eq!(fine_pass(&tiled, p), Pass::FineTiled, "{label}");
    let (o, lse) = run(ctx, &tiled, &x, p);

    let method = Method::Fma(cfg.clone());
    let r = cpu::forward(&method, p, &widen(&x.q), &widen(&x.k), &widen(&x.v)).unwrap();
    let co = closeness(&o, &r.o, O_ATOL, O_RTOL);
    assert_eq!(co.violations, 0, "{label}: O {co:?}");
    let cl = closeness(&lse, &r.lse, LSE_ATOL, LSE_RTOL);
    assert_eq!(cl.violations, 0, "{label}: LSE {cl:?}");

    let rows = fma(ctx, cfg, FmaKernel::Rows);
    assert_eq!(fine_pass(&rows, p), Pass::FineAttention, "{label}");
    let (ro, rl) = run(ctx, &rows, &x, p);
    let widened = |v: &[f32]| v.iter().map(|&x| x as f64).collect::<Vec<f64>>();
    let ko = closeness(&o, &widened(&ro), KERNELS_ATOL, KERNELS_O_RTOL);
    assert_eq!(
        ko.violations, 0,
        "{label}: O against the rows kernel {ko:?}"
    );
    let kl = closeness(&lse, &widened(&rl), KERNELS_ATOL, KERNELS_LSE_RTOL);
    assert_eq!(
        kl.violations, 0,
        "{label}: LSE against the rows kernel {kl:?}"
    );
    eprintln!(
        "{label}: |O - ref| {:.1e}, |O - rows| {:.1e} ({:.1} s)",
        co.max_abs,
        ko.max_abs,
        started.elapsed().as_secs_f64()
    );
    co.max_abs
}

/// 1D, both masks, Average and Learned: the awkward lengths, and blocks of 16 to 128 queries
/// with head dimensions 3 to 128 (a block of 128 at d = 128 is 8 tiles of 16 rows on lavapipe;
/// d = 3 and 40 pad the last vec4; m = 24 is not a power of two).
#[test]
fn the_tiled_pass_matches_the_reference_and_the_rows_kernel_in_1d() {
    let Some(ctx) = gpu() else { return };
    let seed = fresh_seed();
    eprintln!("seed {seed}");
    let cases: [(usize, usize, usize, usize, usize); 8] = [
        // (n, d, m, p, heads)
        (1, 16, 16, 2, 2),
        (97, 8, 16, 2, 3),
        (1025, 16, 16, 2, 1),
        (300, 32, 32, 4, 2),
        (400, 64, 64, 2, 1),
        (300, 128, 128, 2, 1),
        (250, 40, 24, 2, 2),
        (130, 3, 32, 1, 2),
    ];
    for (i, &(n, d, m, p, heads)) in cases.iter().enumerate() {
        for causal in [false, true] {
            let s = seed.wrapping_add(7919 * (2 * i as u64 + causal as u64));
            let downsample = if (i + causal as usize).is_multiple_of(2) {
                Downsample::Average
            } else {
                Downsample::Learned(random_learned(s, d, m, p, n))
            };
            let cfg = FmaConfig::new(m, p).downsample(downsample);
            check(
                ctx,
                s,
                &Problem::new(Shape::new(1, heads, n, d)).causal(causal),
                &cfg,
            );
        }
    }
}

/// 2D grids (bidirectional): fine and coarse queries, Average and Learned, cells of 4 and 8
/// (16 and 64 queries per block), a grid not a multiple of the cell; coarse queries in 1D.
#[test]
fn the_tiled_pass_runs_2d_grids_and_coarse_queries() {
    let Some(ctx) = gpu() else { return };
    let seed = fresh_seed();
    eprintln!("seed {seed}");
    for (i, (h, w, r, d)) in [(21, 23, 4, 16), (30, 17, 8, 32)].into_iter().enumerate() {
        for queries in [Queries::Fine, Queries::Coarse] {
            let s = seed.wrapping_add(31 * i as u64 + queries as u64);
            let n = h * w;
            let downsample = if queries == Queries::Fine {
                Downsample::Average
            } else {
                Downsample::Learned(random_grid_weights(s, d, r, 2, Grid::new(h, w)))
            };
            let cfg = FmaConfig::new(r, 2)
                .grid(Some(Grid::new(h, w)))
                .queries(queries)
                .downsample(downsample);
            check(ctx, s, &Problem::new(Shape::new(1, 2, n, d)), &cfg);
        }
    }
    for (i, n) in [97, 1025].into_iter().enumerate() {
        let s = seed.wrapping_add(1000 + i as u64);
        let cfg = FmaConfig::new(16, 2).queries(Queries::Coarse);
        check(ctx, s, &Problem::new(Shape::new(1, 2, n, 16)), &cfg);
    }
}

/// Grouped-query and multi-query heads, and variable-length batches (packed, both masks, with
/// sequences shorter than a block and longer than several).
#[test]
fn the_tiled_pass_runs_grouped_heads_and_variable_lengths() {
    let Some(ctx) = gpu() else { return };
    let seed = fresh_seed();
    eprintln!("seed {seed}");
    for (i, kv_heads) in [2, 1].into_iter().enumerate() {
        let shape = Shape::new(2, 4, 200, 16).with_kv_heads(kv_heads);
        let cfg = FmaConfig::new(16, 2);
        check(
            ctx,
            seed + i as u64,
            &Problem::new(shape).causal(i == 0),
            &cfg,
        );
    }
    let seqs = Sequences::packed(vec![1, 7, 97, 300]).unwrap();
    for causal in [false, true] {
        let p = Problem {
            sequences: Some(seqs.clone()),
            ..Problem::new(seqs.shape(2, 1, 16)).causal(causal)
        };
        check(ctx, seed + 10 + causal as u64, &p, &FmaConfig::new(16, 2));
    }
}

/// The softmax variants: softcap and sinks together (both masks), and a window with Learned
/// downsampling (Average with a window runs on dense attention's banded kernel instead).
#[test]
fn the_tiled_pass_runs_softcap_sinks_and_windows() {
    let Some(ctx) = gpu() else { return };
    let seed = fresh_seed();
    eprintln!("seed {seed}");
    let shape = Shape::new(1, 3, 333, 16);
    for causal in [false, true] {
        let variants = Variants {
            softcap: Some(4.0),
            sinks: Some(vec![0.5, -1.0, 2.0]),
            ..Variants::default()
        };
        let p = Problem::new(shape).causal(causal).variants(variants);
        check(ctx, seed + causal as u64, &p, &FmaConfig::new(16, 2));
    }
    let window = Variants {
        window: Some(Window { left: 20, right: 0 }),
        sinks: Some(vec![0.0, 1.0, -0.5]),
        ..Variants::default()
    };
    let learned = Downsample::Learned(random_learned(seed, 16, 32, 2, shape.seq));
    let cfg = FmaConfig::new(32, 2).downsample(learned);
    let p = Problem::new(shape).causal(true).variants(window);
    check(ctx, seed + 2, &p, &cfg);
}

/// A browser's limits (16 KiB of workgroup memory, no subgroups): blocks of 64 queries in tiles
/// of 16 rows at d = 64 (four per block), and the rows kernel where no tile fits (d = 128).
#[test]
fn browser_limits_run_small_tiles_or_the_rows_kernel() {
    let Some(ctx) = browser_like_gpu() else {
        return;
    };
    let seed = fresh_seed();
    eprintln!("seed {seed}");
    let p = Problem::new(Shape::new(1, 2, 300, 64)).causal(true);
    let cfg = FmaConfig::new(64, 2);
    let tiled = fma(ctx, &cfg, FmaKernel::Tiled);
    let plan = tiled.plan(&p).unwrap();
    let fine = plan.fma().unwrap();
    assert_eq!((fine.attention.spec.wg, fine.tiles_per_block), (16, 4));
    check(ctx, seed, &p, &cfg);
    let wide = Problem::new(Shape::new(1, 1, 100, 128));
    assert_eq!(fine_pass(&tiled, &wide), Pass::FineAttention);
}

/// A head over one storage binding, split along its sequence (and, at m = 4, with its coarse
/// rows through compact bindings): the tiled pass's chunks equal its unsplit run to the bit,
/// and the reference within the tolerance.
#[test]
fn a_split_head_runs_the_tiled_pass_to_the_bit() {
    let Some(shared) = gpu() else { return };
    let seed = fresh_seed();
    eprintln!("seed {seed}");
    let small = gpu_with_binding_limit(16 << 10);
    for (cfg, shape, causal) in [
        (FmaConfig::new(16, 2), Shape::new(1, 2, 1025, 16), true),
        (
            FmaConfig::new(16, 2).queries(Queries::Coarse),
            Shape::new(1, 1, 1000, 16),
            false,
        ),
        (FmaConfig::new(4, 2), Shape::new(1, 1, 3000, 8), false),
    ] {
        let p = Problem::new(shape).causal(causal);
        let x = inputs(seed, shape);
        let split = fma(&small, &cfg, FmaKernel::Tiled)
            .forward(&p, Host::new(&x.q, &x.k, &x.v))
            .unwrap();
        let whole = fma(shared, &cfg, FmaKernel::Tiled)
            .forward(&p, Host::new(&x.q, &x.k, &x.v))
            .unwrap();
        let label = format!("seed {seed} {cfg:?} {shape} causal {causal}");
        assert!(
            split.o == whole.o && split.lse == whole.lse,
            "{label}: the split run differs from the unsplit one"
        );
        let method = Method::Fma(cfg.clone());
        let r = cpu::forward(&method, &p, &widen(&x.q), &widen(&x.k), &widen(&x.v)).unwrap();
        let c = closeness(&split.o, &r.o, O_ATOL, O_RTOL);
        assert_eq!(c.violations, 0, "{label}: O {c:?}");
        let c = closeness(split.lse.as_deref().unwrap(), &r.lse, LSE_ATOL, LSE_RTOL);
        assert_eq!(c.violations, 0, "{label}: LSE {c:?}");
    }
}

/// The training forward runs the tiled pass too (its O and LSE are the forward's, to the bit),
/// the backward from them agrees with the rows kernel's, and the pass is deterministic.
#[test]
fn training_keeps_the_tiled_forward_and_its_backward_agrees() {
    let Some(ctx) = gpu() else { return };
    let seed = fresh_seed();
    eprintln!("seed {seed}");
    let shape = Shape::new(1, 2, 200, 16);
    let p = Problem::new(shape).causal(true);
    let cfg = FmaConfig::new(16, 2);
    let x = inputs(seed, shape);
    let dout = normal_tensor(seed + 7, shape.elements());
    let host = || Host::new(&x.q, &x.k, &x.v);
    let tiled = fma(ctx, &cfg, FmaKernel::Tiled);
    let forward = tiled.forward(&p, host()).unwrap();
    let again = tiled.forward(&p, host()).unwrap();
    assert!(
        forward.o == again.o && forward.lse == again.lse,
        "seed {seed}: not deterministic"
    );
    let (out, saved) = tiled.train(&p, host()).unwrap();
    assert!(
        out.o == forward.o && out.lse == forward.lse,
        "seed {seed}: the training forward is not the tiled forward"
    );
    let g = tiled.backward(&saved, HostGrad(&dout)).unwrap();
    let rows = fma(ctx, &cfg, FmaKernel::Rows);
    let (_, saved_rows) = rows.train(&p, host()).unwrap();
    let gr = rows.backward(&saved_rows, HostGrad(&dout)).unwrap();
    // The gradients differ only through O and the LSE (within 1e-6 of each other): dQ, dK, dV
    // are O(1) sums of a few hundred terms, so 1e-4 absolute is a wide bound.
    for (name, a, b) in [
        ("dq", &g.dq, &gr.dq),
        ("dk", &g.dk, &gr.dk),
        ("dv", &g.dv, &gr.dv),
    ] {
        let wide: Vec<f64> = b.iter().map(|&v| v as f64).collect();
        let c = closeness(a, &wide, 1e-4, 1e-4);
        assert_eq!(c.violations, 0, "seed {seed}: {name} {c:?}");
    }
}

/// f16 storage (issue 29): the tiled pass composed for f16 Q, K, V and O differs from its f32
/// variant in its loads and stores only, so on f16 inputs its O is the f32 tiled pass's O
/// rounded to f16, bit for bit, and its LSE (f32) equal (as `f16.rs` checks of the rows kernel).
#[test]
fn f16_storage_runs_the_tiled_pass_as_its_f32_variant_rounded() {
    let Some(ctx) = gpu() else { return };
    let seed = fresh_seed();
    eprintln!("seed {seed}");
    let cfg = FmaConfig::new(16, 2);
    let Ok(half) = Attention::fma(ctx, cfg.clone())
        .and_then(|a| a.storage(Storage::F16))
        .and_then(|a| a.fma_kernel(FmaKernel::Tiled))
    else {
        eprintln!("skipping: no SHADER_F16");
        return;
    };
    let full = fma(ctx, &cfg, FmaKernel::Tiled);
    for causal in [false, true] {
        let shape = Shape::new(1, 2, 300, 24);
        let p = Problem::new(shape).causal(causal);
        assert_eq!(fine_pass(&half, &p), Pass::FineTiled);
        let x = inputs(seed + causal as u64, shape);
        let (q, k, v) = (round_to_f16(&x.q), round_to_f16(&x.k), round_to_f16(&x.v));
        let o16 = half.forward(&p, Host::new(&q, &k, &v)).unwrap();
        let o32 = full.forward(&p, Host::new(&q, &k, &v)).unwrap();
        let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        let label = format!("seed {seed} causal {causal}");
        assert_eq!(bits(&o16.o), bits(&round_to_f16(&o32.o)), "{label}: O");
        assert_eq!(o16.lse, o32.lse, "{label}: LSE");
    }
}
