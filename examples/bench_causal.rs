//! Causal against bidirectional in one process: dense attention and FMA fine queries, both
//! masks on one device and the same resident tensors, cases alternating (order flipped each
//! repetition), wall clock around submit + wait, median after a warm-up, and the speed-up
//! bidirectional / causal (issue 18 asks >= 1.8x for dense).
//!
//! `cargo run --release --example bench_causal [-- --n 4096,8192 --reps 3]`

use std::time::Instant;

use clap::Parser;
use multipole_attn::gpu::{Attention, Encode, GpuContext, GpuTensors};
use multipole_attn::random::normal_tensor;
use multipole_attn::{FmaConfig, Problem, Shape};
use wgpu::util::DeviceExt;

#[derive(Parser)]
struct Args {
    /// Sequence lengths.
    #[arg(long, value_delimiter = ',', default_value = "4096")]
    n: Vec<usize>,
    /// Head dimension.
    #[arg(long, default_value_t = 64)]
    head_dim: usize,
    /// Timed repetitions per mask (median reported), after one warm-up each.
    #[arg(long, default_value_t = 3)]
    reps: usize,
}

type BoxError = Box<dyn std::error::Error>;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> Result<(), BoxError> {
    env_logger::init();
    let a = Args::parse();
    let ctx = GpuContext::new()?;
    println!(
        "adapter {} ({:?}); subgroups {:?}; wall clock, median of {}, d = {}, m = 64, p = 2",
        ctx.info.name,
        ctx.info.backend,
        ctx.subgroup_kernels(),
        a.reps,
        a.head_dim
    );
    println!("| kernel | n | bidirectional ms | causal ms | bidirectional / causal |");
    println!("|---|---|---|---|---|");
    for &n in &a.n {
        let shape = Shape::new(1, 1, n, a.head_dim);
        let [q, k, v, out] = [1, 2, 3, 4].map(|seed| {
            ctx.device
                .create_buffer_init(&wgpu::util::BufferInitDescriptor {
                    label: None,
                    contents: bytemuck::cast_slice(&normal_tensor(seed, shape.elements())),
                    usage: wgpu::BufferUsages::STORAGE,
                })
        });
        let t = GpuTensors {
            q: &q,
            k: &k,
            v: &v,
            out: &out,
            lse: None,
        };
        let once = |kernel: &Attention, causal: bool| -> Result<f64, BoxError> {
            let problem = Problem::new(shape).causal(causal);
            let start = Instant::now();
            let mut enc = ctx.device.create_command_encoder(&Default::default());
            kernel.forward(&problem, Encode(&mut enc, t))?;
            ctx.queue.submit([enc.finish()]);
            ctx.device.poll(wgpu::PollType::wait_indefinitely())?;
            Ok(start.elapsed().as_secs_f64() * 1e3)
        };
        for name in ["FMA fine", "dense"] {
            let kernel = if name == "dense" {
                Attention::dense(&ctx)?
            } else {
                Attention::fma(&ctx, FmaConfig::new(64, 2))?
            };
            for causal in [false, true] {
                once(&kernel, causal)?; // warm-up
            }
            let mut times = [Vec::new(), Vec::new()];
            for rep in 0..a.reps {
                for i in [rep % 2, 1 - rep % 2] {
                    times[i].push(once(&kernel, i == 1)?);
                }
            }
            let [b, c] = times.map(median);
            println!("| {name} | {n} | {b:.1} | {c:.1} | {:.2} |", b / c);
        }
    }
    Ok(())
}
