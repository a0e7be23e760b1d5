//! 2D FMA (algorithm.md §9; fine and coarse queries) against dense attention on the same
//! adapter, on square grids side x side: median wall-clock time of forwards of tensors resident
//! on the GPU (record, submit, wait) after one warm-up, GFLOP/s of the attention work done, and
//! t(4n)/t(n) from one side to the next when the side doubles (n log n: a bit above 4; n: 4;
//! dense n^2: 16).
//!
//! `cargo run --release --example bench_grid [-- --sides 64,128,256,512 --dense-max-side 128
//! --fma-max-side 256 --head-dim 64 --cell 8 --rank 2 --reps 3 --dense-reps 3]`
//!
//! The defaults fit about ten minutes on lavapipe (2 shared cores), where one 512 x 512 forward
//! took 163 s (fine queries) and 126 s (coarse): pass `--fma-max-side 512` for that side.
//!
//! FLOPs counted: 4 d per (query, key) pair a query attends to (2 d for the score, 2 d for the
//! value sum), from the library's 2D geometry (`GridGeometry`): fine queries, every token's
//! near keys (its 3 x 3 fine cells) and its coarse keys at every level; coarse queries, every
//! token's near keys and at each level every non-empty band's coarse query times its cell's far
//! coarse keys; dense, n^2. The downsampling (d per token per level), softmax and merges are not
//! counted. Dense sides above `--dense-max-side` are not run (on lavapipe dense attention over
//! 16384 keys takes ~40 s, and llvmpipe returns wrong results from 32768 keys per query on):
//! the table says "skipped (est. X s)", the time of the largest side run scaled by n^2.

use std::time::Instant;

use clap::Parser;
use indicatif::{ProgressBar, ProgressStyle};
use multipole_attn::geometry::{Geometry, GridGeometry};
use multipole_attn::gpu::{Attention, GpuContext, GpuTensors};
use multipole_attn::random::normal_tensor;
use multipole_attn::{FmaConfig, Grid, Problem, Queries, Shape};
use wgpu::util::DeviceExt;

#[derive(Parser)]
struct Args {
    /// Grid sides (square grids side x side; tokens side^2).
    #[arg(long, value_delimiter = ',', default_value = "64,128,256,512")]
    sides: Vec<usize>,
    /// Largest side dense attention runs at (beyond: an estimate from n^2 scaling).
    #[arg(long, default_value_t = 128)]
    dense_max_side: usize,
    /// Largest side FMA runs at (on a loaded lavapipe one 512 x 512 forward takes 2-3 min).
    #[arg(long, default_value_t = 256)]
    fma_max_side: usize,
    /// Head dimension d.
    #[arg(long, default_value_t = 64)]
    head_dim: usize,
    /// Cell side r (the 2D default of examples/grid.rs and the CLI's tests).
    #[arg(long, default_value_t = 8)]
    cell: usize,
    /// Rank p (coarse keys per cell).
    #[arg(long, default_value_t = 2)]
    rank: usize,
    /// Timed FMA repetitions (median reported), after one warm-up.
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// Timed dense repetitions (median reported), after one warm-up.
    #[arg(long, default_value_t = 3)]
    dense_reps: usize,
}

/// Q, K, V and O of one shape, resident on the GPU.
struct Resident {
    q: wgpu::Buffer,
    k: wgpu::Buffer,
    v: wgpu::Buffer,
    out: wgpu::Buffer,
}

impl Resident {
    fn new(ctx: &GpuContext, shape: Shape) -> Self {
        let init = |seed: u64| {
            ctx.device
                .create_buffer_init(&wgpu::util::BufferInitDescriptor {
                    label: None,
                    contents: bytemuck::cast_slice(&normal_tensor(seed, shape.elements())),
                    usage: wgpu::BufferUsages::STORAGE,
                })
        };
        let out = ctx.device.create_buffer(&wgpu::BufferDescriptor {
            label: None,
            size: (shape.elements() * 4) as u64,
            usage: wgpu::BufferUsages::STORAGE,
            mapped_at_creation: false,
        });
        Self {
            q: init(1),
            k: init(2),
            v: init(3),
            out,
        }
    }

    fn tensors(&self) -> GpuTensors<'_> {
        GpuTensors {
            q: &self.q,
            k: &self.k,
            v: &self.v,
            out: &self.out,
            lse: None,
        }
    }
}

/// Median seconds of `reps` runs of `run` (each waited for), after one warm-up.
fn median_s(
    ctx: &GpuContext,
    reps: usize,
    run: impl Fn() -> multipole_attn::Result<()>,
) -> multipole_attn::Result<f64> {
    let mut times = Vec::new();
    for i in 0..=reps.max(1) {
        let t = Instant::now();
        run()?;
        let _ = ctx.device.poll(wgpu::PollType::wait_indefinitely());
        if i > 0 {
            times.push(t.elapsed().as_secs_f64());
        }
    }
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}

/// (query, key) pairs FMA attends to on `geometry`: (fine queries, coarse queries).
fn pairs(geometry: &GridGeometry) -> (u64, u64) {
    let n = geometry.tokens();
    let near: u64 = (0..n)
        .map(|i| {
            geometry
                .fine_keys(i)
                .iter()
                .map(|r| r.len() as u64)
                .sum::<u64>()
        })
        .sum();
    let mut fine = near;
    let mut coarse = near;
    for level in 1..=geometry.num_levels() {
        fine += (0..n)
            .map(|i| geometry.coarse_rows(i, level).len() as u64)
            .sum::<u64>();
        // One coarse query per non-empty band; all bands of a cell share its far list, so
        // the band's first token stands for it.
        coarse += (0..geometry.level_rows(level))
            .filter_map(|row| geometry.row_tokens(level, row).first().map(|t| t.start))
            .map(|t| geometry.coarse_rows(t, level).len() as u64)
            .sum::<u64>();
    }
    (fine, coarse)
}

fn cell(t: Option<f64>) -> String {
    t.map_or("skipped".into(), |t| format!("{:.3}", t))
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    env_logger::init();
    let a = Args::parse();
    let ctx = GpuContext::new()?;
    let (d, r, p) = (a.head_dim, a.cell, a.rank);
    println!(
        "adapter {} ({:?}); d = {d}, cells {r} x {r}, p = {p}, Average, 1 head; wall clock, \
         median of {} (FMA) / {} (dense) after a warm-up",
        ctx.info.name, ctx.info.backend, a.reps, a.dense_reps
    );
    let dense = Attention::dense(&ctx)?;
    let bar = ProgressBar::new(a.sides.len() as u64);
    bar.set_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} {msg} [{elapsed}]")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    // (side, fine s, coarse s, dense s or None, fine pairs, coarse pairs)
    type Row = (usize, Option<f64>, Option<f64>, Option<f64>, u64, u64);
    let mut rows: Vec<Row> = Vec::new();
    for &side in &a.sides {
        let n = side * side;
        let shape = Shape::new(1, 1, n, d);
        let problem = Problem::new(shape);
        let grid = Grid::new(side, side);
        let res = Resident::new(&ctx, shape);
        let (fine_pairs, coarse_pairs) = pairs(&GridGeometry::new(grid, r, p));
        let fma_time = |queries| -> multipole_attn::Result<Option<f64>> {
            if side > a.fma_max_side {
                return Ok(None);
            }
            bar.set_message(format!("{side}x{side} FMA {queries:?}"));
            let cfg = FmaConfig::new(r, p).grid(Some(grid)).queries(queries);
            let fma = Attention::fma(&ctx, cfg)?;
            median_s(&ctx, a.reps, || {
                fma.forward(&problem, multipole_attn::gpu::Resident(res.tensors()))
            })
            .map(Some)
        };
        let fine = fma_time(Queries::Fine)?;
        let coarse = fma_time(Queries::Coarse)?;
        let dense_t = if side <= a.dense_max_side {
            bar.set_message(format!("{side}x{side} dense"));
            Some(median_s(&ctx, a.dense_reps, || {
                dense.forward(&problem, multipole_attn::gpu::Resident(res.tensors()))
            })?)
        } else {
            None
        };
        let secs = |t: Option<f64>| t.map_or("skipped".into(), |t| format!("{t:.3} s"));
        bar.suspend(|| {
            println!(
                "{side}x{side} ({n} tokens): fine {}, coarse {}, dense {}",
                secs(fine),
                secs(coarse),
                secs(dense_t)
            )
        });
        rows.push((side, fine, coarse, dense_t, fine_pairs, coarse_pairs));
        bar.inc(1);
    }
    bar.finish_and_clear();

    // The estimate for dense sides not run: the largest side run, scaled by n^2.
    let last_dense = rows
        .iter()
        .filter_map(|r| r.3.map(|t| (r.0 * r.0, t)))
        .next_back();
    let gflops = |pairs: u64, t: Option<f64>| {
        t.map_or(String::new(), |t| {
            format!("{:.2}", 4.0 * d as f64 * pairs as f64 / t / 1e9)
        })
    };
    let ratio = |i: usize, f: fn(&Row) -> Option<f64>| -> String {
        match (i.checked_sub(1).map(|j| &rows[j]), &rows[i]) {
            (Some(prev), row) if row.0 == 2 * prev.0 => match (f(prev), f(row)) {
                (Some(a), Some(b)) => format!("{:.2}", b / a),
                _ => String::new(),
            },
            _ => String::new(),
        }
    };
    println!();
    println!(
        "| grid | tokens | FMA fine s | FMA coarse s | dense s | fine / dense | fine GFLOP/s | \
         coarse GFLOP/s | dense GFLOP/s | t(4n)/t(n) fine, coarse, dense |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for (i, row) in rows.iter().enumerate() {
        let &(side, fine, coarse, dense_t, fp, cp) = row;
        let n = side * side;
        let dense_cell = match (dense_t, last_dense) {
            (Some(t), _) => format!("{t:.3}"),
            (None, Some((n0, t0))) => {
                format!(
                    "skipped (est. {:.0} s)",
                    t0 * (n as f64 / n0 as f64).powi(2)
                )
            }
            (None, None) => "skipped".into(),
        };
        let speedup = match (fine, dense_t, last_dense) {
            (Some(f), Some(t), _) => format!("{:.1}x", t / f),
            (Some(f), None, Some((n0, t0))) => {
                format!("est. {:.0}x", t0 * (n as f64 / n0 as f64).powi(2) / f)
            }
            _ => String::new(),
        };
        println!(
            "| {side} x {side} | {n} | {} | {} | {dense_cell} | {speedup} | {} | {} | {} | {}, {}, {} |",
            cell(fine),
            cell(coarse),
            gflops(fp, fine),
            gflops(cp, coarse),
            gflops((n as u64) * (n as u64), dense_t),
            ratio(i, |r| r.1),
            ratio(i, |r| r.2),
            ratio(i, |r| r.3),
        );
    }
    println!(
        "\nFLOPs: 4 d per (query, key) pair attended: fine queries {} pairs at the largest side \
         FMA ran, dense n^2; downsampling and merges not counted.",
        rows.iter().rfind(|r| r.1.is_some()).map_or(0, |r| r.4)
    );
    Ok(())
}
