//! What splitting one head's training across storage bindings costs (issue 27): the training
//! forward (`Attention::train`) and the backward of host tensors of one head, unsplit (the
//! adapter's binding) against split (the library capped at `--binding-mib` by
//! `Attention::max_binding`, so the head is cut into chunks), in one process on one context.
//! Each repetition runs the unsplit case, then the split one (interleaved, so the machine's
//! load drifts over both alike); medians of `--reps` after one warm-up, their ratio, and how far
//! the split gradients are from the unsplit ones (of the scale max(1, max|g|); 0 = the same
//! bits).
//!
//! `cargo run --release --example bench_split_backward [-- --n 16384 --head-dim 64 --queries fine,coarse --causal false,true --binding-mib 1 --reps 5]`
//!
//! Coarse queries are bidirectional only (their causal cases are skipped). The log is in
//! docs/perf.md (changes 21 and 25).

use std::time::Instant;

use clap::Parser;
use multipole_attn::gpu::{Attention, GpuContext, Host, HostGrad};
use multipole_attn::plan::{BackwardSplitPlan, KernelLimits};
use multipole_attn::random::normal_tensor;
use multipole_attn::{FmaConfig, Gradients, Problem, Queries, Shape};

#[derive(Parser)]
struct Args {
    /// Sequence length of the one head.
    #[arg(long, default_value_t = 16384)]
    n: usize,
    /// Head dimension.
    #[arg(long, default_value_t = 64)]
    head_dim: usize,
    /// Block size m.
    #[arg(long, default_value_t = 64)]
    block: usize,
    /// Rank p.
    #[arg(long, default_value_t = 2)]
    rank: usize,
    /// Query modes: fine, coarse.
    #[arg(long, value_delimiter = ',', default_value = "fine,coarse")]
    queries: Vec<QueryMode>,
    /// Masks.
    #[arg(long, value_delimiter = ',', default_value = "false,true")]
    causal: Vec<bool>,
    /// The split runs' binding, in MiB.
    #[arg(long, default_value_t = 1)]
    binding_mib: u64,
    /// Timed repetitions (median reported), after one warm-up.
    #[arg(long, default_value_t = 5)]
    reps: usize,
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum QueryMode {
    Fine,
    Coarse,
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
    let binding = a.binding_mib << 20;
    println!(
        "adapter {} ({:?}); one head, n = {}, d = {}, m = {}, p = {}, split at {} MiB, median of {}",
        ctx.info.name, ctx.info.backend, a.n, a.head_dim, a.block, a.rank, a.binding_mib, a.reps
    );
    println!(
        "{:>7} {:>7} {:>7} {:>11} {:>11} {:>8} {:>11} {:>11} {:>8} {:>10}",
        "queries",
        "causal",
        "chunks",
        "fwd ms",
        "split fwd",
        "ratio",
        "bwd ms",
        "split bwd",
        "ratio",
        "distance"
    );
    let shape = Shape::new(1, 1, a.n, a.head_dim);
    let q = normal_tensor(1, shape.elements());
    let k = normal_tensor(2, shape.elements());
    let v = normal_tensor(3, shape.elements());
    let dout = normal_tensor(4, shape.elements());
    for &mode in &a.queries {
        let queries = match mode {
            QueryMode::Fine => Queries::Fine,
            QueryMode::Coarse => Queries::Coarse,
        };
        for &causal in &a.causal {
            if causal && queries == Queries::Coarse {
                continue;
            }
            // The mask comes with the problem (the chunks do not depend on it).
            let cfg = FmaConfig::new(a.block, a.rank).queries(queries);
            let chunks = BackwardSplitPlan::new(
                a.n,
                a.head_dim,
                &cfg,
                &KernelLimits::from_wgpu(&ctx.device.limits()).capped(binding),
            )?
            .split
            .chunks
            .len();
            let problem = Problem::new(shape).causal(causal);
            let whole = Attention::fma(&ctx, cfg.clone())?;
            let split = Attention::fma(&ctx, cfg)?.max_binding(binding)?;
            let mut times = [(); 4].map(|_| Vec::new());
            let mut grads = Vec::new();
            for rep in 0..=a.reps {
                for (i, fma) in [&whole, &split].into_iter().enumerate() {
                    let (f, trained) = ms(|| fma.train(&problem, Host::new(&q, &k, &v)));
                    let (_, saved) = trained?;
                    let (b, g) = ms(|| fma.backward(&saved, HostGrad(&dout)));
                    let g = g?;
                    if rep > 0 {
                        times[2 * i].push(f);
                        times[2 * i + 1].push(b);
                    } else {
                        grads.push(g);
                    }
                }
            }
            let [f, fs, b, bs] = [0, 2, 1, 3].map(|i| median(times[i].clone()));
            println!(
                "{:>7} {causal:>7} {chunks:>7} {f:>11.1} {fs:>11.1} {:>8.2} {b:>11.1} {bs:>11.1} {:>8.2} {:>10.1e}",
                format!("{mode:?}").to_lowercase(),
                fs / f,
                bs / b,
                distance(&grads[1], &grads[0])
            );
        }
    }
    Ok(())
}
