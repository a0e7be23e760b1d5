//! Grouped-query heads against multi-head attention at the same query heads: FMA forward
//! (fine queries) and backward on tensors resident on the GPU, median wall clock of `--reps`
//! runs after a warm-up, both configurations in one process, with the device memory each
//! needs (Q, K, V, O, LSE and the library's workspace: coarse K~, V~ per K/V head).
//!
//! `cargo run --release --example bench_gqa [-- --n 4096,16384 --heads 8 --kv-heads 1,2,8]`
//!
//! Prints a table; the README's grouped-query table comes from it.

use std::time::Instant;

use clap::Parser;
use indicatif::{ProgressBar, ProgressStyle};
use multipole_attn::gpu::{FmaAttention, GpuContext, GpuTensors, GradTensors};
use multipole_attn::random::normal_tensor;
use multipole_attn::{FmaConfig, Shape};
use wgpu::util::DeviceExt;

#[derive(Parser)]
struct Args {
    /// Sequence lengths.
    #[arg(long, value_delimiter = ',', default_value = "4096,16384")]
    n: Vec<usize>,
    /// Query heads (batch 1).
    #[arg(long, default_value_t = 8)]
    heads: usize,
    /// K/V head counts to compare (each must divide --heads; --heads itself is multi-head).
    #[arg(long, value_delimiter = ',', default_value = "8,1")]
    kv_heads: Vec<usize>,
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
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// Also time the backward.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    backward: bool,
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
    let ctx = GpuContext::new()?;
    println!("adapter {} ({:?})", ctx.info.name, ctx.info.backend);
    println!(
        "{:>7} {:>6} {:>9} {:>11} {:>8} {:>12} {:>8} {:>10} {:>8}",
        "n", "heads", "kv_heads", "forward ms", "vs MHA", "backward ms", "vs MHA", "MiB", "vs MHA"
    );
    let bar = ProgressBar::new((a.n.len() * a.kv_heads.len()) as u64);
    bar.set_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} {msg} [{elapsed}]")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    for &n in &a.n {
        // Multi-head first, so every grouped row has its baseline from the same process.
        let mut kv_list = a.kv_heads.clone();
        kv_list.sort_by_key(|&k| std::cmp::Reverse((k == a.heads) as u8));
        let mut base: Option<(f64, f64, f64)> = None;
        for &kv in &kv_list {
            bar.set_message(format!("n={n} kv_heads={kv}"));
            let shape = Shape::new(1, a.heads, n, a.head_dim).with_kv_heads(kv);
            shape.validate()?;
            let buffer = |seed: u64, len: usize| {
                ctx.device
                    .create_buffer_init(&wgpu::util::BufferInitDescriptor {
                        label: None,
                        contents: bytemuck::cast_slice(&normal_tensor(seed, len)),
                        usage: wgpu::BufferUsages::STORAGE,
                    })
            };
            let (len, kv_len) = (shape.elements(), shape.kv_elements());
            let (q, k, v, o) = (
                buffer(1, len),
                buffer(2, kv_len),
                buffer(3, kv_len),
                buffer(4, len),
            );
            let lse = buffer(5, shape.rows());
            let fma = FmaAttention::new(&ctx, FmaConfig::new(a.block, a.rank))?;
            let t = GpuTensors {
                q: &q,
                k: &k,
                v: &v,
                out: &o,
                lse: Some(&lse),
            };
            let forward = median_ms(&ctx, a.reps, || fma.forward_buffers(t, shape).unwrap());
            let backward = if a.backward {
                let saved = fma.saved_from_buffers(t, shape)?;
                let (dout, dq) = (buffer(6, len), buffer(7, len));
                let (dk, dv) = (buffer(8, kv_len), buffer(9, kv_len));
                let g = GradTensors {
                    dq: &dq,
                    dk: &dk,
                    dv: &dv,
                    weights: None,
                };
                median_ms(&ctx, a.reps, || {
                    fma.backward_buffers(&saved, &dout, g).unwrap()
                })
            } else {
                f64::NAN
            };
            // Q, O, the LSE, K, V and the forward's workspace (coarse K~, V~ per K/V head).
            let plan = fma.plan(shape)?;
            let bytes =
                (2 * len + 2 * kv_len + shape.rows()) as u64 * 4 + plan.workspace.device_bytes();
            let mib = bytes as f64 / (1 << 20) as f64;
            let (bf, bb, bm) = *base.get_or_insert((forward, backward, mib));
            bar.suspend(|| {
                println!(
                    "{n:>7} {:>6} {kv:>9} {forward:>11.1} {:>7.2}x {backward:>12.1} {:>7.2}x \
                     {mib:>10.1} {:>7.2}x",
                    a.heads,
                    forward / bf,
                    backward / bb,
                    mib / bm
                )
            });
            bar.inc(1);
        }
    }
    bar.finish_and_clear();
    Ok(())
}
