//! The scaling benchmark of coarse queries (algorithm.md §6): median wall-clock time of FMA
//! with fine and with coarse queries over n = n_min, 2 n_min, ..., n_max (head_dim 64, m 64,
//! p 2, bidirectional, Average), the ratios t(2n) / t(n) of each (linear cost gives 2, the
//! fine variant's n log n a little more), and coarse against fine at the largest n.
//!
//! `cargo run --release --example scaling [-- --n-min 4096 --n-max 65536 --heads 1 --reps 5]`
//!
//! Times are wall clock around one forward of tensors already on the GPU (record, submit,
//! wait), so uploads and readbacks are not in them; the first call per shape (buffer and
//! pipeline creation) is a warm-up and not timed.

use std::time::Instant;

use clap::Parser;
use multipole_attn::gpu::{FmaAttention, GpuContext, GpuTensors};
use multipole_attn::random::normal_tensor;
use multipole_attn::{FmaConfig, Queries, Result, Shape};
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
    /// Timed repetitions per point (median printed).
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

/// Median seconds of `reps` forwards of `fma` on tensors already on the GPU, after a warm-up.
fn median_time(
    ctx: &GpuContext,
    fma: &FmaAttention,
    t: GpuTensors<'_>,
    shape: Shape,
    reps: usize,
) -> Result<f64> {
    let wait = || {
        ctx.device
            .poll(wgpu::PollType::wait_indefinitely())
            .map_err(|e| multipole_attn::FmaError::Gpu {
                stage: "waiting for the GPU".into(),
                message: e.to_string(),
            })
    };
    fma.forward_buffers(t, shape)?;
    wait()?;
    let mut times = Vec::with_capacity(reps);
    for _ in 0..reps.max(1) {
        let start = Instant::now();
        fma.forward_buffers(t, shape)?;
        wait()?;
        times.push(start.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}

fn run(a: Args) -> Result<()> {
    let ctx = GpuContext::new()?;
    println!(
        "adapter: {} ({:?}, {:?})",
        ctx.info.name, ctx.info.backend, ctx.info.device_type
    );
    println!(
        "heads {}, head_dim {}, m {}, p {}, bidirectional, Average; median of {} (wall clock, tensors on the GPU)",
        a.heads, a.head_dim, a.block, a.rank, a.reps
    );
    let cfg = FmaConfig::new(a.block, a.rank);
    let fine = FmaAttention::new(&ctx, cfg.clone())?;
    let coarse = FmaAttention::new(&ctx, cfg.queries(Queries::Coarse))?;
    println!(
        "{:>8} {:>8} {:>12} {:>12} {:>10} {:>10} {:>12}",
        "n", "levels", "fine ms", "coarse ms", "fine x", "coarse x", "coarse/fine"
    );
    let mut prev: Option<(f64, f64)> = None;
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
        let lse = make_lse(&ctx, shape);
        let t = GpuTensors {
            q: &q,
            k: &k,
            v: &v,
            out: &out,
            lse: Some(&lse),
        };
        let tf = median_time(&ctx, &fine, t, shape, a.reps)?;
        let tc = median_time(&ctx, &coarse, t, shape, a.reps)?;
        let ratio = |now: f64, before: Option<f64>| {
            before.map_or("-".to_string(), |b| format!("{:.3}", now / b))
        };
        println!(
            "{n:>8} {:>8} {:>12.1} {:>12.1} {:>10} {:>10} {:>12.3}",
            fine.plan(shape)?.levels.count(),
            tf * 1e3,
            tc * 1e3,
            ratio(tf, prev.map(|p| p.0)),
            ratio(tc, prev.map(|p| p.1)),
            tc / tf
        );
        prev = Some((tf, tc));
        n *= 2;
    }
    println!("fine x, coarse x: t(n) / t(n/2); coarse/fine: time of coarse queries over fine ones");
    Ok(())
}

fn make_lse(ctx: &GpuContext, shape: Shape) -> wgpu::Buffer {
    ctx.device.create_buffer(&wgpu::BufferDescriptor {
        label: Some("lse"),
        size: shape.rows() as u64 * 4,
        usage: wgpu::BufferUsages::STORAGE,
        mapped_at_creation: false,
    })
}
