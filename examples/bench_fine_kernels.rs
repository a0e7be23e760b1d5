//! FMA's fused fine-query pass in its two kernels in one process (issue 29's A/B): on one
//! device and the same resident tensors, FMA with the adapter's own choice of kernel
//! ("default": the rows kernel on a CPU adapter such as lavapipe, the tiled one on a GPU), the
//! rows kernel (`shaders/fine_attention.wgsl`) and the tiled one
//! (`shaders/fine_attention_tiled.wgsl`, FlashAttention-2's shape), cases rotated each
//! repetition, wall clock around submit + wait of the whole forward (pooling included), median
//! after a warm-up. Prints each time with its ratio to the default's, the throughput of the
//! attention (4 d FLOPs per key a query sees), the plan's tile, and the largest difference
//! between the rows and the tiled kernels' outputs.
//!
//! `cargo run --release --example bench_fine_kernels [-- --n 4096,16384 --head-dims 64,128]`

use std::time::Instant;

use clap::Parser;
use multipole_attn::gpu::{Attention, Encode, GpuContext, GpuTensors};
use multipole_attn::plan::{FmaKernel, Pass};
use multipole_attn::random::normal_tensor;
use multipole_attn::{FmaConfig, Problem, Shape};
use wgpu::util::DeviceExt;

#[derive(Parser)]
struct Args {
    /// Sequence lengths.
    #[arg(long, value_delimiter = ',', default_value = "1024,4096")]
    n: Vec<usize>,
    /// Head dimensions.
    #[arg(long, value_delimiter = ',', default_value = "64")]
    head_dims: Vec<usize>,
    /// Fine block sizes m.
    #[arg(long, value_delimiter = ',', default_value = "64")]
    blocks: Vec<usize>,
    /// Coarse rank p.
    #[arg(long, default_value_t = 2)]
    rank: usize,
    /// Masks.
    #[arg(long, value_delimiter = ',', default_value = "false,true")]
    causal: Vec<bool>,
    /// Query heads (batch 1).
    #[arg(long, default_value_t = 2)]
    heads: usize,
    /// Timed repetitions per case (median reported), after one warm-up each.
    #[arg(long, default_value_t = 5)]
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
        "adapter {} ({:?}, {:?}); subgroups {:?}; {} heads, p = {}; wall clock, median of {}",
        ctx.info.name,
        ctx.info.backend,
        ctx.info.device_type,
        ctx.subgroup_kernels(),
        a.heads,
        a.rank,
        a.reps
    );
    println!(
        "| n | d | m | causal | kernel | pass | tile x keys | ms | / default | GFLOP/s | max |rows - tiled| |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    for &d in &a.head_dims {
        for &m in &a.blocks {
            for &n in &a.n {
                let shape = Shape::new(1, a.heads, n, d);
                let buf = |seed: u64| {
                    ctx.device
                        .create_buffer_init(&wgpu::util::BufferInitDescriptor {
                            label: None,
                            contents: bytemuck::cast_slice(&normal_tensor(seed, shape.elements())),
                            usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC,
                        })
                };
                let (q, k, v) = (buf(1), buf(2), buf(3));
                for &causal in &a.causal {
                    let cfg = FmaConfig::new(m, a.rank);
                    let kernels = [
                        ("default", Attention::fma(&ctx, cfg.clone())?),
                        (
                            "rows",
                            Attention::fma(&ctx, cfg.clone())?.fma_kernel(FmaKernel::Rows)?,
                        ),
                        (
                            "tiled",
                            Attention::fma(&ctx, cfg.clone())?.fma_kernel(FmaKernel::Tiled)?,
                        ),
                    ];
                    let outs: Vec<wgpu::Buffer> = kernels.iter().map(|_| buf(4)).collect();
                    let p = Problem::new(shape).causal(causal);
                    let once = |i: usize| -> Result<f64, BoxError> {
                        let t = GpuTensors {
                            q: &q,
                            k: &k,
                            v: &v,
                            out: &outs[i],
                            lse: None,
                        };
                        let start = Instant::now();
                        let mut enc = ctx.device.create_command_encoder(&Default::default());
                        kernels[i].1.forward(&p, Encode(&mut enc, t))?;
                        ctx.queue.submit([enc.finish()]);
                        ctx.device.poll(wgpu::PollType::wait_indefinitely())?;
                        Ok(start.elapsed().as_secs_f64() * 1e3)
                    };
                    for i in 0..kernels.len() {
                        once(i)?; // warm-up: pipelines
                    }
                    let mut times = vec![Vec::new(); kernels.len()];
                    for rep in 0..a.reps {
                        for i in 0..kernels.len() {
                            let c = (i + rep) % kernels.len();
                            times[c].push(once(c)?);
                        }
                    }
                    let ms: Vec<f64> = times.into_iter().map(median).collect();
                    let rows = read(&ctx, &outs[1], shape.elements())?;
                    let tiled = read(&ctx, &outs[2], shape.elements())?;
                    let diff = rows
                        .iter()
                        .zip(&tiled)
                        .map(|(x, y)| (x - y).abs())
                        .fold(0.0f32, f32::max);
                    for (i, (name, kernel)) in kernels.iter().enumerate() {
                        let plan = kernel.plan(&p)?;
                        let fma = plan.fma().ok_or("not an FMA plan")?;
                        let keys = fma.levels.keys_seen_total(causal) as f64;
                        let flops = 4.0 * d as f64 * keys * a.heads as f64;
                        let at = fma.attention;
                        let pass = match at.pass {
                            Pass::FineTiled => "fine_attention_tiled",
                            _ => "fine_attention",
                        };
                        println!(
                            "| {n} | {d} | {m} | {causal} | {name} | {pass} | {} x {} | {:.1} | {:.2} | {:.2} | {diff:.1e} |",
                            at.spec.wg,
                            at.spec.bk,
                            ms[i],
                            ms[i] / ms[0],
                            flops / ms[i] / 1e6
                        );
                    }
                }
            }
        }
    }
    Ok(())
}

/// The first `len` floats of `buf` (read through a mapped copy).
fn read(ctx: &GpuContext, buf: &wgpu::Buffer, len: usize) -> Result<Vec<f32>, BoxError> {
    let bytes = (len * 4) as u64;
    let staging = ctx.device.create_buffer(&wgpu::BufferDescriptor {
        label: None,
        size: bytes,
        usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
        mapped_at_creation: false,
    });
    let mut enc = ctx.device.create_command_encoder(&Default::default());
    enc.copy_buffer_to_buffer(buf, 0, &staging, 0, bytes);
    ctx.queue.submit([enc.finish()]);
    let slice = staging.slice(..);
    slice.map_async(wgpu::MapMode::Read, |_| {});
    ctx.device.poll(wgpu::PollType::wait_indefinitely())?;
    let view = slice.get_mapped_range()?;
    let out = bytemuck::cast_slice(&view).to_vec();
    Ok(out)
}
