//! Benchmark sweep: FMA (fine queries, and coarse queries where bidirectional), dense attention (the tiled online-softmax WGSL kernel)
//! and a plain register-tiled matmul kernel (the roofline proxy) on one adapter.
//!
//! `cargo run --release --example bench [-- --n-min 1024 --n-max 65536 --head-dims 64 --blocks 64 --ranks 2 --causal false]`
//!
//! Times are medians over repetitions after a warm-up, every tensor already on the GPU (no
//! upload or readback inside the timed region), each run recorded with `encode` into its own
//! command buffer: timed by GPU timestamps written before and after it where the device offers
//! them inside encoders (`--clock auto`), else by the wall clock around submit + wait. The
//! table and the CSV's `clock` column say which. Prints a
//! summary table; writes results/bench.csv and results/bench.svg (time vs n, log-log).
//!
//! `--per-pass` adds one profiled run per point (after the timed ones, so their medians are
//! unaffected): the GPU time of every dispatch summed by pass name and level
//! (`GpuContext::start_profiling`), printed after the table: which pass a jump in t(2n)/t(n)
//! comes from. `--cooperative-matrix` runs dense attention on tensor cores where the adapter
//! offers them (`ContextOptions::cooperative_matrix`, opt-in).

use std::path::PathBuf;
use std::time::Instant;

use clap::Parser;
use indicatif::{ProgressBar, ProgressStyle};
use multipole_attn::cpu::{dense_attention_rows, widen};
use multipole_attn::gpu::{
    format_table, Attention, ContextOptions, CoopMode, Encode, GpuContext, GpuTensors,
};
use multipole_attn::levels::{far_list, near_blocks, sub_window, Levels};
use multipole_attn::random::normal_tensor;
use multipole_attn::{FmaConfig, FmaError, Problem, Queries, Shape};
use plotters::prelude::*;
use wgpu::util::DeviceExt;

#[derive(Parser)]
struct Args {
    /// Smallest sequence length (powers of two from here).
    #[arg(long, default_value_t = 1024)]
    n_min: usize,
    /// Largest sequence length.
    #[arg(long, default_value_t = 65536)]
    n_max: usize,
    /// Head dimensions to sweep.
    #[arg(long, value_delimiter = ',', default_value = "64")]
    head_dims: Vec<usize>,
    /// Block sizes m to sweep.
    #[arg(long, value_delimiter = ',', default_value = "64")]
    blocks: Vec<usize>,
    /// Ranks p to sweep.
    #[arg(long, value_delimiter = ',', default_value = "2")]
    ranks: Vec<usize>,
    /// Masks to sweep.
    #[arg(long, value_delimiter = ',', default_value = "false")]
    causal: Vec<bool>,
    /// Heads (batch 1).
    #[arg(long, default_value_t = 1)]
    heads: usize,
    /// Timed repetitions per point (median reported), after one warm-up.
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// Skip dense attention where its estimated time per run exceeds this many seconds.
    #[arg(long, default_value_t = 20.0)]
    dense_budget_s: f64,
    /// Clock: GPU timestamps where the device offers them inside encoders (auto), or the wall
    /// clock around submit + wait.
    #[arg(long, value_enum, default_value_t = ClockChoice::Auto)]
    clock: ClockChoice,
    /// Output folder.
    #[arg(long, default_value = "results")]
    out: PathBuf,
    /// Also time every pass of one more run per point (GPU timestamps around each dispatch)
    /// and print them summed by pass and level.
    #[arg(long)]
    per_pass: bool,
    /// Run dense attention on cooperative matrices (tensor cores) where the adapter offers a
    /// fitting shape.
    #[arg(long)]
    cooperative_matrix: bool,
}

/// One measured (or skipped) point.
struct Row {
    method: &'static str,
    n: usize,
    d: usize,
    m: usize,
    p: usize,
    causal: bool,
    seconds: Option<f64>,
    flops: f64,
    library_bytes: u64,
    qkvo_bytes: u64,
    err_vs_dense: Option<f64>,
    note: String,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// How the bench times GPU work.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum ClockChoice {
    /// GPU timestamps when the device offers them inside encoders, else the wall clock.
    Auto,
    /// Wall clock around submit + wait.
    Wall,
    /// GPU timestamps (an error where the device offers none).
    Timestamp,
}

/// The clock in use: GPU timestamps written before and after the recorded work (the GPU's own
/// time for it, in ns via the queue's timestamp period), or the wall clock around submit +
/// wait (adds submit and wake-up latency, a fixed cost that matters only for short runs).
enum Clock {
    Gpu {
        queries: wgpu::QuerySet,
        resolve: wgpu::Buffer,
        readback: wgpu::Buffer,
        period_ns: f64,
    },
    Wall,
}

impl Clock {
    fn new(ctx: &GpuContext, choice: ClockChoice) -> Result<Self, String> {
        let available = ctx.encoder_timestamps();
        match (choice, available) {
            (ClockChoice::Wall, _) | (ClockChoice::Auto, false) => return Ok(Clock::Wall),
            (ClockChoice::Timestamp, false) => {
                return Err(
                    "--clock timestamp: the device offers no TIMESTAMP_QUERY_INSIDE_ENCODERS"
                        .into(),
                )
            }
            _ => {}
        }
        let queries = ctx.device.create_query_set(&wgpu::QuerySetDescriptor {
            label: Some("bench timestamps"),
            ty: wgpu::QueryType::Timestamp,
            count: 2,
        });
        let buffer = |usage| {
            ctx.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("bench timestamps"),
                size: 16,
                usage,
                mapped_at_creation: false,
            })
        };
        Ok(Clock::Gpu {
            queries,
            resolve: buffer(wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC),
            readback: buffer(wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST),
            period_ns: ctx.queue.get_timestamp_period() as f64,
        })
    }

    /// Name for the table and the CSV.
    fn name(&self) -> &'static str {
        match self {
            Clock::Gpu { .. } => "gpu-timestamp",
            Clock::Wall => "wall",
        }
    }

    /// Seconds of one run of `record`, recorded into a fresh encoder and submitted alone.
    fn once(&self, ctx: &GpuContext, record: &mut Record<'_>) -> Result<f64, BoxError> {
        let wait = || ctx.device.poll(wgpu::PollType::wait_indefinitely());
        let mut enc = ctx.device.create_command_encoder(&Default::default());
        match self {
            Clock::Wall => {
                let t = Instant::now();
                record(&mut enc)?;
                ctx.queue.submit([enc.finish()]);
                wait()?;
                Ok(t.elapsed().as_secs_f64())
            }
            Clock::Gpu {
                queries,
                resolve,
                readback,
                period_ns,
            } => {
                enc.write_timestamp(queries, 0);
                record(&mut enc)?;
                enc.write_timestamp(queries, 1);
                enc.resolve_query_set(queries, 0..2, resolve, 0);
                enc.copy_buffer_to_buffer(resolve, 0, readback, 0, 16);
                ctx.queue.submit([enc.finish()]);
                readback.slice(..).map_async(wgpu::MapMode::Read, |_| {});
                wait()?;
                let ticks: [u64; 2] = {
                    let view = readback.slice(..).get_mapped_range()?;
                    let t: &[u64] = bytemuck::cast_slice(&view);
                    [t[0], t[1]]
                };
                readback.unmap();
                Ok(ticks[1].wrapping_sub(ticks[0]) as f64 * period_ns * 1e-9)
            }
        }
    }
}

type BoxError = Box<dyn std::error::Error>;

/// Records one run of the timed work into an encoder.
type Record<'a> = dyn FnMut(&mut wgpu::CommandEncoder) -> Result<(), BoxError> + 'a;

/// One more run of `record`, submitted alone with the per-pass profiler on: `title`, then its
/// dispatches' GPU times summed by pass and level.
fn per_pass(
    ctx: &GpuContext,
    title: String,
    mut record: impl FnMut(&mut wgpu::CommandEncoder) -> Result<(), BoxError>,
) -> Result<String, BoxError> {
    ctx.start_profiling(2048)?;
    let mut enc = ctx.device.create_command_encoder(&Default::default());
    let recorded = record(&mut enc);
    ctx.queue.submit([enc.finish()]);
    ctx.device.poll(wgpu::PollType::wait_indefinitely())?;
    // Taken before `recorded` is checked, so that a failed run leaves profiling off.
    let (times, dropped) = ctx.take_profile()?;
    recorded?;
    Ok(format!("{title}\n{}", format_table(&times, dropped)))
}

/// Median seconds of `record` (each run submitted alone and waited for), after one warm-up.
fn time(
    ctx: &GpuContext,
    clock: &Clock,
    reps: usize,
    mut record: impl FnMut(&mut wgpu::CommandEncoder) -> Result<(), BoxError>,
) -> Result<f64, BoxError> {
    clock.once(ctx, &mut record)?;
    let mut v = Vec::new();
    for _ in 0..reps.max(1) {
        v.push(clock.once(ctx, &mut record)?);
    }
    Ok(median(v))
}

struct Tensors {
    q: wgpu::Buffer,
    k: wgpu::Buffer,
    v: wgpu::Buffer,
    out: wgpu::Buffer,
    host: [Vec<f32>; 3],
}

impl Tensors {
    fn new(ctx: &GpuContext, shape: Shape, seed: u64) -> Self {
        let host = [0, 1, 2].map(|i| normal_tensor(seed + i, shape.elements()));
        let buf = |data: &[f32], extra| {
            ctx.device
                .create_buffer_init(&wgpu::util::BufferInitDescriptor {
                    label: None,
                    contents: bytemuck::cast_slice(data),
                    usage: wgpu::BufferUsages::STORAGE | extra,
                })
        };
        Self {
            q: buf(&host[0], wgpu::BufferUsages::empty()),
            k: buf(&host[1], wgpu::BufferUsages::empty()),
            v: buf(&host[2], wgpu::BufferUsages::empty()),
            out: buf(
                &vec![f32::NAN; shape.elements()],
                wgpu::BufferUsages::COPY_SRC,
            ),
            host,
        }
    }
    fn gpu(&self) -> GpuTensors<'_> {
        GpuTensors {
            q: &self.q,
            k: &self.k,
            v: &self.v,
            out: &self.out,
            lse: None,
        }
    }
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
    staging.slice(..).map_async(wgpu::MapMode::Read, |_| {});
    let _ = ctx.device.poll(wgpu::PollType::wait_indefinitely());
    let data = staging
        .slice(..)
        .get_mapped_range()
        .map(|v| bytemuck::cast_slice::<u8, f32>(&v).to_vec())
        .unwrap_or_default();
    staging.unmap();
    data
}

/// Max abs error of `o` against f64 dense attention on 16 evenly spaced rows.
fn error_vs_dense(t: &Tensors, o: &[f32], shape: Shape, causal: bool) -> Option<f64> {
    let rows: Vec<usize> = (0..16).map(|i| i * shape.rows() / 16).collect();
    let (exact, _) = dense_attention_rows(
        &widen(&t.host[0]),
        &widen(&t.host[1]),
        &widen(&t.host[2]),
        shape,
        causal,
        &rows,
    )
    .ok()?;
    let d = shape.head_dim;
    let mut worst = 0f64;
    for (r, &row) in rows.iter().enumerate() {
        for c in 0..d {
            worst = worst.max((o[row * d + c] as f64 - exact[r * d + c]).abs());
        }
    }
    Some(worst)
}

/// Keys attended with coarse queries (bidirectional), summed over every query of one head:
/// the near field key by key, plus per level each non-empty coarse query's far-list keys.
fn coarse_query_keys(lv: &Levels) -> f64 {
    let (n, m, p) = (lv.n, lv.m, lv.p);
    let mut total = 0f64;
    for a0 in 0..lv.fine_blocks() {
        let near = near_blocks(a0, false, lv.fine_blocks());
        let queries = ((a0 + 1) * m).min(n) - a0 * m;
        total += (queries * ((near.end * m).min(n) - near.start * m)) as f64;
    }
    for l in &lv.levels {
        for a in 0..l.windows {
            let keys: usize = far_list(a, false, l.windows)
                .iter()
                .map(|&b| {
                    (0..p)
                        .filter(|&j| !sub_window(n, m, p, l.level, b, j).is_empty())
                        .count()
                })
                .sum();
            let coarse_queries = (0..p)
                .filter(|&u| !sub_window(n, m, p, l.level, a, u).is_empty())
                .count();
            total += (coarse_queries * keys) as f64;
        }
    }
    total
}

/// GFLOP/s of the matmul kernel on (size x size) x (size x size), checked on one row.
fn matmul_gflops(ctx: &GpuContext, clock: &Clock, size: u32, reps: usize) -> Result<f64, BoxError> {
    let src = include_str!("../shaders/bench/matmul.wgsl");
    let module = ctx
        .device
        .create_shader_module(wgpu::ShaderModuleDescriptor {
            label: Some("matmul"),
            source: wgpu::ShaderSource::Wgsl(src.into()),
        });
    let pipeline = ctx
        .device
        .create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
            label: Some("matmul"),
            layout: None,
            module: &module,
            entry_point: Some("main"),
            compilation_options: Default::default(),
            cache: None,
        });
    let len = (size * size) as usize;
    let (a, b) = (normal_tensor(7, len), normal_tensor(8, len));
    let init = |data: &[f32], usage| {
        ctx.device
            .create_buffer_init(&wgpu::util::BufferInitDescriptor {
                label: None,
                contents: bytemuck::cast_slice(data),
                usage,
            })
    };
    let dims = init(
        bytemuck::cast_slice(&[size, size, size, 0u32]),
        wgpu::BufferUsages::UNIFORM,
    );
    let (ab, bb) = (
        init(&a, wgpu::BufferUsages::STORAGE),
        init(&b, wgpu::BufferUsages::STORAGE),
    );
    let cb = init(
        &vec![f32::NAN; len],
        wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC,
    );
    let group = ctx.device.create_bind_group(&wgpu::BindGroupDescriptor {
        label: None,
        layout: &pipeline.get_bind_group_layout(0),
        entries: &[(0, &dims), (1, &ab), (2, &bb), (3, &cb)].map(|(i, b)| wgpu::BindGroupEntry {
            binding: i,
            resource: b.as_entire_binding(),
        }),
    });
    let tiles = size.div_ceil(64);
    let seconds = time(ctx, clock, reps, |enc| {
        let mut pass = enc.begin_compute_pass(&Default::default());
        pass.set_pipeline(&pipeline);
        pass.set_bind_group(0, &group, &[]);
        pass.dispatch_workgroups(tiles, tiles, 1);
        Ok(())
    })?;
    let c = read(ctx, &cb);
    let row = size as usize / 3;
    for col in (0..size as usize).step_by(97) {
        let want: f64 = (0..size as usize)
            .map(|k| a[row * size as usize + k] as f64 * b[k * size as usize + col] as f64)
            .sum();
        let got = c[row * size as usize + col] as f64;
        if (got - want).abs() > 1e-3 * (1.0 + want.abs()) {
            return Err(format!("matmul check failed at ({row}, {col}): {got} vs {want}").into());
        }
    }
    Ok(2.0 * (size as f64).powi(3) / seconds / 1e9)
}

fn main() {
    env_logger::init();
    let a = Args::parse();
    if let Err(e) = run(&a) {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

fn run(a: &Args) -> Result<(), BoxError> {
    let ctx = GpuContext::with_options(ContextOptions {
        cooperative_matrix: if a.cooperative_matrix {
            CoopMode::IfOffered
        } else {
            CoopMode::Off
        },
        ..Default::default()
    })?;
    println!(
        "adapter: {} ({:?}, {:?}, {} {})",
        ctx.info.name,
        ctx.info.backend,
        ctx.info.device_type,
        ctx.info.driver,
        ctx.info.driver_info
    );
    println!(
        "kernels: {}",
        match ctx.subgroup_kernels() {
            Some(sg) =>
                format!("subgroup variant (tiles shared by broadcasts, subgroup size {sg})"),
            None => "plain (no subgroups)".into(),
        }
    );
    if a.cooperative_matrix {
        println!(
            "dense on cooperative matrices: {}",
            match ctx.cooperative_matrix() {
                Some(s) => format!("{0}x{0}x{0} f16->f32, subgroups of {1}", s.size, s.subgroup),
                None => "not offered (see `multipole-attn info`): plain kernels".into(),
            }
        );
    }
    let clock = Clock::new(&ctx, a.clock)?;
    let mut passes: Vec<String> = Vec::new();
    let clock_text = match &clock {
        Clock::Gpu { period_ns, .. } => {
            format!("GPU timestamps around the recorded work (period {period_ns} ns)")
        }
        Clock::Wall => "wall clock around submit + wait".into(),
    };
    println!(
        "timing: median of {} after a warm-up; {clock_text}; tensors resident on the GPU",
        a.reps
    );
    let mm = matmul_gflops(&ctx, &clock, 1024, a.reps)?;
    println!("matmul kernel (1024^3, roofline proxy): {mm:.2} GFLOP/s");

    let mut ns = Vec::new();
    let mut n = a.n_min.max(1);
    while n <= a.n_max {
        ns.push(n);
        n *= 2;
    }
    let configs: Vec<(usize, usize, usize, bool)> = a
        .head_dims
        .iter()
        .flat_map(|&d| {
            a.blocks.iter().flat_map(move |&m| {
                a.ranks
                    .iter()
                    .flat_map(move |&p| a.causal.iter().map(move |&c| (d, m, p, c)))
            })
        })
        .collect();
    let bar = ProgressBar::new((configs.len() * ns.len()) as u64);
    bar.set_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} {msg} [{elapsed}]")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let mut rows: Vec<Row> = Vec::new();
    for &(d, m, p, causal) in &configs {
        let fma = Attention::fma(&ctx, FmaConfig::new(m, p))?;
        // Coarse queries are bidirectional only (algorithm.md §6).
        let coarse = if causal {
            None
        } else {
            Some(Attention::fma(
                &ctx,
                FmaConfig::new(m, p).queries(Queries::Coarse),
            )?)
        };
        let dense = Attention::dense(&ctx)?;
        let mut last_dense: Option<(usize, f64)> = None;
        for &n in &ns {
            bar.set_message(format!("d={d} m={m} p={p} causal={causal} n={n}"));
            let shape = Shape::new(1, a.heads, n, d);
            let problem = Problem::new(shape).causal(causal);
            let t = Tensors::new(&ctx, shape, n as u64);
            let qkvo = 4 * shape.elements() as u64 * 4;
            let plan = fma_plan(&fma, &problem)?;
            let secs = time(&ctx, &clock, a.reps, |enc| {
                Ok(fma.forward(&problem, Encode(enc, t.gpu()))?)
            })?;
            if a.per_pass {
                let title = format!("fma-fine n={n} d={d} m={m} p={p} causal={causal}");
                passes.push(per_pass(&ctx, title, |enc| {
                    Ok(fma.forward(&problem, Encode(enc, t.gpu()))?)
                })?);
            }
            let o = read(&ctx, &t.out);
            let flops =
                4.0 * d as f64 * plan.levels.keys_seen_total(causal) as f64 * a.heads as f64;
            rows.push(Row {
                method: "fma-fine",
                n,
                d,
                m,
                p,
                causal,
                seconds: Some(secs),
                flops,
                library_bytes: plan.workspace.device_bytes(),
                qkvo_bytes: qkvo,
                err_vs_dense: error_vs_dense(&t, &o, shape, causal),
                note: String::new(),
            });

            if let Some(coarse) = &coarse {
                let plan = fma_plan(coarse, &problem)?;
                let secs = time(&ctx, &clock, a.reps, |enc| {
                    Ok(coarse.forward(&problem, Encode(enc, t.gpu()))?)
                })?;
                if a.per_pass {
                    let title = format!("fma-coarse n={n} d={d} m={m} p={p} causal={causal}");
                    passes.push(per_pass(&ctx, title, |enc| {
                        Ok(coarse.forward(&problem, Encode(enc, t.gpu()))?)
                    })?);
                }
                let o = read(&ctx, &t.out);
                let flops = 4.0 * d as f64 * coarse_query_keys(&plan.levels) * a.heads as f64;
                rows.push(Row {
                    method: "fma-coarse",
                    n,
                    d,
                    m,
                    p,
                    causal,
                    seconds: Some(secs),
                    flops,
                    library_bytes: plan.workspace.device_bytes(),
                    qkvo_bytes: qkvo,
                    err_vs_dense: error_vs_dense(&t, &o, shape, causal),
                    note: String::new(),
                });
            }

            let dense_flops = if causal {
                2.0 * d as f64 * (n as f64) * (n as f64 + 1.0)
            } else {
                4.0 * d as f64 * (n as f64).powi(2)
            } * a.heads as f64;
            let estimate = last_dense.map(|(n0, s0)| s0 * (n as f64 / n0 as f64).powi(2));
            match estimate {
                Some(e) if e > a.dense_budget_s => rows.push(Row {
                    method: "dense",
                    n,
                    d,
                    m,
                    p,
                    causal,
                    seconds: None,
                    flops: dense_flops,
                    library_bytes: shape.rows() as u64 * 4,
                    qkvo_bytes: qkvo,
                    err_vs_dense: None,
                    note: format!("skipped: ~{e:.0} s per run > budget {} s", a.dense_budget_s),
                }),
                _ => {
                    let secs = time(&ctx, &clock, a.reps, |enc| {
                        Ok(dense.forward(&problem, Encode(enc, t.gpu()))?)
                    })?;
                    if a.per_pass {
                        let title = format!("dense n={n} d={d} causal={causal}");
                        passes.push(per_pass(&ctx, title, |enc| {
                            Ok(dense.forward(&problem, Encode(enc, t.gpu()))?)
                        })?);
                    }
                    let o = read(&ctx, &t.out);
                    last_dense = Some((n, secs));
                    rows.push(Row {
                        method: "dense",
                        n,
                        d,
                        m,
                        p,
                        causal,
                        seconds: Some(secs),
                        flops: dense_flops,
                        library_bytes: shape.rows() as u64 * 4,
                        qkvo_bytes: qkvo,
                        err_vs_dense: error_vs_dense(&t, &o, shape, causal),
                        note: String::new(),
                    });
                }
            }
            bar.inc(1);
        }
    }
    bar.finish_and_clear();

    std::fs::create_dir_all(&a.out)?;
    let kernels = match ctx.subgroup_kernels() {
        Some(sg) => format!("subgroup-{sg}"),
        None => "plain".into(),
    };
    let mut csv = csv::Writer::from_path(a.out.join("bench.csv"))?;
    csv.write_record([
        "method",
        "n",
        "head_dim",
        "m",
        "p",
        "causal",
        "median_ms",
        "gflops",
        "gflops_vs_matmul",
        "library_bytes",
        "qkvo_bytes",
        "max_err_vs_dense",
        "clock",
        "kernels",
        "note",
    ])?;
    println!("\ntimes: median ms, clock: {}", clock.name());
    println!(
        "{:<9} {:>6} {:>3} {:>3} {:>2} {:>6} {:>11} {:>8} {:>7} {:>10} {:>9} {:>9}  note",
        "method",
        "n",
        "d",
        "m",
        "p",
        "causal",
        "median ms",
        "GFLOP/s",
        "%matmul",
        "lib bytes",
        "lib/QKVO",
        "err"
    );
    for r in &rows {
        let ms = r.seconds.map(|s| s * 1e3);
        let gf = r.seconds.map(|s| r.flops / s / 1e9);
        let fmt = |x: Option<f64>, p: usize| x.map_or("-".to_string(), |v| format!("{v:.p$}"));
        println!(
            "{:<9} {:>6} {:>3} {:>3} {:>2} {:>6} {:>11} {:>8} {:>7} {:>10} {:>9.3} {:>9}  {}",
            r.method,
            r.n,
            r.d,
            r.m,
            r.p,
            r.causal,
            fmt(ms, 1),
            fmt(gf, 2),
            fmt(gf.map(|g| 100.0 * g / mm), 0),
            r.library_bytes,
            r.library_bytes as f64 / r.qkvo_bytes as f64,
            r.err_vs_dense.map_or("-".into(), |e| format!("{e:.1e}")),
            r.note
        );
        csv.write_record([
            r.method.to_string(),
            r.n.to_string(),
            r.d.to_string(),
            r.m.to_string(),
            r.p.to_string(),
            r.causal.to_string(),
            fmt(ms, 3),
            fmt(gf, 3),
            fmt(gf.map(|g| g / mm), 3),
            r.library_bytes.to_string(),
            r.qkvo_bytes.to_string(),
            r.err_vs_dense.map_or(String::new(), |e| format!("{e:e}")),
            clock.name().to_string(),
            kernels.clone(),
            r.note.clone(),
        ])?;
    }
    csv.flush()?;

    // Scaling and speed-up summaries per configuration.
    println!();
    for &(d, m, p, causal) in &configs {
        let pick = |method: &str| -> Vec<(usize, f64)> {
            rows.iter()
                .filter(|r| r.method == method && (r.d, r.m, r.p, r.causal) == (d, m, p, causal))
                .filter_map(|r| r.seconds.map(|s| (r.n, s)))
                .collect()
        };
        let dense = pick("dense");
        println!("d={d} m={m} p={p} causal={causal}:");
        for method in ["fma-fine", "fma-coarse"] {
            let fma = pick(method);
            if fma.is_empty() {
                continue;
            }
            let ratios: Vec<String> = fma
                .windows(2)
                .map(|w| format!("{}->{}: {:.2}", w[0].0, w[1].0, w[1].1 / w[0].1))
                .collect();
            println!("  {method} t(2n)/t(n): {}", ratios.join(", "));
            let speedups: Vec<String> = fma
                .iter()
                .filter_map(|&(n, s)| {
                    dense
                        .iter()
                        .find(|x| x.0 == n)
                        .map(|x| format!("n={n}: {:.1}x", x.1 / s))
                })
                .collect();
            println!("  {method} speed-up over dense: {}", speedups.join(", "));
        }
    }

    if a.per_pass {
        println!("\nper pass (one profiled run per point; GPU ms per pass and level):");
        for block in &passes {
            println!("{block}");
        }
    }

    plot(&a.out.join("bench.svg"), &rows, mm)?;
    println!(
        "\nwrote {} and {}",
        a.out.join("bench.csv").display(),
        a.out.join("bench.svg").display()
    );
    Ok(())
}

/// Time vs n on log-log axes, one line per (method, configuration).
fn plot(
    path: &std::path::Path,
    rows: &[Row],
    _matmul: f64,
) -> Result<(), Box<dyn std::error::Error>> {
    let pts: Vec<&Row> = rows.iter().filter(|r| r.seconds.is_some()).collect();
    if pts.is_empty() {
        return Ok(());
    }
    let (nmin, nmax) = pts.iter().fold((f64::MAX, 0f64), |(lo, hi), r| {
        (lo.min(r.n as f64), hi.max(r.n as f64))
    });
    let (tmin, tmax) = pts.iter().fold((f64::MAX, 0f64), |(lo, hi), r| {
        let ms = r.seconds.unwrap_or(0.0) * 1e3;
        (lo.min(ms), hi.max(ms))
    });
    let root = SVGBackend::new(path, (900, 600)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "multipole-attn: time vs sequence length",
            ("sans-serif", 22),
        )
        .margin(20)
        .x_label_area_size(45)
        .y_label_area_size(70)
        .build_cartesian_2d(
            (nmin * 0.8..nmax * 1.25).log_scale(),
            (tmin * 0.5..tmax * 2.0).log_scale(),
        )?;
    chart
        .configure_mesh()
        .x_desc("n (tokens)")
        .y_desc("median time (ms)")
        .draw()?;
    let mut series: Vec<(String, Vec<(f64, f64)>)> = Vec::new();
    for r in &pts {
        let key = format!(
            "{} d={} m={} p={}{}",
            r.method,
            r.d,
            r.m,
            r.p,
            if r.causal { " causal" } else { "" }
        );
        let point = (r.n as f64, r.seconds.unwrap_or(0.0) * 1e3);
        match series.iter_mut().find(|(k, _)| *k == key) {
            Some((_, v)) => v.push(point),
            None => series.push((key, vec![point])),
        }
    }
    for (i, (key, v)) in series.into_iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        chart
            .draw_series(LineSeries::new(v.clone(), color.stroke_width(2)))?
            .label(key)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
        chart.draw_series(v.into_iter().map(|p| Circle::new(p, 3, color.filled())))?;
    }
    chart
        .configure_series_labels()
        .border_style(BLACK)
        .background_style(WHITE.mix(0.8))
        .position(SeriesLabelPosition::UpperLeft)
        .draw()?;
    root.present()?;
    Ok(())
}

/// FMA's forward plan of `problem`.
fn fma_plan(fma: &Attention, problem: &Problem) -> Result<multipole_attn::plan::FmaPlan, FmaError> {
    let plan = fma.plan(problem)?;
    plan.fma().cloned().ok_or_else(|| FmaError::InvalidConfig {
        what: "method",
        value: "dense".into(),
        allowed: "FMA".into(),
    })
}
