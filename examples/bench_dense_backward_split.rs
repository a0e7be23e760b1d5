//! What splitting one dense head's backward across storage bindings costs (issue 27): training
//! (`Attention::train` + `backward` on host tensors) of one dense head, unsplit against split
//! under a smaller binding (`Attention::max_binding`, default: a third of a head's tensor, so
//! each head is 3-4 chunks), in one process on one context, runs interleaved (unsplit, split,
//! unsplit, ...) so drift hits both; median wall clock of `--reps` runs after a warm-up, and
//! the split run's distance from the unsplit one.
//!
//! `cargo run --release --example bench_dense_backward_split [-- --n 2048,4096 --head-dim 32 --causal]`

use std::time::Instant;

use clap::Parser;
use multipole_attn::gpu::{Attention, GpuContext, Host, HostGrad};
use multipole_attn::plan::{DenseBackwardSplitPlan, KernelLimits};
use multipole_attn::random::normal_tensor;
use multipole_attn::{Gradients, Problem, Shape};

#[derive(Parser)]
struct Args {
    /// Sequence lengths of the heads.
    #[arg(long, value_delimiter = ',', default_value = "2048,4096")]
    n: Vec<usize>,
    /// Head dimension.
    #[arg(long, default_value_t = 32)]
    head_dim: usize,
    /// The causal mask.
    #[arg(long)]
    causal: bool,
    /// Binding of the split runs in KiB [default: a third of a head's tensor].
    #[arg(long)]
    binding_kib: Option<u64>,
    /// Timed repetitions of each (median reported), after one warm-up of each.
    #[arg(long, default_value_t = 5)]
    reps: usize,
}

/// One training step's times in ms: (forward, backward), and its gradients.
fn step(att: &Attention, p: &Problem, x: &[Vec<f32>; 4]) -> ((f64, f64), Gradients<f32>) {
    let t = Instant::now();
    let (_, saved) = att.train(p, Host::new(&x[0], &x[1], &x[2])).expect("train");
    let forward = t.elapsed().as_secs_f64() * 1e3;
    let t = Instant::now();
    let g = att.backward(&saved, HostGrad(&x[3])).expect("backward");
    ((forward, t.elapsed().as_secs_f64() * 1e3), g)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Largest |a - b| over max(1, max|b|).
fn distance(a: &[f32], b: &[f32]) -> f64 {
    let scale = b.iter().fold(1.0f64, |m, &x| m.max(f64::from(x).abs()));
    let worst = a.iter().zip(b).fold(0.0f64, |m, (&x, &y)| {
        m.max((f64::from(x) - f64::from(y)).abs())
    });
    worst / scale
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    env_logger::init();
    let a = Args::parse();
    let ctx = GpuContext::new()?;
    println!("adapter {} ({:?})", ctx.info.name, ctx.info.backend);
    println!(
        "| n | d | causal | binding KiB | chunks | forward ms | split | backward ms | split | \
         backward split / unsplit | gradients' distance |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    let d = a.head_dim;
    for &n in &a.n {
        let shape = Shape::new(1, 1, n, d);
        let binding = a
            .binding_kib
            .map_or((n * d * 4 / 3) as u64, |kib| kib << 10);
        let limits = KernelLimits::from_wgpu(&ctx.limits).capped(binding);
        let chunks = DenseBackwardSplitPlan::new((n, d, 1), a.causal, &limits, None)?
            .chunks
            .len();
        let whole = Attention::dense(&ctx)?;
        let split = Attention::dense(&ctx)?.max_binding(binding)?;
        let x = [1u64, 2, 3, 4].map(|s| normal_tensor(s, n * d));
        let problem = Problem::new(shape).causal(a.causal);
        let (mut fu, mut bu, mut fs, mut bs) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let (mut gu, mut gs) = (None, None);
        for rep in 0..=a.reps {
            let ((f, b), g) = step(&whole, &problem, &x);
            let ((f2, b2), g2) = step(&split, &problem, &x);
            if rep > 0 {
                fu.push(f);
                bu.push(b);
                fs.push(f2);
                bs.push(b2);
            }
            (gu, gs) = (Some(g), Some(g2));
        }
        let (gu, gs) = (gu.expect("a run"), gs.expect("a run"));
        let (bu, bs) = (median(bu), median(bs));
        let dist = distance(&gs.dq, &gu.dq)
            .max(distance(&gs.dk, &gu.dk))
            .max(distance(&gs.dv, &gu.dv));
        println!(
            "| {n} | {d} | {} | {} | {chunks} | {:.1} | {:.1} | {bu:.1} | {bs:.1} | {:.2}x | \
             {dist:.1e} |",
            a.causal,
            binding >> 10,
            median(fu),
            median(fs),
            bs / bu,
        );
    }
    Ok(())
}
