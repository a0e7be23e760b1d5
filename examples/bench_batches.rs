//! What real models batch, measured in one process on tensors resident on the GPU (median wall
//! clock of `--reps` runs after a warm-up):
//! 1. grouped-query heads against multi-head attention at the same query heads: FMA forward
//!    (fine queries) and backward, with the device memory each needs (Q, K, V, O, LSE and the
//!    library's workspace: coarse K~, V~ per K/V head);
//! 2. a packed batch of mixed lengths (`Sequences::packed`) against the same sequences padded
//!    to the longest: run as a padded batch with lengths (`Sequences::padded`), and as a plain
//!    batch of equal sequences (what a caller without variable lengths runs), FMA and dense.
//!
//! `cargo run --release --example bench_batches [-- --n 4096 --heads 8 --kv-heads 8,2,1
//!  --pack 64 --pack-max 4096]`
//!
//! Prints two tables; the README's tables come from them.

use std::time::Instant;

use clap::Parser;
use indicatif::{ProgressBar, ProgressStyle};
use multipole_attn::gpu::{Attention, GpuContext, GpuTensors, GradTensors, Resident, ResidentGrad};
use multipole_attn::random::normal_tensor;
use multipole_attn::{FmaConfig, Problem, Sequences, Shape};
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
    /// Sequences in the mixed-length pack (0: skip part 2).
    #[arg(long, default_value_t = 64)]
    pack: usize,
    /// Longest sequence of the pack; lengths spread log-uniformly from 16 up to it.
    #[arg(long, default_value_t = 4096)]
    pack_max: usize,
}

/// A device buffer of `len` N(0, 1) floats.
fn buffer(ctx: &GpuContext, seed: u64, len: usize) -> wgpu::Buffer {
    ctx.device
        .create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: None,
            contents: bytemuck::cast_slice(&normal_tensor(seed, len.max(1))),
            usage: wgpu::BufferUsages::STORAGE,
        })
}

/// Part 2: the pack, padded with lengths, and padded as a plain batch; FMA then dense.
fn mixed_lengths(ctx: &GpuContext, a: &Args) -> Result<(), Box<dyn std::error::Error>> {
    // Log-uniform lengths 16 .. pack_max, in a fixed shuffled order.
    let count = a.pack;
    let lengths: Vec<usize> = (0..count)
        .map(|i| {
            let f = ((i * 37) % count) as f64 / (count.max(2) - 1) as f64;
            (16.0 * (a.pack_max as f64 / 16.0).powf(f)).round() as usize
        })
        .collect();
    let n_max = *lengths.iter().max().unwrap_or(&1);
    let total: usize = lengths.iter().sum();
    let (h, d) = (1, a.head_dim);
    println!(
        "\n{count} sequences of 16..{n_max} tokens ({total} in all, {:.1}x fewer than padded to \
         the longest), heads {h}, head_dim {d}",
        (count * n_max) as f64 / total as f64
    );
    println!(
        "{:>8} {:>26} {:>11} {:>8} {:>10}",
        "method", "layout", "ms", "vs pack", "MiB"
    );
    let packed = Sequences::packed(lengths.clone())?;
    let padded = Sequences::padded(n_max, lengths.clone())?;
    let layouts = [
        ("packed (seqlens)", packed.shape(h, h, d), Some(&packed)),
        ("padded, with lengths", padded.shape(h, h, d), Some(&padded)),
        ("padded, plain batch", padded.shape(h, h, d), None),
    ];
    for method in ["FMA", "dense"] {
        let mut base = None;
        for (name, shape, seqs) in layouts {
            let (len, kv_len) = (shape.elements(), shape.kv_elements());
            let (q, k, v, o) = (
                buffer(ctx, 1, len),
                buffer(ctx, 2, kv_len),
                buffer(ctx, 3, kv_len),
                buffer(ctx, 4, len),
            );
            let lse = buffer(ctx, 5, shape.rows());
            let t = GpuTensors {
                q: &q,
                k: &k,
                v: &v,
                out: &o,
                lse: Some(&lse),
            };
            let attention = if method == "FMA" {
                Attention::fma(ctx, FmaConfig::new(a.block, a.rank))?
            } else {
                Attention::dense(ctx)?
            };
            let problem = Problem {
                sequences: seqs.cloned(),
                ..Problem::new(shape)
            };
            let ms = median_ms(ctx, a.reps, || {
                attention.forward(&problem, Resident(t)).unwrap()
            });
            let mib = (2 * len + 2 * kv_len + shape.rows()) as f64 * 4.0 / (1 << 20) as f64;
            let b = *base.get_or_insert(ms);
            println!(
                "{method:>8} {name:>26} {ms:>11.1} {:>7.2}x {mib:>10.1}",
                ms / b
            );
        }
    }
    Ok(())
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
            let buffer = |seed: u64, len: usize| buffer(&ctx, seed, len);
            let (len, kv_len) = (shape.elements(), shape.kv_elements());
            let (q, k, v, o) = (
                buffer(1, len),
                buffer(2, kv_len),
                buffer(3, kv_len),
                buffer(4, len),
            );
            let lse = buffer(5, shape.rows());
            let fma = Attention::fma(&ctx, FmaConfig::new(a.block, a.rank))?;
            let problem = Problem::new(shape);
            let t = GpuTensors {
                q: &q,
                k: &k,
                v: &v,
                out: &o,
                lse: Some(&lse),
            };
            let forward = median_ms(&ctx, a.reps, || fma.forward(&problem, Resident(t)).unwrap());
            let backward = if a.backward {
                let (_, saved) = fma.train(&problem, Resident(t))?;
                let (dout, dq) = (buffer(6, len), buffer(7, len));
                let (dk, dv) = (buffer(8, kv_len), buffer(9, kv_len));
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
                median_ms(&ctx, a.reps, || fma.backward(&saved, io).unwrap())
            } else {
                f64::NAN
            };
            // Q, O, the LSE, K, V and the forward's workspace (coarse K~, V~ per K/V head).
            let workspace = fma
                .plan(&problem)?
                .fma()
                .map_or(0, |p| p.workspace.device_bytes());
            let bytes = (2 * len + 2 * kv_len + shape.rows()) as u64 * 4 + workspace;
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
    if a.pack > 0 {
        mixed_lengths(&ctx, &a)?;
    }
    Ok(())
}
