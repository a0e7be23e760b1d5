//! What training a variable-length batch over one storage binding costs (issue 27): host
//! `train` + `backward` of one packed batch, unsplit (the adapter's bindings) against the same
//! Attention capped at `--binding-kib` (`Attention::max_binding`: the batch then trains in
//! groups of sequences, `gpu/fma/backward_groups.rs`), FMA and dense, in one process, median
//! wall clock of `--reps` runs after a warm-up, with each grouped time over the unsplit one.
//!
//! `cargo run --release --example bench_varlen_train [-- --seqs 24 --max-len 1500 --binding-kib 4096,1024 --reps 5]`
//!
//! The lengths are fixed by `--seed` (uniform in 1..=max-len); heads 4 over 2 K/V heads.
//! Results: docs/perf.md, change 27.

use std::time::Instant;

use clap::Parser;
use multipole_attn::gpu::{Attention, GpuContext, Host, HostGrad};
use multipole_attn::random::normal_tensor;
use multipole_attn::{FmaConfig, Method, Problem, Sequences};

#[derive(Parser)]
struct Args {
    /// Sequences in the pack.
    #[arg(long, default_value_t = 24)]
    seqs: usize,
    /// Longest sequence (lengths uniform in 1..=max-len).
    #[arg(long, default_value_t = 1500)]
    max_len: usize,
    /// Head dimension.
    #[arg(long, default_value_t = 64)]
    head_dim: usize,
    /// Binding caps of the grouped runs, KiB.
    #[arg(long, value_delimiter = ',', default_value = "4096,1024")]
    binding_kib: Vec<u64>,
    /// Timed repetitions (median reported), after one warm-up.
    #[arg(long, default_value_t = 5)]
    reps: usize,
    /// Seed of the lengths and the tensors.
    #[arg(long, default_value_t = 27)]
    seed: u64,
}

/// Median wall clock (ms) of `train` and of `backward` on `att`, `reps` runs after a warm-up.
fn time(att: &Attention, p: &Problem, x: &[Vec<f32>; 4], reps: usize) -> (f64, f64) {
    let (mut t, mut b) = (Vec::new(), Vec::new());
    for rep in 0..=reps {
        let start = Instant::now();
        let (_, saved) = att.train(p, Host::new(&x[0], &x[1], &x[2])).expect("train");
        let mid = Instant::now();
        att.backward(&saved, HostGrad(&x[3])).expect("backward");
        if rep > 0 {
            t.push((mid - start).as_secs_f64() * 1e3);
            b.push(mid.elapsed().as_secs_f64() * 1e3);
        }
    }
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    (median(t), median(b))
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let ctx = GpuContext::new()?;
    eprintln!("adapter {} ({:?})", ctx.info.name, ctx.info.backend);
    // Lengths uniform in 1..=max-len from a 64-bit LCG (Knuth's constants) seeded by --seed.
    let mut state = args.seed;
    let lengths: Vec<usize> = (0..args.seqs)
        .map(|_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            1 + (state >> 33) as usize % args.max_len
        })
        .collect();
    let seqs = Sequences::packed(lengths)?;
    let (heads, kv_heads, d) = (4, 2, args.head_dim);
    let shape = seqs.shape(heads, kv_heads, d);
    println!(
        "{} sequences, {} tokens (longest {}), heads {heads} over {kv_heads}, d {d}; Q {:.1} MiB",
        args.seqs,
        seqs.total(),
        seqs.max_len(),
        (shape.elements() * 4) as f64 / (1 << 20) as f64
    );
    let x = [
        normal_tensor(args.seed + 1, shape.elements()),
        normal_tensor(args.seed + 2, shape.kv_elements()),
        normal_tensor(args.seed + 3, shape.kv_elements()),
        normal_tensor(args.seed + 4, shape.elements()),
    ];
    println!("| method | mask | binding | train ms | backward ms | train / unsplit | backward / unsplit |");
    println!("|---|---|---|---|---|---|---|");
    for method in [Method::Fma(FmaConfig::new(64, 2)), Method::Dense] {
        let name = match method {
            Method::Fma(_) => "FMA",
            Method::Dense => "dense",
        };
        for causal in [false, true] {
            let p = Problem::varlen(seqs.clone(), heads, kv_heads, d).causal(causal);
            let whole = Attention::new(&ctx, method.clone())?;
            let (t0, b0) = time(&whole, &p, &x, args.reps);
            println!("| {name} | causal={causal} | unsplit | {t0:.0} | {b0:.0} | 1 | 1 |");
            for &kib in &args.binding_kib {
                let grouped = Attention::new(&ctx, method.clone())?.max_binding(kib << 10)?;
                // The cap must split the batch, or the row measures nothing new.
                if grouped.backward_plan(&p).is_ok() {
                    println!("| {name} | causal={causal} | {kib} KiB | (fits: not split) | | | |");
                    continue;
                }
                let (t, b) = time(&grouped, &p, &x, args.reps);
                println!(
                    "| {name} | causal={causal} | {kib} KiB | {t:.0} | {b:.0} | {:.2} | {:.2} |",
                    t / t0,
                    b / b0
                );
            }
        }
    }
    Ok(())
}
