//! Coarse-query FMA (algorithm.md §6) on the GPU against the f64 CPU reference, on random inputs
//! with fresh seeds (printed; replay with MULTIPOLE_SEED), output buffers poisoned with NaN.
//!
//! Tolerance: the same as `gpu_forward.rs`, |gpu - ref| <= 5e-5 + 5e-5 |ref| for O and
//! 5e-5 + 1e-5 |ref| for the LSE, for the same reasons: N(0, 1) inputs, f32 dot products of
//! d <= 128 terms (relative error ~ sqrt(d) 6e-8), WGSL's exp/log within a few ulp, sums of a
//! few hundred positive terms. The coarse variant adds one f32 pooling of the queries (a mean
//! or a dot product of w_l terms, relative error ~ 1e-7 per level) and the log-sum-exp merge of
//! at most L + 1 partials (a few ulp each): still a few 1e-6 at worst, ~10x below the bound.
//! Any indexing error (a token taking a neighbour's coarse query, a level dropped, the count
//! correction missing) moves O by 1e-2 or more (`coarse_differs_from_fine`).

use crate::common::{browser_like_gpu, closeness, gpu, random_learned, Poisoned};
use multipole_attn::cpu::{self, widen};
use multipole_attn::gpu::{Attention, GpuContext, Host, Plan, Resident};
use multipole_attn::levels::{far_list, sub_window, Levels};
use multipole_attn::random::{fresh_seed, normal_tensor};
use multipole_attn::{Downsample, FmaConfig, FmaError, LearnedWeights, Problem, Queries, Shape};

const O_ATOL: f64 = 5e-5;
const O_RTOL: f64 = 5e-5;
const LSE_ATOL: f64 = 5e-5;
const LSE_RTOL: f64 = 1e-5;

fn coarse(m: usize, p: usize) -> FmaConfig {
    FmaConfig::new(m, p).queries(Queries::Coarse)
}

fn inputs(seed: u64, shape: Shape) -> [Vec<f32>; 3] {
    [
        normal_tensor(seed, shape.elements()),
        normal_tensor(seed ^ 0x9e37_79b9, shape.elements()),
        normal_tensor(seed ^ 0x7f4a_7c15, shape.elements()),
    ]
}

/// Runs `cfg` on the GPU through caller buffers poisoned with NaN; returns (O, LSE).
fn run_gpu(ctx: &GpuContext, x: &[Vec<f32>; 3], shape: Shape, cfg: &FmaConfig) -> [Vec<f32>; 2] {
    let fma = Attention::fma(ctx, cfg.clone()).unwrap_or_else(|e| panic!("{shape}: {e}"));
    let bufs = Poisoned::new(ctx, &x[0], &x[1], &x[2], shape);
    fma.forward(&Problem::new(shape), Resident(bufs.tensors()))
        .unwrap_or_else(|e| panic!("{shape}: {e}"));
    let (o, lse) = bufs.read(ctx);
    [o[..shape.elements()].to_vec(), lse[..shape.rows()].to_vec()]
}

/// GPU against the CPU reference; returns the worst |O err| and |LSE err|.
fn check(
    ctx: &GpuContext,
    x: &[Vec<f32>; 3],
    shape: Shape,
    cfg: &FmaConfig,
    label: &str,
) -> (f64, f64) {
    let [o, lse] = run_gpu(ctx, x, shape, cfg);
    let r = cpu::fma_forward(&widen(&x[0]), &widen(&x[1]), &widen(&x[2]), shape, cfg).unwrap();
    let co = closeness(&o, &r.o, O_ATOL, O_RTOL);
    let cl = closeness(&lse, &r.lse, LSE_ATOL, LSE_RTOL);
    assert_eq!(co.violations, 0, "{label}: O {co:?}");
    assert_eq!(cl.violations, 0, "{label}: LSE {cl:?}");
    (co.max_abs, cl.max_abs)
}

#[test]
fn coarse_matches_reference_over_the_shape_grid() {
    let Some(ctx) = gpu() else { return };
    let seed = fresh_seed();
    eprintln!("seed {seed}");
    let ns = [1, 7, 97, 256, 1000, 1025, 4096];
    let ds = [16, 40, 64, 128];
    let ms = [4, 16, 64];
    let ps = [1, 2, 4];
    let mut worst = (0.0f64, 0.0f64);
    let mut case = 0usize;
    // Every n with both modes; d, m, p rotate so each value meets every n (as gpu_forward.rs).
    for (ni, &n) in ns.iter().enumerate() {
        for mode in 0..2 {
            let d = ds[(ni + case) % ds.len()];
            let m = ms[(ni + 2 * case) % ms.len()];
            let p = ps[(ni + case / 2) % ps.len()].min(m);
            let (batch, heads) = if n >= 1000 { (1, 2) } else { (2, 3) };
            let shape = Shape::new(batch, heads, n, d);
            let s = seed.wrapping_add(case as u64 * 7919);
            let downsample = if mode == 0 {
                Downsample::Average
            } else {
                Downsample::Learned(random_learned(s, d, m, p, n))
            };
            let cfg = coarse(m, p).downsample(downsample);
            let label = format!("seed {s} {shape} m={m} p={p} learned={}", mode == 1);
            let (eo, el) = check(ctx, &inputs(s, shape), shape, &cfg, &label);
            worst = (worst.0.max(eo), worst.1.max(el));
            case += 1;
        }
    }
    eprintln!(
        "{case} coarse cases, worst |O err| {:.2e}, worst |LSE err| {:.2e}",
        worst.0, worst.1
    );
}

#[test]
fn coarse_every_head_dim_block_and_rank_and_count_correction_off() {
    let Some(ctx) = gpu() else { return };
    let seed = fresh_seed();
    eprintln!("seed {seed}");
    for (i, &d) in [3, 59, 64].iter().enumerate() {
        for &(m, p) in &[(4, 4), (16, 1), (64, 2), (8, 8)] {
            let s = seed + (i * 100 + m * 10 + p) as u64;
            let shape = Shape::new(1, 1, 333, d);
            let x = inputs(s, shape);
            let label = format!("seed {s} d={d} m={m} p={p}");
            check(ctx, &x, shape, &coarse(m, p), &label);
            let off = coarse(m, p).count_correction(false);
            check(
                ctx,
                &x,
                shape,
                &off,
                &format!("{label} no count correction"),
            );
        }
    }
}

/// Q made constant on the top level's sub-window holding token i, and K, V constant on every
/// sub-window of i's far lists: then coarse queries are exact for row i (algorithm.md §6).
fn flatten_for(x: &mut [Vec<f32>; 3], levels: &Levels, d: usize, i: usize) {
    let (n, m, p) = (levels.n, levels.m, levels.p);
    let copy = |t: &mut Vec<f32>, from: usize, to: usize| {
        for c in 0..d {
            t[to * d + c] = t[from * d + c];
        }
    };
    if let Some(top) = levels.levels.last() {
        let w = top.window;
        for t in sub_window(n, m, p, top.level, i / w, (i % w) / (w / p)) {
            copy(&mut x[0], i, t);
        }
    }
    for lv in &levels.levels {
        for b in far_list(i / lv.window, false, lv.windows) {
            for j in 0..p {
                let s = sub_window(n, m, p, lv.level, b, j);
                for t in s.clone() {
                    copy(&mut x[1], s.start, t);
                    copy(&mut x[2], s.start, t);
                }
            }
        }
    }
}

#[test]
fn coarse_is_exact_against_dense_when_constant_on_the_sub_windows_used() {
    // The GPU's own exactness (not only agreement with the reference): row i of the coarse
    // variant equals exact dense attention, with the count correction, and not without it.
    let Some(ctx) = gpu() else { return };
    let seed = fresh_seed();
    eprintln!("seed {seed}");
    for &(n, m, p, learned) in &[(1000, 16, 2, false), (1024, 16, 4, true)] {
        let d = 32;
        let shape = Shape::new(1, 1, n, d);
        let levels = Levels::new(n, m, p);
        for (trial, i) in [3, n / 2 + 5, n - 2].into_iter().enumerate() {
            let s = seed + trial as u64;
            let mut x = inputs(s, shape);
            flatten_for(&mut x, &levels, d, i);
            let mode = if learned {
                Downsample::Learned(LearnedWeights::box_init_for(d, m, p, n))
            } else {
                Downsample::Average
            };
            let cfg = coarse(m, p).downsample(mode);
            let rows = [i];
            let (exact, exact_lse) = cpu::dense_attention_rows(
                &widen(&x[0]),
                &widen(&x[1]),
                &widen(&x[2]),
                shape,
                false,
                &rows,
            )
            .unwrap();
            let [o, lse] = run_gpu(ctx, &x, shape, &cfg);
            let c = closeness(&o[i * d..(i + 1) * d], &exact, O_ATOL, O_RTOL);
            assert_eq!(c.violations, 0, "seed {s} n={n} i={i}: {c:?}");
            assert!(
                (lse[i] as f64 - exact_lse[0]).abs() < LSE_ATOL + LSE_RTOL * exact_lse[0].abs()
            );
            let [o0, _] = run_gpu(ctx, &x, shape, &cfg.clone().count_correction(false));
            let c0 = closeness(&o0[i * d..(i + 1) * d], &exact, O_ATOL, O_RTOL);
            assert!(
                c0.max_abs > 100.0 * O_ATOL,
                "seed {s} i={i}: uncorrected {c0:?}"
            );
        }
    }
}

#[test]
fn coarse_differs_from_fine() {
    // Guards the tolerance: a GPU coarse variant that silently ran fine queries (or dropped a
    // level) would be caught by the grid above, since the two differ by far more.
    let Some(ctx) = gpu() else { return };
    let seed = fresh_seed();
    let shape = Shape::new(1, 1, 1024, 32);
    let x = inputs(seed, shape);
    let [fine, _] = run_gpu(ctx, &x, shape, &FmaConfig::new(16, 2));
    let [crs, _] = run_gpu(ctx, &x, shape, &coarse(16, 2));
    let diff = fine
        .iter()
        .zip(&crs)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(
        diff as f64 > 100.0 * O_ATOL,
        "seed {seed}: coarse equals fine to {diff}"
    );
}

#[test]
fn causal_coarse_is_refused_with_a_typed_error() {
    let Some(ctx) = gpu() else { return };
    // The mask is the problem's: refused at the call, before any work.
    let p = Problem::new(Shape::new(1, 1, 64, 4)).causal(true);
    let x = vec![0.5f32; p.shape.elements()];
    let err = Attention::fma(ctx, coarse(16, 2))
        .unwrap()
        .forward(&p, Host::new(&x, &x, &x))
        .expect_err("causal + coarse must be refused");
    assert!(matches!(err, FmaError::CausalCoarseQueries), "{err}");
    assert!(err.to_string().contains("bidirectional only"), "{err}");
}

#[test]
fn coarse_host_api_matches_buffer_api_and_folds_many_heads() {
    let Some(ctx) = gpu() else { return };
    let seed = fresh_seed();
    // 14000 heads of n = 9, m = 2: over 65535 workgroups in the near-field and merge passes.
    let shape = Shape::new(2, 7000, 9, 8);
    let cfg = coarse(2, 2);
    let fma = Attention::fma(ctx, cfg.clone()).unwrap();
    let Plan::Fma(plan) = fma.plan(&Problem::new(shape)).unwrap() else {
        panic!("not an FMA plan")
    };
    assert!(plan.attention.workgroups > 65535);
    let x = inputs(seed, shape);
    check(ctx, &x, shape, &cfg, &format!("seed {seed} many heads"));
    let shape = Shape::new(1, 2, 1000, 64);
    let x = inputs(seed, shape);
    let a = fma
        .forward(&Problem::new(shape), Host::new(&x[0], &x[1], &x[2]))
        .unwrap();
    let [o, lse] = run_gpu(ctx, &x, shape, &cfg);
    assert_eq!(a.o, o);
    assert_eq!(a.lse.unwrap(), lse);
}

#[test]
fn coarse_runs_under_browser_limits() {
    // 256 invocations and 16 KiB of workgroup memory: m = 512 splits a block into two query
    // tiles, p = 512 a window's coarse queries into two tiles of the coarse attention.
    let Some(ctx) = browser_like_gpu() else {
        return;
    };
    let seed = fresh_seed();
    eprintln!("seed {seed}");
    for &(n, d, m, p) in &[(1100, 128, 512, 4), (2100, 16, 512, 512), (777, 40, 300, 3)] {
        let shape = Shape::new(1, 2, n, d);
        let label = format!("seed {seed} {shape} m={m} p={p} (browser limits)");
        check(ctx, &inputs(seed, shape), shape, &coarse(m, p), &label);
    }
}
