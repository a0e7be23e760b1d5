//! The main job: FMA with fine queries and with coarse queries (algorithm.md §6; bidirectional
//! only, so skipped with --causal) on a built-in input (fixed seed, n = 8192, 4 heads,
//! head_dim 64) on the default adapter, against exact dense attention on the same GPU.
//!
//! `cargo run --release --example demo [-- --n 8192 --heads 4 --head-dim 64 --causal]`
//!
//! Three inputs: keys and values that vary smoothly along the sequence (what FMA's coarse levels
//! are built for) with i.i.d. queries; smooth queries, keys and values (what coarse queries,
//! which pool the queries too, are built for); and i.i.d. Gaussian ones (the worst case: no
//! far-field structure at all).
//! Errors are measured on sampled rows against exact dense attention computed in f64 on the CPU.

use std::time::Instant;

use clap::Parser;
use multipole_attn::cpu::{dense_attention_rows, widen};
use multipole_attn::gpu::{Attention, GpuContext, Host, Output, Plan};
use multipole_attn::random::{normal_tensor, smooth_tensor};
use multipole_attn::{FmaConfig, Problem, Queries, Result, Shape};

#[derive(Parser)]
struct Args {
    /// Sequence length.
    #[arg(long, default_value_t = 8192)]
    n: usize,
    /// Heads (batch is 1).
    #[arg(long, default_value_t = 4)]
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
    /// Causal mask.
    #[arg(long)]
    causal: bool,
    /// Timed FMA repetitions (median printed).
    #[arg(long, default_value_t = 5)]
    reps: usize,
    /// Timed dense repetitions (median printed; dense is slow on a software GPU).
    #[arg(long, default_value_t = 1)]
    dense_reps: usize,
    /// Rows sampled for the error against exact attention.
    #[arg(long, default_value_t = 64)]
    sample_rows: usize,
}

/// Median wall-clock seconds (upload, submit, wait, readback) over `reps` runs.
fn time<F: FnMut() -> Result<Output>>(reps: usize, mut f: F) -> Result<(f64, Output)> {
    let mut times = Vec::new();
    let mut out = None;
    for _ in 0..reps.max(1) {
        let t = Instant::now();
        out = Some(f()?);
        times.push(t.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    Ok((times[times.len() / 2], out.expect("at least one run")))
}

struct Input {
    name: &'static str,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
}

/// Q, K, V of `x` as host inputs; O only.
fn host(x: &Input) -> Host<'_> {
    Host::new(&x.q, &x.k, &x.v).without_lse()
}

/// Max abs error and relative Frobenius error of `o` on `rows` against f64 dense attention.
fn error(x: &Input, shape: Shape, causal: bool, o: &[f32], rows: &[usize]) -> Result<(f64, f64)> {
    let d = shape.head_dim;
    let (exact, _) = dense_attention_rows(
        &widen(&x.q),
        &widen(&x.k),
        &widen(&x.v),
        shape,
        causal,
        rows,
    )?;
    let (mut max_abs, mut num, mut den) = (0f64, 0f64, 0f64);
    for (r, &row) in rows.iter().enumerate() {
        for c in 0..d {
            let (a, b) = (o[row * d + c] as f64, exact[r * d + c]);
            max_abs = max_abs.max((a - b).abs());
            num += (a - b).powi(2);
            den += b.powi(2);
        }
    }
    Ok((max_abs, (num / den).sqrt()))
}

fn main() {
    env_logger::init();
    if let Err(e) = run(Args::parse()) {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

fn run(a: Args) -> Result<()> {
    let ctx = GpuContext::new()?;
    println!(
        "adapter:  {} ({:?}, {:?}, {} {})",
        ctx.info.name,
        ctx.info.backend,
        ctx.info.device_type,
        ctx.info.driver,
        ctx.info.driver_info
    );
    let shape = Shape::new(1, a.heads, a.n, a.head_dim);
    let problem = Problem::new(shape).causal(a.causal);
    let cfg = FmaConfig::new(a.block, a.rank);
    println!(
        "input:    {shape}, seed 2310, causal {}, m {}, p {}",
        a.causal, a.block, a.rank
    );
    let fma = Attention::fma(&ctx, cfg.clone())?;
    // Coarse queries are bidirectional only: asking for them with --causal is a typed error.
    let coarse = (!a.causal)
        .then(|| Attention::fma(&ctx, cfg.queries(Queries::Coarse)))
        .transpose()?;
    let dense = Attention::dense(&ctx)?;
    if let Plan::Fma(plan) = fma.plan(&problem)? {
        println!(
            "plan:     {} coarse levels, {} dispatches in one submit (fine queries)",
            plan.levels.count(),
            plan.steps().len()
        );
    }
    if let Some(Plan::Fma(plan)) = coarse.as_ref().map(|c| c.plan(&problem)).transpose()? {
        println!(
            "          {} dispatches in one submit (coarse queries)",
            plan.steps().len()
        );
    }

    let (h, n, d) = (a.heads, a.n, a.head_dim);
    let inputs = [
        Input {
            name: "smooth K, V",
            q: normal_tensor(2310, shape.elements()),
            k: smooth_tensor(2311, h, n, d, 0.1),
            v: smooth_tensor(2312, h, n, d, 0.1),
        },
        // Coarse queries pool Q as well: they need queries with far-field structure too.
        Input {
            name: "smooth Q, K, V",
            q: smooth_tensor(2313, h, n, d, 0.1),
            k: smooth_tensor(2311, h, n, d, 0.1),
            v: smooth_tensor(2312, h, n, d, 0.1),
        },
        Input {
            name: "i.i.d. K, V",
            q: normal_tensor(2310, shape.elements()),
            k: normal_tensor(2311, shape.elements()),
            v: normal_tensor(2312, shape.elements()),
        },
    ];
    // Warm-up on a short sequence compiles the same pipelines (they depend on d, m, limits).
    let small = Problem::new(Shape::new(1, 1, a.block.max(64) * 4, d)).causal(a.causal);
    let z = normal_tensor(1, small.shape.elements());
    let zs = Host::new(&z, &z, &z).without_lse();
    fma.forward(&small, zs)?;
    if let Some(c) = &coarse {
        c.forward(&small, zs)?;
    }
    dense.forward(&small, zs)?;

    let step = (shape.rows() / a.sample_rows.max(1)).max(1);
    let rows: Vec<usize> = (0..shape.rows()).step_by(step).collect();
    let (t_fma, o_fma) = time(a.reps, || fma.forward(&problem, host(&inputs[0])))?;
    let timed_coarse = match &coarse {
        Some(c) => Some(time(a.reps, || c.forward(&problem, host(&inputs[0])))?),
        None => None,
    };
    let (t_dense, o_dense) = time(a.dense_reps, || dense.forward(&problem, host(&inputs[0])))?;
    println!(
        "FMA:      {:9.1} ms  (fine queries, median of {}, wall clock incl. upload and readback)",
        t_fma * 1e3,
        a.reps
    );
    match &timed_coarse {
        Some((t, _)) => println!(
            "FMA:      {:9.1} ms  (coarse queries, median of {})",
            t * 1e3,
            a.reps
        ),
        None => println!("FMA:      coarse queries skipped (bidirectional only; --causal given)"),
    }
    println!(
        "dense:    {:9.1} ms  (median of {})",
        t_dense * 1e3,
        a.dense_reps
    );
    println!("speed-up: {:9.1}x (fine queries vs dense)", t_dense / t_fma);
    if let Some((t, _)) = &timed_coarse {
        println!("speed-up: {:9.1}x (coarse queries vs dense)", t_dense / t);
    }
    let (dense_err, _) = error(&inputs[0], shape, a.causal, &o_dense.o, &rows)?;
    println!(
        "dense GPU vs f64 exact: max abs {dense_err:.2e} on {} rows",
        rows.len()
    );
    for (i, x) in inputs.iter().enumerate() {
        let o = if i == 0 {
            o_fma.o.clone()
        } else {
            fma.forward(&problem, host(x))?.o
        };
        let (max_abs, rel) = error(x, shape, a.causal, &o, &rows)?;
        let name = format!("{}:", x.name);
        println!("FMA error vs exact attention, fine queries,   {name:<15} max abs {max_abs:.2e}, relative {rel:.2e}  ({} rows)", rows.len());
        if let (Some(c), Some((_, o_c))) = (&coarse, &timed_coarse) {
            let o = if i == 0 {
                o_c.o.clone()
            } else {
                c.forward(&problem, host(x))?.o
            };
            let (max_abs, rel) = error(x, shape, a.causal, &o, &rows)?;
            println!("FMA error vs exact attention, coarse queries, {name:<15} max abs {max_abs:.2e}, relative {rel:.2e}  ({} rows)", rows.len());
        }
    }
    Ok(())
}
