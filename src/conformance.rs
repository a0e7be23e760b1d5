//! A fixed conformance suite: FMA and dense attention on a given adapter against the f64 CPU
//! reference, over shapes, masks, modes, 2D grids and the exactness property. `multipole-attn doctor`
//! runs it on every adapter found, so users can check their own GPU and driver.

pub mod report;

use serde::Serialize;

use crate::closeness::closeness;
use crate::config::{Downsample, FmaConfig, Queries};
use crate::cpu::{self, widen};
use crate::error::Result;
use crate::geometry::{flatten_far_field, Grid, Line};
use crate::gpu::{Attention, GpuContext, Host, Output};
use crate::method::Method;
use crate::plan::{DenseSplitPlan, KernelLimits};
use crate::problem::Problem;
use crate::random::normal_tensor;
use crate::shape::Shape;
use crate::variants::{Variants, Window};
use crate::weights::LearnedWeights;

/// |gpu - ref| <= ATOL + RTOL |ref|, the bound of the GPU tests (justified in
/// tests/gpu/forward.rs: f32 dot products and WGSL exp against an f64 reference).
pub const ATOL: f64 = 5e-5;
/// Relative part of the bound.
pub const RTOL: f64 = 5e-5;

/// The bound (absolute and relative) of dense attention on cooperative matrices
/// (`ContextOptions::cooperative_matrix`, `doctor --cooperative-matrix`): Q, K, V and the
/// probabilities enter the matrix multiply-adds rounded to f16 (relative 2^-11 each), so a
/// logit of |q.k| / sqrt(d) ~ 10 may be off by ~1e-2 and O and the LSE by about as much.
pub const COOP_TOL: f64 = 2e-2;

/// What one case runs.
#[derive(Clone, Debug)]
pub enum Check {
    /// FMA with this configuration against `cpu::forward` (O and LSE; 2D with `cfg.grid`).
    Fma(FmaConfig),
    /// Dense attention against `cpu::forward`.
    Dense,
    /// FMA against exact dense attention on query `row` of head 0, with K and V made constant
    /// on every sub-window that row's far lists use (algorithm.md §5: then FMA is exact).
    Exactness(FmaConfig, usize),
    /// FMA restricted to [`SPLIT_BINDING`] bytes per binding, so each head is cut along its
    /// sequence: against the reference, and bit for bit against the unrestricted run.
    SplitFma(FmaConfig),
    /// Dense attention restricted likewise: query and key chunk pairs.
    SplitDense,
}

/// The binding size of the split cases: 16 KiB, 256 rows of head_dim 16.
pub const SPLIT_BINDING: u64 = 16 << 10;

/// One conformance case.
#[derive(Clone, Debug)]
pub struct Case {
    /// A short name for the table.
    pub name: String,
    /// (batch, heads, seq, head_dim) and the mask.
    pub problem: Problem,
    /// What to check.
    pub check: Check,
}

/// The outcome of one case.
#[derive(Clone, Debug, Serialize)]
pub struct CaseResult {
    /// The case's name.
    pub name: String,
    /// Within the bound.
    pub passed: bool,
    /// Largest |gpu - reference| over O and the LSE (infinite for NaN; `null` in JSON).
    pub max_err: f64,
    /// Wall-clock seconds, pipeline builds included.
    pub seconds: f64,
    /// The error, if the run itself failed.
    pub error: Option<String>,
}

/// Learned weights that differ from the box initialisation (deterministic).
fn perturbed_weights(d: usize, m: usize, p: usize, n: usize, seed: u64) -> LearnedWeights {
    let mut w = LearnedWeights::box_init_for(d, m, p, n);
    for (l, lw) in w.levels.iter_mut().enumerate() {
        let scale = 0.5 / (m << l) as f32;
        for (buf, s, amp) in [
            (&mut lw.wk, 1, scale),
            (&mut lw.wv, 2, scale),
            (&mut lw.bk, 3, 0.1),
            (&mut lw.bv, 4, 0.1),
        ] {
            let noise = normal_tensor(seed + 10 * l as u64 + s, buf.len());
            buf.iter_mut().zip(noise).for_each(|(x, e)| *x += amp * e);
        }
    }
    w
}

/// 2D learned weights (algorithm.md §9: (d, p, s_l, s_l) per level) that differ from the box
/// initialisation: N(0, 0.5 / s_l^2) on every kernel (queries' too, for coarse queries) and
/// N(0, 0.1) on the biases, so a wrong tap index moves the result (deterministic).
fn perturbed_grid_weights(d: usize, r: usize, p: usize, grid: Grid, seed: u64) -> LearnedWeights {
    let mut w = LearnedWeights::box_init_grid_for(d, r, p, grid);
    for (l, lw) in w.levels.iter_mut().enumerate() {
        let taps = ((r << l) * (r << l)) as f32;
        for (buf, s, amp) in [
            (&mut lw.wk, 1, 0.5 / taps),
            (&mut lw.wv, 2, 0.5 / taps),
            (&mut lw.bk, 3, 0.1),
            (&mut lw.bv, 4, 0.1),
            (&mut lw.wq, 5, 0.5 / taps),
            (&mut lw.bq, 6, 0.1),
        ] {
            let noise = normal_tensor(seed + 10 * l as u64 + s, buf.len());
            buf.iter_mut().zip(noise).for_each(|(x, e)| *x += amp * e);
        }
    }
    w
}

/// The fixed suite (a few dozen cases, deterministic seeds). Head dimensions stay <= 64:
/// wgpu's GL backend on Mesa's llvmpipe spends minutes in LLVM's coroutine passes compiling the
/// d = 128 kernels (the Vulkan path of the same driver takes seconds), which would make the
/// doctor unusable there; d = 128 is covered by the GPU tests on Vulkan.
pub fn suite() -> Vec<Case> {
    let mut cases = Vec::new();
    let grid: [(usize, usize, usize, usize); 8] = [
        (1, 16, 16, 2),
        (7, 16, 4, 2),
        (97, 40, 16, 1),
        (256, 64, 64, 2),
        (1000, 16, 16, 4),
        (1025, 64, 64, 2),
        (333, 48, 16, 2),
        (2048, 40, 64, 4),
    ];
    for (i, &(n, d, m, p)) in grid.iter().enumerate() {
        for causal in [false, true] {
            for learned in [false, true] {
                let mode = if learned {
                    Downsample::Learned(perturbed_weights(d, m, p, n, i as u64))
                } else {
                    Downsample::Average
                };
                let cfg = FmaConfig::new(m, p).downsample(mode);
                let name = format!(
                    "fma n={n} d={d} m={m} p={p} {} {}",
                    if causal { "causal" } else { "bidir" },
                    if learned { "learned" } else { "average" }
                );
                cases.push(Case {
                    name,
                    problem: Problem::new(Shape::new(1, 2, n, d)).causal(causal),
                    check: Check::Fma(cfg),
                });
            }
        }
    }
    cases.push(Case {
        name: "fma no count correction n=500".into(),
        problem: Problem::new(Shape::new(2, 1, 500, 32)),
        check: Check::Fma(FmaConfig::new(16, 2).count_correction(false)),
    });
    cases.push(Case {
        name: "fma 2 query tiles per block m=300".into(),
        problem: Problem::new(Shape::new(1, 1, 1100, 16)),
        check: Check::Fma(FmaConfig::new(300, 3)),
    });
    for &(n, d, causal) in &[
        (1, 16, false),
        (97, 40, true),
        (1025, 64, false),
        (700, 64, true),
    ] {
        cases.push(Case {
            name: format!(
                "dense n={n} d={d} {}",
                if causal { "causal" } else { "bidir" }
            ),
            problem: Problem::new(Shape::new(1, 2, n, d)).causal(causal),
            check: Check::Dense,
        });
    }
    // Heads of 1025 x 16 (65.6 KB) under 16 KiB bindings: 6 chunks of 192 tokens (FMA), 5 of
    // 256 (dense).
    let split = Shape::new(1, 2, 1025, 16);
    for (name, cfg, causal) in [
        ("bidir", FmaConfig::new(32, 2), false),
        ("causal", FmaConfig::new(32, 1), true),
        (
            "coarse queries",
            FmaConfig::new(32, 2).queries(Queries::Coarse),
            false,
        ),
    ] {
        cases.push(Case {
            name: format!("fma split head n=1025 d=16 m=32 {name}"),
            problem: Problem::new(split).causal(causal),
            check: Check::SplitFma(cfg),
        });
    }
    for causal in [false, true] {
        cases.push(Case {
            name: format!(
                "dense split head n=1025 d=16 {}",
                if causal { "causal" } else { "bidir" }
            ),
            problem: Problem::new(split).causal(causal),
            check: Check::SplitDense,
        });
    }
    // 2D FMA (algorithm.md §9) on grids with clipped cells at the bottom and right edges and
    // non-square levels: 7 x 5 with cells 2 x 2 (one coarse level), 33 x 20 with cells 4 x 4
    // (three levels), fine and coarse queries, Average and Learned. Small, since the browser
    // runs the suite on SwiftShader: 35 and 660 tokens, 2 heads. One head_dim (16) for all of
    // them: each head_dim compiles a full set of grid pipelines, which costs minutes on GL.
    for (i, (h, w, d, r, p, coarse, learned)) in [
        (7, 5, 16, 2, 2, false, false),
        (7, 5, 16, 2, 1, true, true),
        (33, 20, 16, 4, 2, false, false),
        (33, 20, 16, 4, 2, false, true),
        (33, 20, 16, 4, 2, true, false),
        (33, 20, 16, 4, 4, true, true),
    ]
    .into_iter()
    .enumerate()
    {
        let grid = Grid::new(h, w);
        let mode = if learned {
            Downsample::Learned(perturbed_grid_weights(d, r, p, grid, 100 + i as u64))
        } else {
            Downsample::Average
        };
        let queries = if coarse {
            Queries::Coarse
        } else {
            Queries::Fine
        };
        cases.push(Case {
            name: format!(
                "fma grid {grid} d={d} r={r} p={p} {} queries {}",
                if coarse { "coarse" } else { "fine" },
                if learned { "learned" } else { "average" }
            ),
            problem: Problem::new(Shape::new(1, 2, h * w, d)),
            check: Check::Fma(
                FmaConfig::new(r, p)
                    .grid(Some(grid))
                    .queries(queries)
                    .downsample(mode),
            ),
        });
    }
    // The softmax variants (docs/variants.md), one case each (each is its own pipelines, which
    // cost the browser's and GL's compilers most of a case's time): 97 tokens, 4 query heads on
    // 2 K/V heads; FMA with the cap and the window, dense with the sinks.
    let gqa = Shape::new(1, 4, 97, 16).with_kv_heads(2);
    let plain = Variants::default;
    for (name, causal, variants, check) in [
        (
            "softcap",
            true,
            Variants {
                softcap: Some(2.0),
                ..plain()
            },
            Check::Fma(FmaConfig::new(16, 2)),
        ),
        (
            "sinks",
            false,
            Variants {
                sinks: Some(vec![0.5, -1.0, 1.5, 0.0]),
                ..plain()
            },
            Check::Dense,
        ),
        (
            "window (12, 0)",
            true,
            Variants {
                window: Some(Window { left: 12, right: 0 }),
                ..plain()
            },
            Check::Fma(FmaConfig::new(16, 2)),
        ),
    ] {
        let mask = if causal { "causal" } else { "bidir" };
        let method = if matches!(check, Check::Dense) {
            "dense"
        } else {
            "fma m=16"
        };
        cases.push(Case {
            name: format!("{method} {name} n=97 {mask}"),
            problem: Problem::new(gqa).causal(causal).variants(variants),
            check,
        });
    }
    for &(n, m, p, causal, row) in &[
        (512, 16, 2, false, 200),
        (1000, 16, 4, true, 999),
        (1025, 8, 2, false, 3),
    ] {
        cases.push(Case {
            name: format!(
                "exactness n={n} m={m} p={p} {} row {row}",
                if causal { "causal" } else { "bidir" }
            ),
            problem: Problem::new(Shape::new(1, 1, n, 16)).causal(causal),
            check: Check::Exactness(FmaConfig::new(m, p), row),
        });
    }
    cases
}

/// The largest error and whether every element is within [`ATOL`] + [`RTOL`] |ref| (a missing
/// element, such as an LSE that was not returned, fails).
fn max_err(gpu: &[f32], reference: &[f64]) -> (f64, bool) {
    max_err_within(gpu, reference, ATOL, RTOL)
}

/// [`max_err`] with the bound `atol` + `rtol` |ref|.
fn max_err_within(gpu: &[f32], reference: &[f64], atol: f64, rtol: f64) -> (f64, bool) {
    let c = closeness(gpu, reference, atol, rtol);
    (c.max_abs, c.passed())
}

async fn run_case(ctx: &GpuContext, case: &Case, seed: u64) -> Result<(f64, bool)> {
    let p = &case.problem;
    let s = p.shape;
    let q = normal_tensor(seed, s.elements());
    let mut k = normal_tensor(seed + 1, s.kv_elements());
    let mut v = normal_tensor(seed + 2, s.kv_elements());
    let method = match &case.check {
        Check::Fma(cfg) | Check::SplitFma(cfg) | Check::Exactness(cfg, _) => {
            Method::Fma(cfg.clone())
        }
        Check::Dense | Check::SplitDense => Method::Dense,
    };
    let attention = |limit| Attention::new(ctx, method.clone())?.max_binding(limit);
    let reference =
        |q: &[f32], k: &[f32], v: &[f32]| cpu::forward(&method, p, &widen(q), &widen(k), &widen(v));
    // Dense attention of whole heads runs on cooperative matrices where the context has them
    // (f16 inputs: the looser bound); split heads run the plain kernel.
    let coop = ctx.cooperative_matrix().is_some() && matches!(method, Method::Dense);
    let (atol, rtol) = if coop {
        (COOP_TOL, COOP_TOL)
    } else {
        (ATOL, RTOL)
    };
    let compare = |g: &Output, r: &cpu::Reference| {
        let (eo, ok_o) = max_err_within(&g.o, &r.o, atol, rtol);
        let (el, ok_l) = max_err_within(g.lse.as_deref().unwrap_or(&[]), &r.lse, atol, rtol);
        (eo.max(el), ok_o && ok_l)
    };
    match &case.check {
        Check::Fma(_) | Check::Dense => {
            let g = attention(u64::MAX)?
                .forward_async(p, Host::new(&q, &k, &v))
                .await?;
            Ok(compare(&g, &reference(&q, &k, &v)?))
        }
        Check::SplitFma(_) => {
            let g = attention(SPLIT_BINDING)?
                .forward_async(p, Host::new(&q, &k, &v))
                .await?;
            let whole = attention(u64::MAX)?
                .forward_async(p, Host::new(&q, &k, &v))
                .await?;
            let (err, ok) = compare(&g, &reference(&q, &k, &v)?);
            let same = g.o == whole.o && g.lse == whole.lse;
            Ok((err, ok && same))
        }
        Check::SplitDense => {
            let g = attention(SPLIT_BINDING)?
                .forward_async(p, Host::new(&q, &k, &v))
                .await?;
            // Each key chunk of the split run ends the rows as a partial (O, LSE) that the next
            // resumes from; an unsplit run with its key chunks at the same boundaries does the
            // same float operations, so the two agree to the bit.
            let limits = KernelLimits::from_wgpu(&ctx.limits).capped(SPLIT_BINDING);
            let keys = DenseSplitPlan::new(s.seq, s.head_dim, p.causal, &limits)?.chunks[0].1;
            let whole = attention(u64::MAX)?
                .keys_per_dispatch(keys)?
                .forward_async(p, Host::new(&q, &k, &v))
                .await?;
            // The split run (plain kernel) against the reference at the plain bound; the bit
            // comparison holds only when the whole run is the plain kernel too.
            let r = reference(&q, &k, &v)?;
            let (eo, ok_o) = max_err(&g.o, &r.o);
            let (el, ok_l) = max_err(g.lse.as_deref().unwrap_or(&[]), &r.lse);
            let same = coop || (g.o == whole.o && g.lse == whole.lse);
            Ok((eo.max(el), ok_o && ok_l && same))
        }
        Check::Exactness(cfg, row) => {
            let geometry = Line::new(s.seq, cfg.block, cfg.rank, p.causal);
            flatten_far_field(&mut k, &mut v, &geometry, s.head_dim, *row);
            let g = attention(u64::MAX)?
                .forward_async(p, Host::new(&q, &k, &v).without_lse())
                .await?;
            let (exact, _) = cpu::dense_attention_rows(
                &widen(&q),
                &widen(&k),
                &widen(&v),
                s,
                p.causal,
                &[*row],
            )?;
            let d = s.head_dim;
            Ok(max_err(&g.o[row * d..(row + 1) * d], &exact))
        }
    }
}

/// Runs every case of [`suite`] on `ctx`, in order, calling `progress` after each; a case whose
/// run fails is a failed case.
#[cfg(not(target_arch = "wasm32"))]
pub async fn run_suite(ctx: &GpuContext, progress: impl FnMut(&CaseResult)) -> Vec<CaseResult> {
    let start = std::time::Instant::now();
    run_suite_with_clock(ctx, &|| start.elapsed().as_secs_f64(), progress).await
}

/// [`run_suite`] with a clock in seconds (`performance.now() / 1000` in the browser, where
/// `std::time::Instant` panics).
pub async fn run_suite_with_clock(
    ctx: &GpuContext,
    now: &dyn Fn() -> f64,
    mut progress: impl FnMut(&CaseResult),
) -> Vec<CaseResult> {
    let mut out = Vec::new();
    for (i, case) in suite().iter().enumerate() {
        let t = now();
        let r = run_case(ctx, case, 1000 + 17 * i as u64).await;
        let seconds = now() - t;
        let result = match r {
            Ok((max_err, passed)) => CaseResult {
                name: case.name.clone(),
                passed,
                max_err,
                seconds,
                error: None,
            },
            Err(e) => CaseResult {
                name: case.name.clone(),
                passed: false,
                max_err: f64::INFINITY,
                seconds,
                error: Some(e.to_string()),
            },
        };
        progress(&result);
        out.push(result);
    }
    out
}
