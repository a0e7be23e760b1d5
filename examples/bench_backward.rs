//! Backward timing: FMA's backward (`Attention::backward`) on tensors resident on the GPU, median
//! wall clock of `--reps` runs after a warm-up, against the forward of the same shape; and the
//! baseline, exact attention's backward (`Method::Dense`) against its forward (a
//! `dense` row per n and mask, first), with each FMA backward's time over the dense
//! backward's of the same mask (`b / dense b`).
//!
//! `cargo run --release --example bench_backward [-- --n 4096,16384 --head-dim 64 --queries fine,coarse --causal false,true --browser-limits --no-dense --per-pass]`
//!
//! Coarse queries are bidirectional only (their causal cases are skipped).
//!
//! The log of backward tuning steps is in docs/perf.md (change 7 on).

use std::time::Instant;

use clap::Parser;
use indicatif::{ProgressBar, ProgressStyle};
use multipole_attn::gpu::{
    format_table, Attention, ContextOptions, GpuContext, GpuTensors, GradTensors, Resident,
    ResidentGrad,
};
use multipole_attn::random::normal_tensor;
use multipole_attn::{FmaConfig, Problem, Queries, Shape};
use wgpu::util::DeviceExt;

#[derive(Parser)]
struct Args {
    /// Sequence lengths.
    #[arg(long, value_delimiter = ',', default_value = "4096,16384")]
    n: Vec<usize>,
    /// Head dimension.
    #[arg(long, default_value_t = 64)]
    head_dim: usize,
    /// Block size m.
    #[arg(long, default_value_t = 64)]
    block: usize,
    /// Rank p.
    #[arg(long, default_value_t = 2)]
    rank: usize,
    /// Timed repetitions (median reported), after one warm-up.
    #[arg(long, default_value_t = 5)]
    reps: usize,
    /// Query modes: fine, coarse.
    #[arg(long, value_delimiter = ',', default_value = "fine")]
    queries: Vec<QueryMode>,
    /// Masks.
    #[arg(long, value_delimiter = ',', default_value = "false,true")]
    causal: Vec<bool>,
    /// Ask only for what a browser grants (no subgroups: the plain kernels, as on the web).
    #[arg(long)]
    browser_limits: bool,
    /// Skip the dense baseline (O(n^2): the slow part at long n).
    #[arg(long)]
    no_dense: bool,
    /// After the timed runs, one more FMA backward per case with the per-pass profiler on
    /// (`GpuContext::start_profiling`): its dispatches' GPU times by pass and level.
    #[arg(long)]
    per_pass: bool,
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum QueryMode {
    Fine,
    Coarse,
}

/// Median milliseconds of `reps` runs of `run` (each waited for), after one warm-up.
fn median_ms(ctx: &GpuContext, reps: usize, mut run: impl FnMut()) -> f64 {
    let mut times: Vec<f64> = (0..=reps)
        .map(|_| {
            let t = Instant::now();
            run();
            let _ = ctx.device.poll(wgpu::PollType::wait_indefinitely());
            t.elapsed().as_secs_f64() * 1e3
        })
        .skip(1)
        .collect();
    times.sort_by(f64::total_cmp);
    times[times.len() / 2]
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    env_logger::init();
    let a = Args::parse();
    let ctx = GpuContext::with_options(ContextOptions {
        browser_limits: a.browser_limits,
        ..Default::default()
    })?;
    println!(
        "adapter {} ({:?}), {}",
        ctx.info.name,
        ctx.info.backend,
        match ctx.subgroup_kernels() {
            Some(sg) => format!("subgroup kernels, size {sg}"),
            None => "plain kernels".into(),
        }
    );
    println!(
        "{:>7} {:>7} {:>7} {:>12} {:>12} {:>8} {:>11}",
        "n", "queries", "causal", "forward ms", "backward ms", "b/f", "b / dense b"
    );
    // Coarse queries are bidirectional only.
    let cases: Vec<(QueryMode, bool)> = a
        .queries
        .iter()
        .flat_map(|&q| a.causal.iter().map(move |&c| (q, c)))
        .filter(|&(q, c)| !(c && matches!(q, QueryMode::Coarse)))
        .collect();
    // On stderr, drawn only when it is a terminal (logs stay clean); rows print above it.
    let masks = if a.no_dense { 0 } else { a.causal.len() };
    let bar = ProgressBar::new(((cases.len() + masks) * a.n.len()) as u64);
    bar.set_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} {msg} [{elapsed}]")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    for &n in &a.n {
        let shape = Shape::new(1, 1, n, a.head_dim);
        let tensor = |seed: u64| {
            ctx.device
                .create_buffer_init(&wgpu::util::BufferInitDescriptor {
                    label: None,
                    contents: bytemuck::cast_slice(&normal_tensor(seed, shape.elements())),
                    usage: wgpu::BufferUsages::STORAGE,
                })
        };
        let [q, k, v, o, lse, dout, dq, dk, dv] = [1, 2, 3, 4, 5, 6, 7, 8, 9].map(tensor);
        let t = GpuTensors {
            q: &q,
            k: &k,
            v: &v,
            out: &o,
            lse: Some(&lse),
        };
        let g = GradTensors {
            dq: &dq,
            dk: &dk,
            dv: &dv,
            weights: None,
        };
        let io = ResidentGrad {
            dout: &dout,
            grads: g,
        };
        // The dense baseline of each mask: its backward's time, for the FMA rows' last column.
        let mut dense_backward = Vec::new();
        for &causal in a.causal.iter().filter(|_| !a.no_dense) {
            bar.set_message(format!("n={n} dense causal={causal}"));
            let problem = Problem::new(shape).causal(causal);
            let dense = Attention::dense(&ctx)?;
            let forward = median_ms(&ctx, a.reps, || {
                dense.forward(&problem, Resident(t)).unwrap()
            });
            let (_, saved) = dense.train(&problem, Resident(t))?;
            let backward = median_ms(&ctx, a.reps, || dense.backward(&saved, io).unwrap());
            dense_backward.push((causal, backward));
            bar.suspend(|| {
                println!(
                    "{n:>7} {:>7} {causal:>7} {forward:>12.1} {backward:>12.1} {:>8.2} {:>11.3}",
                    "dense",
                    backward / forward,
                    1.0
                )
            });
            bar.inc(1);
        }
        for &(mode, causal) in &cases {
            bar.set_message(format!("n={n} {mode:?} causal={causal}"));
            let queries = match mode {
                QueryMode::Fine => Queries::Fine,
                QueryMode::Coarse => Queries::Coarse,
            };
            let problem = Problem::new(shape).causal(causal);
            let fma = Attention::fma(&ctx, FmaConfig::new(a.block, a.rank).queries(queries))?;
            let forward = median_ms(&ctx, a.reps, || fma.forward(&problem, Resident(t)).unwrap());
            let (_, saved) = fma.train(&problem, Resident(t))?;
            let backward = median_ms(&ctx, a.reps, || fma.backward(&saved, io).unwrap());
            let passes = if a.per_pass {
                ctx.start_profiling(2048)?;
                let run = fma.backward(&saved, io);
                let _ = ctx.device.poll(wgpu::PollType::wait_indefinitely());
                // Taken before `run` is checked, so that a failed run leaves profiling off.
                let (times, dropped) = ctx.take_profile()?;
                run?;
                Some(format_table(&times, dropped))
            } else {
                None
            };
            let vs_dense = dense_backward
                .iter()
                .find(|d| d.0 == causal)
                .map_or("-".to_string(), |d| format!("{:.3}", backward / d.1));
            // suspend, not bar.println: that prints nothing when the bar is hidden.
            bar.suspend(|| {
                println!(
                    "{n:>7} {:>7} {causal:>7} {forward:>12.1} {backward:>12.1} {:>8.2} {vs_dense:>11}",
                    format!("{mode:?}").to_lowercase(),
                    backward / forward
                );
                if let Some(p) = &passes {
                    println!("{p}");
                }
            });
            bar.inc(1);
        }
    }
    bar.finish_and_clear();
    Ok(())
}
