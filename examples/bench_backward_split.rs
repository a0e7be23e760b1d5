//! What splitting one head's backward across storage bindings costs (issue 27): training
//! (`Attention::train` + `backward` on host tensors) of one head, 1D or on a 2D grid, unsplit
//! against split under a smaller binding (`Attention::max_binding`), in one process on one
//! context, runs interleaved (unsplit, split, unsplit, ...) so drift hits both; median wall
//! clock of `--reps` runs after a warm-up, and the split run's distance from the unsplit one.
//!
//! `cargo run --release --example bench_backward_split [-- --grids 128x128 --n 16384 --head-dim 32 --binding-kib 1024]`
//!
//! `--grids HxW,...` are 2D heads (cell side `--block`), `--n` 1D heads (block `--block-1d`);
//! the binding defaults to half a head's tensor, so each head is a few chunks.

use std::time::Instant;

use clap::Parser;
use indicatif::{ProgressBar, ProgressStyle};
use multipole_attn::gpu::{Attention, GpuContext, Host, HostGrad};
use multipole_attn::plan::{BackwardSplitPlan, KernelLimits};
use multipole_attn::random::normal_tensor;
use multipole_attn::{FmaConfig, Gradients, Grid, Problem, Shape};

#[derive(Parser)]
struct Args {
    /// 2D grids, HxW each.
    #[arg(long, value_delimiter = ',', default_value = "128x128")]
    grids: Vec<String>,
    /// 1D sequence lengths (none by default).
    #[arg(long, value_delimiter = ',')]
    n: Vec<usize>,
    /// Head dimension.
    #[arg(long, default_value_t = 32)]
    head_dim: usize,
    /// Cell side r of the grids.
    #[arg(long, default_value_t = 8)]
    block: usize,
    /// Block size m of the 1D heads.
    #[arg(long, default_value_t = 64)]
    block_1d: usize,
    /// Rank p.
    #[arg(long, default_value_t = 2)]
    rank: usize,
    /// Binding of the split runs in KiB [default: half a head's tensor].
    #[arg(long)]
    binding_kib: Option<u64>,
    /// Timed repetitions of each (median reported), after one warm-up of each.
    #[arg(long, default_value_t = 5)]
    reps: usize,
}

/// One training step's times in ms: (forward, backward), and its gradients.
fn step(fma: &Attention, p: &Problem, x: &[Vec<f32>; 4]) -> ((f64, f64), Gradients<f32>) {
    let t = Instant::now();
    let (_, saved) = fma.train(p, Host::new(&x[0], &x[1], &x[2])).expect("train");
    let forward = t.elapsed().as_secs_f64() * 1e3;
    let t = Instant::now();
    let g = fma.backward(&saved, HostGrad(&x[3])).expect("backward");
    ((forward, t.elapsed().as_secs_f64() * 1e3), g)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Largest |a - b| over max(1, max|b|).
fn distance(a: &[f32], b: &[f32]) -> f64 {
    let scale = b.iter().fold(1.0f64, |m, &x| m.max(f64::from(x).abs()));
    let worst = a.iter().zip(b).fold(0.0f64, |m, (&x, &y)| {
        m.max((f64::from(x) - f64::from(y)).abs())
    });
    worst / scale
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    env_logger::init();
    let a = Args::parse();
    let ctx = GpuContext::new()?;
    println!("adapter {} ({:?})", ctx.info.name, ctx.info.backend);
    println!(
        "| head | d | binding KiB | chunks | forward ms | split | backward ms | split | \
         backward split / unsplit | dQ bitwise | dK, dV distance | row groups (most a level) |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|");
    let d = a.head_dim;
    let mut heads: Vec<(String, usize, FmaConfig)> = Vec::new();
    for g in &a.grids {
        let (h, w) = g.split_once('x').ok_or("a grid is HxW")?;
        let grid = Grid::new(h.parse()?, w.parse()?);
        let cfg = FmaConfig::new(a.block, a.rank).grid(Some(grid));
        heads.push((format!("{grid} grid"), grid.h * grid.w, cfg));
    }
    for &n in &a.n {
        heads.push((format!("n = {n}"), n, FmaConfig::new(a.block_1d, a.rank)));
    }
    let bar = ProgressBar::new((heads.len() * 2 * (a.reps + 1)) as u64);
    bar.set_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} [{elapsed}]")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    for (name, n, cfg) in heads {
        let shape = Shape::new(1, 1, n, d);
        let binding = a
            .binding_kib
            .map_or((n * d * 4 / 2) as u64, |kib| kib << 10);
        let limits = KernelLimits::from_wgpu(&ctx.limits).capped(binding);
        let plan = BackwardSplitPlan::new(n, d, &cfg, &limits)?;
        let chunks = plan.split.chunks.len();
        // The most groups of coarse rows a level's coarse dK~/dV~ runs in (1: whole levels).
        let groups = plan.dkv_groups.iter().map(Vec::len).max().unwrap_or(1);
        let whole = Attention::fma(&ctx, cfg.clone())?;
        let split = Attention::fma(&ctx, cfg)?.max_binding(binding)?;
        let x = [1u64, 2, 3, 4].map(|s| normal_tensor(s, n * d));
        let problem = Problem::new(shape);
        let (mut fu, mut bu, mut fs, mut bs) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let (mut gu, mut gs) = (None, None);
        for rep in 0..=a.reps {
            let ((f, b), g) = step(&whole, &problem, &x);
            bar.inc(1);
            let ((f2, b2), g2) = step(&split, &problem, &x);
            bar.inc(1);
            if rep > 0 {
                fu.push(f);
                bu.push(b);
                fs.push(f2);
                bs.push(b2);
            }
            (gu, gs) = (Some(g), Some(g2));
        }
        let (gu, gs) = (gu.expect("a run"), gs.expect("a run"));
        let (bu, bs) = (median(bu), median(bs));
        bar.suspend(|| {
            println!(
                "| {name} | {d} | {} | {chunks} | {:.1} | {:.1} | {bu:.1} | {bs:.1} | {:.2}x | {} \
                 | {:.1e} | {groups} |",
                binding >> 10,
                median(fu),
                median(fs),
                bs / bu,
                gs.dq == gu.dq,
                distance(&gs.dk, &gu.dk).max(distance(&gs.dv, &gu.dv)),
            )
        });
    }
    bar.finish_and_clear();
    Ok(())
}
