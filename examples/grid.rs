//! 2D FMA (algorithm.md §9) against dense attention and against 1D FMA of the same tokens
//! flattened in raster order: accuracy on a smooth image-like pattern and on i.i.d. input, and
//! the time of each on this adapter.
//!
//! `cargo run --release --example grid [-- --sides 32,64,128 --head-dim 32 --cell 8 --rank 2]`
//!
//! Accuracy: relative error ||O - O_dense||_F / ||O_dense||_F on the GPU, one head, for 2D FMA
//! with cells r x r and for 1D FMA with block m = 3 r^2 (the same near-field size: 3 m = 9 r^2
//! keys) and the same p, both Average, fine queries. The smooth input: channel c of Q, K and V
//! is a low-frequency plane wave cos(2 pi (f_c y + g_c x) / side + phi_c) (f_c, g_c in 0..3)
//! plus N(0, 0.05) noise, scaled so that logits are O(1..5): nearby pixels have nearby keys
//! and values, as in an image. Time: the median of `--reps` forwards of tensors already on the
//! GPU (record, submit, wait; the first call per shape is a warm-up), wall clock.

use std::time::Instant;

use clap::Parser;
use multipole_attn::gpu::{Attention, GpuContext, GpuTensors, Host, Resident};
use multipole_attn::random::normal_tensor;
use multipole_attn::{FmaConfig, Grid, Problem, Result, Shape};
use wgpu::util::DeviceExt;

#[derive(Parser)]
struct Args {
    /// Grid sides (square grids side x side).
    #[arg(long, value_delimiter = ',', default_value = "32,64,128")]
    sides: Vec<usize>,
    /// Head dimension.
    #[arg(long, default_value_t = 32)]
    head_dim: usize,
    /// Cell side r.
    #[arg(long, default_value_t = 8)]
    cell: usize,
    /// Rank p.
    #[arg(long, default_value_t = 2)]
    rank: usize,
    /// Timed repetitions per point.
    #[arg(long, default_value_t = 3)]
    reps: usize,
}

fn main() {
    env_logger::init();
    if let Err(e) = run(Args::parse()) {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

/// The smooth pattern: (side^2, d), channel c a plane wave of low frequency plus a little noise.
fn smooth(seed: u64, side: usize, d: usize, amplitude: f32) -> Vec<f32> {
    let noise = normal_tensor(seed, side * side * d);
    let freq = normal_tensor(seed + 1, 3 * d);
    let mut out = vec![0f32; side * side * d];
    for y in 0..side {
        for x in 0..side {
            for c in 0..d {
                let f = (freq[3 * c].abs() * 1.5).min(3.0);
                let g = (freq[3 * c + 1].abs() * 1.5).min(3.0);
                let phase = freq[3 * c + 2] * 3.0;
                let arg = std::f32::consts::TAU * (f * y as f32 + g * x as f32) / side as f32;
                let t = (y * side + x) * d + c;
                out[t] = amplitude * ((arg + phase).cos() + 0.05 * noise[t]);
            }
        }
    }
    out
}

struct Uploaded {
    q: wgpu::Buffer,
    k: wgpu::Buffer,
    v: wgpu::Buffer,
    out: wgpu::Buffer,
}

impl Uploaded {
    fn new(ctx: &GpuContext, q: &[f32], k: &[f32], v: &[f32]) -> Self {
        let init = |data: &[f32]| {
            ctx.device
                .create_buffer_init(&wgpu::util::BufferInitDescriptor {
                    label: None,
                    contents: bytemuck::cast_slice(data),
                    usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC,
                })
        };
        let out = ctx.device.create_buffer(&wgpu::BufferDescriptor {
            label: None,
            size: (q.len() * 4) as u64,
            usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC,
            mapped_at_creation: false,
        });
        Self {
            q: init(q),
            k: init(k),
            v: init(v),
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

/// Median wall-clock seconds of `f` over `reps` runs after one warm-up, each waited for.
fn time(ctx: &GpuContext, reps: usize, f: impl Fn() -> Result<()>) -> Result<f64> {
    f()?;
    let _ = ctx.device.poll(wgpu::PollType::wait_indefinitely());
    let mut t: Vec<f64> = (0..reps.max(1))
        .map(|_| {
            let start = Instant::now();
            f()?;
            let _ = ctx.device.poll(wgpu::PollType::wait_indefinitely());
            Ok(start.elapsed().as_secs_f64())
        })
        .collect::<Result<_>>()?;
    t.sort_by(f64::total_cmp);
    Ok(t[t.len() / 2])
}

fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    let num: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (num / den).sqrt()
}

fn run(args: Args) -> Result<()> {
    let ctx = GpuContext::new()?;
    println!("adapter: {}", ctx.info.name);
    let (d, r, p) = (args.head_dim, args.cell, args.rank);
    let m = 3 * r * r;
    println!(
        "head_dim {d}, 2D cells {r}x{r}, 1D block m = {m} (same near field), p = {p}, Average"
    );
    println!(
        "{:>9} {:>7} | {:>10} {:>10} | {:>10} {:>10} | {:>9} {:>9} {:>9}",
        "grid", "tokens", "2D smooth", "1D smooth", "2D iid", "1D iid", "dense s", "2D s", "1D s"
    );
    let dense = Attention::dense(&ctx)?;
    for &side in &args.sides {
        let n = side * side;
        let problem = Problem::new(Shape::new(1, 1, n, d));
        let grid = Attention::fma(&ctx, FmaConfig::new(r, p).grid(Some(Grid::new(side, side))))?;
        let line = Attention::fma(&ctx, FmaConfig::new(m, p))?;
        let amplitude = 1.5 / (d as f32).powf(0.25);
        let inputs = [
            (
                smooth(1, side, d, amplitude),
                smooth(2, side, d, amplitude),
                smooth(3, side, d, amplitude),
            ),
            (
                normal_tensor(4, n * d),
                normal_tensor(5, n * d),
                normal_tensor(6, n * d),
            ),
        ];
        let mut errs = Vec::new();
        for (q, k, v) in &inputs {
            let x = Host::new(q, k, v).without_lse();
            let want = dense.forward(&problem, x)?.o;
            for fma in [&grid, &line] {
                errs.push(rel_err(&fma.forward(&problem, x)?.o, &want));
            }
        }
        let (q, k, v) = &inputs[1];
        let res = Uploaded::new(&ctx, q, k, v);
        let td = time(&ctx, args.reps, || {
            dense.forward(&problem, Resident(res.tensors()))
        })?;
        let t2 = time(&ctx, args.reps, || {
            grid.forward(&problem, Resident(res.tensors()))
        })?;
        let t1 = time(&ctx, args.reps, || {
            line.forward(&problem, Resident(res.tensors()))
        })?;
        println!(
            "{:>9} {:>7} | {:>10.2e} {:>10.2e} | {:>10.2e} {:>10.2e} | {:>9.4} {:>9.4} {:>9.4}",
            format!("{side}x{side}"),
            n,
            errs[0],
            errs[1],
            errs[2],
            errs[3],
            td,
            t2,
            t1
        );
    }
    Ok(())
}
