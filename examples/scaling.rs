//! The scaling benchmark of coarse queries (algorithm.md §6): time of FMA with fine and with
//! coarse queries over n = n_min, 2 n_min, ..., n_max (head_dim 64, m 64, p 2, bidirectional,
//! Average), the ratios t(2n) / t(n) of each (linear cost gives 2, the fine variant's n log n
//! a little more), and coarse against fine at every n.
//!
//! `cargo run --release --example scaling [-- --n-min 4096 --n-max 65536 --heads 1 --reps 5]`
//!
//! Times are per forward of tensors already on the GPU (record, submit, wait), so uploads and
//! readbacks are not in them; the first call per shape (buffer and pipeline creation) is a
//! warm-up and not timed. Two clocks: the median wall clock, and (Linux) the process's CPU time
//! per forward (user + system of all threads, mean over the repetitions, /proc/self/stat). On a
//! software adapter (lavapipe) the CPU time is the work done, and unlike wall clock it does not
//! move when other processes compete for the cores; on a real GPU read the wall clock.

use std::time::Instant;

use clap::Parser;
use multipole_attn::gpu::{Attention, GpuContext, GpuTensors, Resident};
use multipole_attn::random::normal_tensor;
use multipole_attn::{FmaConfig, FmaError, Problem, Queries, Result, Shape};
use wgpu::util::DeviceExt;

#[derive(Parser)]
struct Args {
    /// Shortest sequence.
    #[arg(long, default_value_t = 4096)]
    n_min: usize,
    /// Longest sequence (doubling from n_min).
    #[arg(long, default_value_t = 65536)]
    n_max: usize,
    /// Heads (batch is 1).
    #[arg(long, default_value_t = 1)]
    heads: usize,
    /// Head dimension.
    #[arg(long, default_value_t = 64)]
    head_dim: usize,
    /// Block size m.
    #[arg(long, default_value_t = 64)]
    block: usize,
    /// Rank p.
    #[arg(long, default_value_t = 2)]
    rank: usize,
    /// Timed repetitions per point.
    #[arg(long, default_value_t = 5)]
    reps: usize,
}

fn main() {
    env_logger::init();
    if let Err(e) = run(Args::parse()) {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

/// CPU seconds (user + system, all threads) this process has used so far, where the OS says
/// (Linux: /proc/self/stat, in USER_HZ = 100 ticks per second).
fn process_cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // The fields after the command name (which may hold spaces) start at field 3, `state`;
    // utime and stime are fields 14 and 15.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i)?.parse::<u64>().ok();
    Some((ticks(11)? + ticks(12)?) as f64 / 100.0)
}

/// (median wall-clock seconds, mean CPU seconds) per forward of `fma` over `reps` runs on
/// tensors already on the GPU, after one warm-up run.
fn time_forward(
    ctx: &GpuContext,
    fma: &Attention,
    t: GpuTensors<'_>,
    problem: &Problem,
    reps: usize,
) -> Result<(f64, Option<f64>)> {
    let wait = || {
        ctx.device
            .poll(wgpu::PollType::wait_indefinitely())
            .map_err(|e| FmaError::Gpu {
                stage: "waiting for the GPU".into(),
                message: e.to_string(),
            })
    };
    fma.forward(problem, Resident(t))?;
    wait()?;
    let reps = reps.max(1);
    let mut times = Vec::with_capacity(reps);
    let cpu_start = process_cpu_seconds();
    for _ in 0..reps {
        let start = Instant::now();
        fma.forward(problem, Resident(t))?;
        wait()?;
        times.push(start.elapsed().as_secs_f64());
    }
    let cpu = cpu_start
        .zip(process_cpu_seconds())
        .map(|(a, b)| (b - a) / reps as f64);
    times.sort_by(f64::total_cmp);
    Ok((times[times.len() / 2], cpu))
}

fn run(a: Args) -> Result<()> {
    let ctx = GpuContext::new()?;
    println!(
        "adapter: {} ({:?}, {:?})",
        ctx.info.name, ctx.info.backend, ctx.info.device_type
    );
    println!(
        "heads {}, head_dim {}, m {}, p {}, bidirectional, Average; {} timed runs per point",
        a.heads, a.head_dim, a.block, a.rank, a.reps
    );
    let cfg = FmaConfig::new(a.block, a.rank);
    let fine = Attention::fma(&ctx, cfg.clone())?;
    let coarse = Attention::fma(&ctx, cfg.queries(Queries::Coarse))?;
    println!(
        "{:>7} {:>6} | {:>9} {:>9} {:>7} {:>7} {:>6} | {:>9} {:>9} {:>7} {:>7} {:>6}",
        "n",
        "levels",
        "fine ms",
        "coarse ms",
        "fine x",
        "crs x",
        "c/f",
        "fine cpu",
        "crs cpu",
        "fine x",
        "crs x",
        "c/f"
    );
    let mut prev: Option<[f64; 4]> = None;
    let mut n = a.n_min.max(1);
    while n <= a.n_max {
        let shape = Shape::new(1, a.heads, n, a.head_dim);
        let make = |label, seed| {
            ctx.device
                .create_buffer_init(&wgpu::util::BufferInitDescriptor {
                    label: Some(label),
                    contents: bytemuck::cast_slice(&normal_tensor(seed, shape.elements())),
                    usage: wgpu::BufferUsages::STORAGE,
                })
        };
        let (q, k, v, out) = (make("q", 1), make("k", 2), make("v", 3), make("out", 4));
        let lse = ctx.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("lse"),
            size: shape.rows() as u64 * 4,
            usage: wgpu::BufferUsages::STORAGE,
            mapped_at_creation: false,
        });
        let t = GpuTensors {
            q: &q,
            k: &k,
            v: &v,
            out: &out,
            lse: Some(&lse),
        };
        let problem = Problem::new(shape);
        let (tf, cf) = time_forward(&ctx, &fine, t, &problem, a.reps)?;
        let (tc, cc) = time_forward(&ctx, &coarse, t, &problem, a.reps)?;
        let now = [tf, tc, cf.unwrap_or(f64::NAN), cc.unwrap_or(f64::NAN)];
        let ratio = |i: usize| prev.map_or("-".to_string(), |p| format!("{:.3}", now[i] / p[i]));
        println!(
            "{n:>7} {:>6} | {:>9.1} {:>9.1} {:>7} {:>7} {:>6.3} | {:>9.1} {:>9.1} {:>7} {:>7} {:>6.3}",
            fine.plan(&problem)?.fma().map_or(0, |p| p.levels.count()),
            tf * 1e3,
            tc * 1e3,
            ratio(0),
            ratio(1),
            tc / tf,
            now[2] * 1e3,
            now[3] * 1e3,
            ratio(2),
            ratio(3),
            now[3] / now[2],
        );
        prev = Some(now);
        n *= 2;
    }
    println!("ms: median wall clock per forward; cpu: mean process CPU ms per forward (NaN where");
    println!("the OS does not say); x: t(n) / t(n/2); c/f: coarse queries over fine queries");
    Ok(())
}
