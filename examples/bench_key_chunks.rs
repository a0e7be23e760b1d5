//! What dense attention's key chunks cost (docs/perf.md, change 9): the same problem with its
//! keys in one dispatch, in the default chunks (`plan::DENSE_KEY_TILES_PER_DISPATCH` tiles) and
//! in small ones, A/B in one process on one device, cases alternating (order rotated each
//! repetition), tensors resident, wall clock around submit + wait, median and per-case ratio
//! to the one-dispatch run (median of the per-repetition ratios), and the largest difference
//! of the outputs from the one-dispatch run's.
//!
//! `cargo run --release --example bench_key_chunks [-- --n 16384 --d 64 --reps 3 --small 1024]`
//!
//! On llvmpipe a dispatch over more than ~800 key tiles is cut short by its loop limiter, so
//! keep `--n` at or below 16384 there for the one-dispatch case to be right.

use std::time::Instant;

use clap::Parser;
use multipole_attn::gpu::{Attention, GpuContext, GpuTensors, Resident};
use multipole_attn::random::normal_tensor;
use multipole_attn::{Problem, Shape};
use wgpu::util::DeviceExt;

#[derive(Parser)]
struct Args {
    /// Sequence length (queries and keys).
    #[arg(long, default_value_t = 16384)]
    n: usize,
    /// Head dimension.
    #[arg(long, default_value_t = 64)]
    d: usize,
    /// Causal mask.
    #[arg(long, default_value_t = false)]
    causal: bool,
    /// Timed repetitions (after one warm-up of each case).
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// Keys per dispatch of the small-chunk case.
    #[arg(long, default_value_t = 1024)]
    small: usize,
}

fn buffer(ctx: &GpuContext, data: &[f32], usage: wgpu::BufferUsages) -> wgpu::Buffer {
    ctx.device
        .create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: None,
            contents: bytemuck::cast_slice(data),
            usage: wgpu::BufferUsages::STORAGE | usage,
        })
}

fn read(ctx: &GpuContext, buf: &wgpu::Buffer) -> Vec<f32> {
    let staging = ctx.device.create_buffer(&wgpu::BufferDescriptor {
        label: None,
        size: buf.size(),
        usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
        mapped_at_creation: false,
    });
    let mut enc = ctx.device.create_command_encoder(&Default::default());
    enc.copy_buffer_to_buffer(buf, 0, &staging, 0, buf.size());
    ctx.queue.submit([enc.finish()]);
    let slice = staging.slice(..);
    slice.map_async(wgpu::MapMode::Read, |r| r.expect("map"));
    ctx.device
        .poll(wgpu::PollType::wait_indefinitely())
        .expect("poll");
    let data = bytemuck::cast_slice::<u8, f32>(&slice.get_mapped_range().expect("mapped")).to_vec();
    staging.unmap();
    data
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let a = Args::parse();
    let ctx = GpuContext::new()?;
    let shape = Shape::new(1, 1, a.n, a.d);
    let (none, copy) = (wgpu::BufferUsages::empty(), wgpu::BufferUsages::COPY_SRC);
    let q = buffer(&ctx, &normal_tensor(1, shape.elements()), none);
    let k = buffer(&ctx, &normal_tensor(2, shape.elements()), none);
    let v = buffer(&ctx, &normal_tensor(3, shape.elements()), none);
    let out = buffer(&ctx, &vec![0.0; shape.elements()], copy);
    let lse = buffer(&ctx, &vec![0.0; shape.rows()], copy);
    let t = GpuTensors {
        q: &q,
        k: &k,
        v: &v,
        out: &out,
        lse: Some(&lse),
    };
    let problem = Problem::new(shape).causal(a.causal);
    let default = Attention::dense(&ctx)?;
    let Some(chunks) = default.plan(&problem)?.dense().cloned() else {
        return Err("dense attention planned as another method".into());
    };
    let per = chunks.keys_per_dispatch();
    let cases = [
        (
            "one dispatch".to_string(),
            Attention::dense(&ctx)?.keys_per_dispatch(usize::MAX)?,
        ),
        (format!("default ({per} keys per dispatch)"), default),
        (
            format!("{} keys per dispatch", a.small),
            Attention::dense(&ctx)?.keys_per_dispatch(a.small)?,
        ),
    ];
    println!(
        "adapter {} ({:?}); subgroups {:?}; n = {}, d = {}, causal = {}; chunks: 1, {}, {}",
        ctx.info.name,
        ctx.info.backend,
        ctx.subgroup_kernels(),
        a.n,
        a.d,
        a.causal,
        chunks.key_chunks(per).len(),
        chunks.key_chunks(a.small).len()
    );
    let run = |dense: &Attention| -> Result<f64, Box<dyn std::error::Error>> {
        let start = Instant::now();
        dense.forward(&problem, Resident(t))?;
        // A resident forward submits without waiting: wait here, or the next run pays for it.
        ctx.device.poll(wgpu::PollType::wait_indefinitely())?;
        Ok(start.elapsed().as_secs_f64() * 1e3)
    };
    let mut outputs = Vec::new();
    for (_, dense) in &cases {
        run(dense)?; // warm-up: pipelines
        outputs.push(read(&ctx, &out));
    }
    let mut times = vec![Vec::new(); cases.len()];
    for rep in 0..a.reps {
        for j in 0..cases.len() {
            let c = (j + rep) % cases.len();
            times[c].push(run(&cases[c].1)?);
        }
    }
    for (c, (name, _)) in cases.iter().enumerate() {
        let ratios: Vec<f64> = times[c].iter().zip(&times[0]).map(|(x, y)| x / y).collect();
        let diff = outputs[c]
            .iter()
            .zip(&outputs[0])
            .map(|(x, y)| (x - y).abs())
            .fold(0.0f32, f32::max);
        println!(
            "{name}: median {:.1} ms, ratio to one dispatch {:.3}, max |O - O_one| {diff:.1e}, times {:?}",
            median(times[c].clone()),
            median(ratios),
            times[c].iter().map(|x| (x * 10.0).round() / 10.0).collect::<Vec<_>>()
        );
    }
    Ok(())
}
