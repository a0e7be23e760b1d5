//! One head longer than the adapter's storage-binding limit, at the adapter's real limit: FMA
//! cuts its sequence into chunks (`plan::SplitPlan`), and the output is checked against the f64 CPU
//! reference.
//!
//! `cargo run --release --example long_head [-- --head-dim 16 --over 1.05]`
//!
//! The sequence is `over` times the longest head one binding holds (2^21 tokens at head_dim
//! 16 under 128 MiB), so Q, K, V and O of the single head each exceed a binding.

use std::time::Instant;

use clap::Parser;
use multipole_attn::cpu::{fma_forward, widen};
use multipole_attn::gpu::{Attention, GpuContext, Host};
use multipole_attn::plan::KernelLimits;
use multipole_attn::plan::SplitPlan;
use multipole_attn::random::smooth_tensor;
use multipole_attn::{FmaConfig, Problem, Shape};

#[derive(Parser)]
struct Args {
    /// Head dimension.
    #[arg(long, default_value_t = 16)]
    head_dim: usize,
    /// Sequence length as a multiple of the longest head one binding holds (> 1 to split).
    #[arg(long, default_value_t = 1.05)]
    over: f64,
    /// Block size m.
    #[arg(long, default_value_t = 64)]
    block: usize,
    /// Rank p.
    #[arg(long, default_value_t = 2)]
    rank: usize,
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    env_logger::init();
    let a = Args::parse();
    let ctx = GpuContext::new()?;
    let limits = KernelLimits::from_wgpu(&ctx.limits);
    let d = a.head_dim;
    let n = ((limits.binding_bytes() / (d as u64 * 4)) as f64 * a.over) as usize;
    let shape = Shape::new(1, 1, n, d);
    let cfg = FmaConfig::new(a.block, a.rank);
    let plan = SplitPlan::new(n, d, &cfg, &limits)?;
    println!(
        "adapter {} ({:?}); binding limit {} MiB; one head of n = {n}, d = {d}: {:.1} MiB per tensor, {} chunks",
        ctx.info.name,
        ctx.info.backend,
        limits.binding_bytes() >> 20,
        (n * d * 4) as f64 / (1 << 20) as f64,
        plan.chunks.len()
    );
    // Smooth Q, K and V (deterministic): realistic magnitudes for the error check.
    let q = smooth_tensor(1, 1, n, d, 0.1);
    let k = smooth_tensor(2, 1, n, d, 0.1);
    let v = smooth_tensor(3, 1, n, d, 0.1);
    let fma = Attention::fma(&ctx, cfg.clone())?;
    let t = Instant::now();
    let out = fma.forward(&Problem::new(shape), Host::new(&q, &k, &v))?;
    let gpu_s = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let r = fma_forward(&widen(&q), &widen(&k), &widen(&v), shape, &cfg)?;
    let cpu_s = t.elapsed().as_secs_f64();
    let worst = out
        .o
        .iter()
        .zip(&r.o)
        .map(|(&g, &x)| ((g as f64 - x).abs() / (1.0 + x.abs()), g.is_nan()))
        .fold(
            0f64,
            |m, (e, nan)| if nan { f64::INFINITY } else { m.max(e) },
        );
    println!(
        "GPU {gpu_s:.1} s (upload, {} chunks, readback); f64 CPU reference {cpu_s:.1} s; worst |gpu - ref| / (1 + |ref|) = {worst:.2e}",
        plan.chunks.len()
    );
    if worst > 1e-4 {
        return Err(format!("error {worst:.2e} over the 1e-4 bound").into());
    }
    Ok(())
}
