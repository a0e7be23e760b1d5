//! f32 against f16 storage (issue 29) in one process: the FMA forward (fine queries, and
//! coarse queries) and the dense forward (the adapter's kernel, and the tiled kernel forced:
//! `--tiled`) on one device, tensors resident (f32 buffers for the
//! f32 path, f16 buffers for the f16 one, both holding the same f16-representable values),
//! wall clock around submit + wait. Cases alternate in pairs (order swapped every pair) after
//! one warm-up each; the ratio is the median over pairs of t(f16) / t(f32).
//!
//! `cargo run --release --example bench_storage [-- --fine 4096,16384 --dense 4096 --tiled 4096 --reps 7]`

use std::time::Instant;

use clap::Parser;
use multipole_attn::gpu::{Attention, GpuContext, GpuTensors, Resident};
use multipole_attn::plan::DenseKernel;
use multipole_attn::random::normal_tensor;
use multipole_attn::storage::{round_to_f16, to_f16_bits};
use multipole_attn::{FmaConfig, Method, Problem, Queries, Shape, Storage};
use wgpu::util::DeviceExt;

#[derive(Parser)]
struct Args {
    /// Sequence lengths for FMA (fine and coarse queries).
    #[arg(long, value_delimiter = ',', default_value = "4096,16384")]
    fine: Vec<usize>,
    /// Sequence lengths for dense attention (empty: none).
    #[arg(long, value_delimiter = ',', default_value = "4096")]
    dense: Vec<usize>,
    /// Sequence lengths for dense attention on the tiled kernel (`DenseKernel::Tiled`, what a
    /// GPU runs; forced on a CPU adapter) (empty: none).
    #[arg(long, value_delimiter = ',', default_value = "4096")]
    tiled: Vec<usize>,
    /// Head dimension.
    #[arg(long, default_value_t = 64)]
    head_dim: usize,
    /// Timed pairs per case (median of the ratios reported), after one warm-up each.
    #[arg(long, default_value_t = 7)]
    reps: usize,
}

type BoxError = Box<dyn std::error::Error>;

fn buffer(ctx: &GpuContext, bytes: &[u8]) -> wgpu::Buffer {
    let mut b = bytes.to_vec();
    b.resize(b.len().next_multiple_of(4).max(16), 0);
    ctx.device
        .create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: Some("bench tensor"),
            contents: &b,
            usage: wgpu::BufferUsages::STORAGE,
        })
}

/// Resident Q, K, V, O and LSE of one storage.
struct Tensors([wgpu::Buffer; 5]);

impl Tensors {
    fn new(ctx: &GpuContext, shape: Shape, storage: Storage, seed: u64) -> Self {
        let x = |s| round_to_f16(&normal_tensor(seed + s, shape.elements()));
        let bytes = |v: Vec<f32>| match storage {
            Storage::F32 => bytemuck::cast_slice(&v).to_vec(),
            Storage::F16 => bytemuck::cast_slice(&to_f16_bits("x", &v).unwrap()).to_vec(),
        };
        let o = vec![0.0f32; shape.elements()];
        let lse = vec![0.0f32; shape.rows()];
        Self([
            buffer(ctx, &bytes(x(0))),
            buffer(ctx, &bytes(x(1))),
            buffer(ctx, &bytes(x(2))),
            buffer(ctx, &bytes(o)),
            buffer(ctx, bytemuck::cast_slice(&lse)),
        ])
    }

    fn io(&self) -> GpuTensors<'_> {
        let [q, k, v, out, lse] = &self.0;
        GpuTensors {
            q,
            k,
            v,
            out,
            lse: Some(lse),
        }
    }
}

/// Seconds of one resident forward, submit to idle.
fn time(ctx: &GpuContext, a: &Attention, p: &Problem, t: &Tensors) -> Result<f64, BoxError> {
    let start = Instant::now();
    a.forward(p, Resident(t.io()))?;
    ctx.device.poll(wgpu::PollType::wait_indefinitely())?;
    Ok(start.elapsed().as_secs_f64())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> Result<(), BoxError> {
    let args = Args::parse();
    let ctx = GpuContext::new()?;
    println!("adapter: {} ({:?})", ctx.info.name, ctx.info.backend);
    let d = args.head_dim;
    let mut cases: Vec<(&str, Method, usize, Option<DenseKernel>)> = Vec::new();
    for &n in &args.fine {
        cases.push(("FMA fine", Method::Fma(FmaConfig::new(64, 2)), n, None));
        let coarse = FmaConfig::new(64, 2).queries(Queries::Coarse);
        cases.push(("FMA coarse", Method::Fma(coarse), n, None));
    }
    for &n in &args.dense {
        cases.push(("dense", Method::Dense, n, None));
    }
    for &n in &args.tiled {
        cases.push(("dense tiled", Method::Dense, n, Some(DenseKernel::Tiled)));
    }
    println!("| method | n | f32 ms (median) | f16 ms (median) | f16 / f32 (median of pairs) |");
    println!("|---|---|---|---|---|");
    for (name, method, n, kernel) in cases {
        let p = Problem::new(Shape::new(1, 1, n, d));
        let with_kernel = |a: Attention| match kernel {
            Some(k) => a.dense_kernel(k),
            None => Ok(a),
        };
        let a32 = with_kernel(Attention::new(&ctx, method.clone())?)?;
        let a16 = with_kernel(Attention::new(&ctx, method)?)?.storage(Storage::F16)?;
        let t32 = Tensors::new(&ctx, p.shape, Storage::F32, 7);
        let t16 = Tensors::new(&ctx, p.shape, Storage::F16, 7);
        // Warm-up: pipelines, uniforms, workspaces.
        time(&ctx, &a32, &p, &t32)?;
        time(&ctx, &a16, &p, &t16)?;
        let (mut s32, mut s16, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
        for rep in 0..args.reps {
            let (x32, x16) = if rep % 2 == 0 {
                let a = time(&ctx, &a32, &p, &t32)?;
                (a, time(&ctx, &a16, &p, &t16)?)
            } else {
                let b = time(&ctx, &a16, &p, &t16)?;
                (time(&ctx, &a32, &p, &t32)?, b)
            };
            s32.push(x32);
            s16.push(x16);
            ratios.push(x16 / x32);
        }
        println!(
            "| {name} | {n} | {:.1} | {:.1} | {:.3} |",
            1e3 * median(s32),
            1e3 * median(s16),
            median(ratios)
        );
    }
    Ok(())
}
