//! What splitting one head's training across storage bindings costs (issue 27): the training
//! forward (`Attention::train`) and the backward of host tensors of one head, 1D or on a 2D
//! grid, fine or coarse queries, causal or not, unsplit (the adapter's binding) against split
//! (the library capped by `Attention::max_binding`, so the head is cut into chunks), in one
//! process on one context. Each repetition runs the unsplit case, then the split one
//! (interleaved, so the machine's load drifts over both alike); medians of `--reps` after one
//! warm-up, their ratios, whether the split dQ is the unsplit bits, and how far the split
//! gradients are from the unsplit ones (the largest of dQ, dK and dV, of the scale
//! max(1, max|g|); 0 = the same bits; with dQ bitwise, dK's and dV's).
//!
//! `cargo run --release --example bench_backward_split [-- --n 16384 --grids 128x128 --head-dim 64 --queries fine,coarse --causal false,true --binding-mib 1 --reps 5]`
//!
//! `--n` are 1D heads (block `--block`, also `--block-1d`), `--grids HxW,...` 2D heads (cell
//! side `--cell`). The split runs' binding is `--binding-kib` or `--binding-mib`, by default
//! half a head's tensor (a few chunks). Skipped: causal coarse queries (coarse queries are
//! bidirectional), coarse queries on a grid (their split backward is 1D only) and causal
//! grids (a grid has no causal mask). The logs are in docs/perf.md (changes 25 and 26).

use std::time::Instant;

use clap::Parser;
use indicatif::{ProgressBar, ProgressStyle};
use multipole_attn::gpu::{Attention, GpuContext, Host, HostGrad};
use multipole_attn::plan::{BackwardSplitPlan, KernelLimits};
use multipole_attn::random::normal_tensor;
use multipole_attn::{FmaConfig, Gradients, Grid, Problem, Queries, Shape};

#[derive(Parser)]
struct Args {
    /// 1D sequence lengths, one head each.
    #[arg(long, value_delimiter = ',', default_value = "16384")]
    n: Vec<usize>,
    /// 2D grids, HxW each (none by default).
    #[arg(long, value_delimiter = ',')]
    grids: Vec<String>,
    /// Head dimension.
    #[arg(long, default_value_t = 64)]
    head_dim: usize,
    /// Block size m of the 1D heads.
    #[arg(long, alias = "block-1d", default_value_t = 64)]
    block: usize,
    /// Cell side r of the grids.
    #[arg(long, default_value_t = 8)]
    cell: usize,
    /// Rank p.
    #[arg(long, default_value_t = 2)]
    rank: usize,
    /// Query modes: fine, coarse.
    #[arg(long, value_delimiter = ',', default_value = "fine,coarse")]
    queries: Vec<QueryMode>,
    /// Masks.
    #[arg(long, value_delimiter = ',', default_value = "false,true")]
    causal: Vec<bool>,
    /// The split runs' binding in KiB [default: half a head's tensor].
    #[arg(long, conflicts_with = "binding_mib")]
    binding_kib: Option<u64>,
    /// The split runs' binding in MiB [default: half a head's tensor].
    #[arg(long)]
    binding_mib: Option<u64>,
    /// Timed repetitions of each (median reported), after one warm-up of each.
    #[arg(long, default_value_t = 5)]
    reps: usize,
}

#[derive(Clone, Copy, Debug, PartialEq, clap::ValueEnum)]
enum QueryMode {
    Fine,
    Coarse,
}

/// One head to time: its name in the table, its tokens, its configuration and mask.
struct Case {
    head: String,
    n: usize,
    cfg: FmaConfig,
    mode: QueryMode,
    causal: bool,
}

/// Every case of the arguments, 1D heads first, without the skipped ones (module header).
fn cases(a: &Args) -> Result<Vec<Case>, Box<dyn std::error::Error>> {
    let mut heads: Vec<(String, usize, FmaConfig, bool)> = Vec::new();
    for &n in &a.n {
        heads.push((
            format!("n = {n}"),
            n,
            FmaConfig::new(a.block, a.rank),
            false,
        ));
    }
    for g in &a.grids {
        let (h, w) = g.split_once('x').ok_or("a grid is HxW")?;
        let grid = Grid::new(h.parse()?, w.parse()?);
        let cfg = FmaConfig::new(a.cell, a.rank).grid(Some(grid));
        heads.push((format!("{grid} grid"), grid.h * grid.w, cfg, true));
    }
    let mut out = Vec::new();
    for (head, n, cfg, on_grid) in heads {
        for &mode in &a.queries {
            for &causal in &a.causal {
                let coarse = mode == QueryMode::Coarse;
                if (coarse && (causal || on_grid)) || (causal && on_grid) {
                    continue;
                }
                let queries = if coarse {
                    Queries::Coarse
                } else {
                    Queries::Fine
                };
                out.push(Case {
                    head: head.clone(),
                    n,
                    cfg: cfg.clone().queries(queries),
                    mode,
                    causal,
                });
            }
        }
    }
    Ok(out)
}

/// Milliseconds of one call of `run`.
fn ms<T>(run: impl FnOnce() -> T) -> (f64, T) {
    let t = Instant::now();
    let out = run();
    (t.elapsed().as_secs_f64() * 1e3, out)
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

/// Largest |a - b| of dQ, dK, dV over the scale max(1, max|b|).
fn distance(a: &Gradients<f32>, b: &Gradients<f32>) -> f64 {
    [(&a.dq, &b.dq), (&a.dk, &b.dk), (&a.dv, &b.dv)]
        .into_iter()
        .map(|(x, y)| {
            let scale = y.iter().fold(1.0f64, |m, &v| m.max(f64::from(v).abs()));
            let worst = x
                .iter()
                .zip(y)
                .map(|(&p, &q)| (f64::from(p) - f64::from(q)).abs())
                .fold(0.0, f64::max);
            worst / scale
        })
        .fold(0.0, f64::max)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    env_logger::init();
    let a = Args::parse();
    let ctx = GpuContext::new()?;
    let d = a.head_dim;
    println!(
        "adapter {} ({:?}); one head, d = {d}, m = {}, r = {}, p = {}, median of {}",
        ctx.info.name, ctx.info.backend, a.block, a.cell, a.rank, a.reps
    );
    println!(
        "| head | queries | causal | binding KiB | chunks | forward ms | split | ratio | \
         backward ms | split | ratio | dQ bitwise | distance | row groups |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    let cases = cases(&a)?;
    let bar = ProgressBar::new((cases.len() * 2 * (a.reps + 1)) as u64);
    bar.set_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} [{elapsed}]")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    for c in cases {
        let n = c.n;
        let binding = match (a.binding_kib, a.binding_mib) {
            (Some(kib), _) => kib << 10,
            (None, Some(mib)) => mib << 20,
            (None, None) => (n * d * 4 / 2) as u64,
        };
        // The mask comes with the problem (the chunks do not depend on it).
        let limits = KernelLimits::from_wgpu(&ctx.limits).capped(binding);
        let plan = BackwardSplitPlan::new(n, d, &c.cfg, &limits)?;
        let chunks = plan.split.chunks.len();
        // The most groups of coarse rows a level's coarse dK~/dV~ runs in (1: whole levels).
        let groups = plan.dkv_groups.iter().map(Vec::len).max().unwrap_or(1);
        let whole = Attention::fma(&ctx, c.cfg.clone())?;
        let split = Attention::fma(&ctx, c.cfg)?.max_binding(binding)?;
        let [q, k, v, dout] = [1u64, 2, 3, 4].map(|s| normal_tensor(s, n * d));
        let problem = Problem::new(Shape::new(1, 1, n, d)).causal(c.causal);
        let mut times = [(); 4].map(|_| Vec::new());
        let mut grads = Vec::new();
        for rep in 0..=a.reps {
            for (i, att) in [&whole, &split].into_iter().enumerate() {
                let (f, trained) = ms(|| att.train(&problem, Host::new(&q, &k, &v)));
                let (_, saved) = trained?;
                let (b, g) = ms(|| att.backward(&saved, HostGrad(&dout)));
                let g = g?;
                bar.inc(1);
                if rep > 0 {
                    times[2 * i].push(f);
                    times[2 * i + 1].push(b);
                } else {
                    grads.push(g);
                }
            }
        }
        let [f, fs, b, bs] = [0, 2, 1, 3].map(|i| median(times[i].clone()));
        bar.suspend(|| {
            println!(
                "| {} | {} | {} | {} | {chunks} | {f:.1} | {fs:.1} | {:.2} | {b:.1} | {bs:.1} | \
                 {:.2} | {} | {:.1e} | {groups} |",
                c.head,
                format!("{:?}", c.mode).to_lowercase(),
                c.causal,
                binding >> 10,
                fs / f,
                bs / b,
                if grads[1].dq == grads[0].dq {
                    "yes"
                } else {
                    "no"
                },
                distance(&grads[1], &grads[0]),
            )
        });
    }
    bar.finish_and_clear();
    Ok(())
}
