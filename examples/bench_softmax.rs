//! What the softmax variants (docs/variants.md) cost, in one process: dense attention and FMA
//! fine queries, causal, on one device and the same resident tensors, the plain softmax against
//! the softcap, the sinks and a sliding window (L, 0), cases rotated each repetition, wall clock
//! around submit + wait, median after a warm-up. Each variant's time is printed with its ratio
//! to the plain kernel's at the same n; the window's column shows its cost growing with the
//! window, not with n (dense skips the key tiles outside the band; `Attention` runs FMA with a
//! window on that same banded kernel, docs/variants.md; its block m is set to the window,
//! m = L, which FMA's rules require).
//!
//! `cargo run --release --example bench_softmax [-- --n 4096,16384 --window 256 --reps 3]`

use std::time::Instant;

use clap::Parser;
use multipole_attn::gpu::{Attention, Encode, GpuContext, GpuTensors};
use multipole_attn::random::normal_tensor;
use multipole_attn::{FmaConfig, Problem, Shape, Variants, Window};
use wgpu::util::DeviceExt;

#[derive(Parser)]
struct Args {
    /// Sequence lengths.
    #[arg(long, value_delimiter = ',', default_value = "4096,16384")]
    n: Vec<usize>,
    /// Head dimension.
    #[arg(long, default_value_t = 64)]
    head_dim: usize,
    /// Query heads (one sink each).
    #[arg(long, default_value_t = 2)]
    heads: usize,
    /// The sliding window's left extent L (the window is (L, 0), causal).
    #[arg(long, default_value_t = 256)]
    window: usize,
    /// Timed repetitions per case (median reported), after one warm-up each.
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
        "adapter {} ({:?}); subgroups {:?}; causal, {} heads, d = {}, wall clock, median of {}",
        ctx.info.name,
        ctx.info.backend,
        ctx.subgroup_kernels(),
        a.heads,
        a.head_dim,
        a.reps
    );
    let variants = [
        ("plain", Variants::default()),
        (
            "softcap 30",
            Variants {
                softcap: Some(30.0),
                ..Variants::default()
            },
        ),
        (
            "sinks",
            Variants {
                sinks: Some(normal_tensor(7, a.heads)),
                ..Variants::default()
            },
        ),
        (
            "window",
            Variants {
                window: Some(Window {
                    left: a.window,
                    right: 0,
                }),
                ..Variants::default()
            },
        ),
    ];
    println!("| kernel | n | variant | ms | / plain |");
    println!("|---|---|---|---|---|");
    for &n in &a.n {
        let shape = Shape::new(1, a.heads, n, a.head_dim);
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
        let once = |kernel: &Attention, p: &Problem| -> Result<f64, BoxError> {
            let start = Instant::now();
            let mut enc = ctx.device.create_command_encoder(&Default::default());
            kernel.forward(p, Encode(&mut enc, t))?;
            ctx.queue.submit([enc.finish()]);
            ctx.device.poll(wgpu::PollType::wait_indefinitely())?;
            Ok(start.elapsed().as_secs_f64() * 1e3)
        };
        // FMA's window is its near field: a block of L covers it.
        let fma = Attention::fma(&ctx, FmaConfig::new(64, 2))?;
        let fma_window = Attention::fma(&ctx, FmaConfig::new(a.window.max(1), 1))?;
        let dense = Attention::dense(&ctx)?;
        for (name, kernel) in [("FMA fine", &fma), ("dense", &dense)] {
            let cases: Vec<(&str, &Attention, Problem)> = variants
                .iter()
                .map(|(label, v)| {
                    let k = if *label == "window" && name == "FMA fine" {
                        &fma_window
                    } else {
                        kernel
                    };
                    (
                        *label,
                        k,
                        Problem::new(shape).causal(true).variants(v.clone()),
                    )
                })
                .collect();
            for (_, k, p) in &cases {
                once(k, p)?; // warm-up: pipelines
            }
            let mut times = vec![Vec::new(); cases.len()];
            for rep in 0..a.reps {
                for i in 0..cases.len() {
                    let c = (i + rep) % cases.len();
                    times[c].push(once(cases[c].1, &cases[c].2)?);
                }
            }
            let ms: Vec<f64> = times.into_iter().map(median).collect();
            for (i, (label, _, _)) in cases.iter().enumerate() {
                println!(
                    "| {name} | {n} | {label} | {:.1} | {:.2} |",
                    ms[i],
                    ms[i] / ms[0]
                );
            }
        }
    }
    Ok(())
}
