//! Plain kernels against the subgroup variant in one process: the same FMA fine-query forward
//! and dense forward on three devices of one adapter: the default options (the subgroup
//! variant where the adapter offers subgroups); the same limits without `Features::SUBGROUP`
//! (the plain kernels, as on GL); and `browser_limits` (the plain path browsers get: no
//! subgroups, 256 invocations, 16 KiB of workgroup memory). Cases alternate (order rotated
//! each repetition), tensors resident, wall clock around submit + wait, median after a
//! warm-up; ratios are each plain device's time / the subgroup variant's.
//!
//! `cargo run --release --example bench_variants [-- --fine 4096,16384 --dense 4096 --reps 3]`

use std::time::Instant;

use clap::Parser;
use multipole_attn::gpu::{
    negotiate_features, negotiate_limits, Attention, ContextOptions, Encode, GpuContext, GpuTensors,
};
use multipole_attn::random::normal_tensor;
use multipole_attn::{FmaConfig, Problem, Shape};
use wgpu::util::DeviceExt;

#[derive(Parser)]
struct Args {
    /// Sequence lengths for FMA fine queries.
    #[arg(long, value_delimiter = ',', default_value = "4096,16384")]
    fine: Vec<usize>,
    /// Sequence lengths for dense attention (empty: none).
    #[arg(long, value_delimiter = ',', default_value = "4096")]
    dense: Vec<usize>,
    /// Head dimension.
    #[arg(long, default_value_t = 64)]
    head_dim: usize,
    /// Causal mask.
    #[arg(long, default_value_t = false)]
    causal: bool,
    /// Timed repetitions per variant (median reported), after one warm-up each.
    #[arg(long, default_value_t = 3)]
    reps: usize,
}

type BoxError = Box<dyn std::error::Error>;

/// One device, its kernels, and resident Q, K, V, O for one shape.
struct Variant {
    ctx: GpuContext,
    causal: bool,
    fma: Attention,
    dense: Attention,
    qkvo: [wgpu::Buffer; 4],
}

impl Variant {
    fn new(ctx: GpuContext, causal: bool) -> Result<Self, BoxError> {
        let fma = Attention::fma(&ctx, FmaConfig::new(64, 2))?;
        let dense = Attention::dense(&ctx)?;
        let qkvo = [0, 1, 2, 3].map(|_| empty(&ctx, 4));
        Ok(Self {
            ctx,
            causal,
            fma,
            dense,
            qkvo,
        })
    }

    fn upload(&mut self, shape: Shape) {
        let ctx = &self.ctx;
        self.qkvo = [1, 2, 3, 4].map(|seed| {
            ctx.device
                .create_buffer_init(&wgpu::util::BufferInitDescriptor {
                    label: None,
                    contents: bytemuck::cast_slice(&normal_tensor(seed, shape.elements())),
                    usage: wgpu::BufferUsages::STORAGE,
                })
        });
    }

    /// Wall-clock milliseconds of one run (FMA fine queries, or dense), submitted alone.
    fn once(&self, dense: bool, shape: Shape) -> Result<f64, BoxError> {
        let [q, k, v, out] = &self.qkvo;
        let t = GpuTensors {
            q,
            k,
            v,
            out,
            lse: None,
        };
        let problem = Problem::new(shape).causal(self.causal);
        let start = Instant::now();
        let mut enc = self.ctx.device.create_command_encoder(&Default::default());
        let kernel = if dense { &self.dense } else { &self.fma };
        kernel.forward(&problem, Encode(&mut enc, t))?;
        self.ctx.queue.submit([enc.finish()]);
        self.ctx.device.poll(wgpu::PollType::wait_indefinitely())?;
        Ok(start.elapsed().as_secs_f64() * 1e3)
    }
}

fn empty(ctx: &GpuContext, bytes: u64) -> wgpu::Buffer {
    ctx.device.create_buffer(&wgpu::BufferDescriptor {
        label: None,
        size: bytes,
        usage: wgpu::BufferUsages::STORAGE,
        mapped_at_creation: false,
    })
}

/// A device of the default adapter with the default limits but without subgroups.
fn without_subgroups() -> Result<GpuContext, BoxError> {
    let instance =
        wgpu::Instance::new(wgpu::InstanceDescriptor::new_without_display_handle_from_env());
    let adapter = pollster::block_on(instance.request_adapter(&wgpu::RequestAdapterOptions {
        power_preference: wgpu::PowerPreference::HighPerformance,
        ..Default::default()
    }))?;
    let options = ContextOptions::default();
    let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
        label: Some("no subgroups"),
        required_features: negotiate_features(adapter.features(), options)
            - wgpu::Features::SUBGROUP,
        required_limits: negotiate_limits(&adapter.limits(), options),
        ..Default::default()
    }))?;
    Ok(GpuContext::from_device(adapter.get_info(), device, queue))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> Result<(), BoxError> {
    env_logger::init();
    let a = Args::parse();
    let sub = GpuContext::with_options(ContextOptions {
        browser_limits: false,
        ..Default::default()
    })?;
    let browser = GpuContext::with_options(ContextOptions {
        browser_limits: true,
        ..Default::default()
    })?;
    let plain = without_subgroups()?;
    println!("adapter {} ({:?})", sub.info.name, sub.info.backend);
    let describe = |c: &GpuContext| match c.subgroup_kernels() {
        Some(sg) => format!("subgroup variant, size {sg}"),
        None => "plain".to_string(),
    };
    println!(
        "default options: {}; without SUBGROUP: {}; browser limits: {}",
        describe(&sub),
        describe(&plain),
        describe(&browser)
    );
    println!(
        "wall clock, median of {}, d = {}, m = 64, p = 2, causal = {}",
        a.reps, a.head_dim, a.causal
    );
    let mut variants = [
        Variant::new(sub, a.causal)?,
        Variant::new(plain, a.causal)?,
        Variant::new(browser, a.causal)?,
    ];
    println!("| kernel | n | subgroup ms | plain ms | plain, browser limits ms | plain / subgroup | browser / subgroup |");
    println!("|---|---|---|---|---|---|---|");
    let cases = a
        .fine
        .iter()
        .map(|&n| (false, n))
        .chain(a.dense.iter().map(|&n| (true, n)));
    for (dense, n) in cases {
        let shape = Shape::new(1, 1, n, a.head_dim);
        let mut times = [Vec::new(), Vec::new(), Vec::new()];
        for v in variants.iter_mut() {
            v.upload(shape);
            v.once(dense, shape)?; // warm-up (pipelines, first touch)
        }
        for rep in 0..a.reps {
            for i in (0..3).map(|j| (j + rep) % 3) {
                times[i].push(variants[i].once(dense, shape)?);
            }
        }
        let [s, p, b] = times.map(median);
        let name = if dense { "dense" } else { "FMA fine" };
        println!(
            "| {name} | {n} | {s:.1} | {p:.1} | {b:.1} | {:.2} | {:.2} |",
            p / s,
            b / s
        );
    }
    Ok(())
}
