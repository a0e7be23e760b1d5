//! Decoding speed: per-token time of FMA decoding and of exact dense decoding (flash-decoding
//! over the cache's history) on the same cache, against the context length, in one process.
//!
//! `cargo run --release --example bench_decode [-- --contexts 4096,65536,1048576 --batch 1,8]`
//!
//! For each (batch, chunk C, context N): a decoder is filled with N random tokens per sequence
//! (`Decoder::extend`, no outputs), then steps of C tokens alternate FMA and dense on the same
//! cache (tensors already on the GPU, `Decoder::step` with `EncodeStep`, one submit per step, waited for); the
//! median wall clock of `--reps` steps of each is reported per token (ms per step / C), with
//! tokens per second (batch * C / step time) and the dense/FMA ratio. `record` is the host time
//! of recording and submitting one FMA step (its overhead, not waited for). Where the device
//! has `TIMESTAMP_QUERY_INSIDE_ENCODERS`, each step is also timed by GPU timestamps written
//! into its encoder before and after it (the GPU's own time for the step, without submit and
//! wake-up latency), reported beside the wall clock ("gpu ms/t"; "-" without them). Writes CSV
//! and an SVG plot (`--out`, default results/decode.csv and .svg).

use std::time::Instant;

use clap::Parser;
use multipole_attn::gpu::{DecodeMode, Decoder, EncodeStep, GpuContext, StepTensors};
use multipole_attn::random::normal_tensor;
use multipole_attn::{DecodeConfig, FmaConfig};
use plotters::prelude::*;
use wgpu::util::DeviceExt;

#[derive(Parser)]
struct Args {
    /// Context lengths (tokens already in the cache when the timed steps run).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "4096,16384,65536,262144,1048576"
    )]
    contexts: Vec<usize>,
    /// Batch sizes (sequences; one head each unless --heads).
    #[arg(long, value_delimiter = ',', default_value = "1,8")]
    batch: Vec<usize>,
    /// Longest context run with batch > 1 (host and device memory: batch x N x d x 8 bytes).
    #[arg(long, default_value_t = 131072)]
    batched_max: usize,
    /// Tokens per step.
    #[arg(long, value_delimiter = ',', default_value = "1,16")]
    chunk: Vec<usize>,
    /// Longest context run with more than one token per step (dense steps of C tokens at
    /// 2^20 take minutes on a CPU adapter).
    #[arg(long, default_value_t = 262144)]
    chunked_max: usize,
    /// Heads per sequence.
    #[arg(long, default_value_t = 1)]
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
    /// Timed steps per mode (median reported), after one warm-up step each.
    #[arg(long, default_value_t = 5)]
    reps: usize,
    /// CSV output (the SVG next to it).
    #[arg(long, default_value = "results/decode.csv")]
    out: String,
}

struct Row {
    batch: usize,
    chunk: usize,
    context: usize,
    fma_ms: f64,
    dense_ms: f64,
    record_ms: f64,
    /// Median GPU milliseconds per step by timestamps (FMA, dense), where the device has them.
    gpu_ms: Option<(f64, f64)>,
}

/// GPU timestamps around one step in its own encoder: the step's time on the GPU (ns by the
/// queue's timestamp period), read back after the wall clock has stopped.
struct Timer {
    queries: wgpu::QuerySet,
    resolve: wgpu::Buffer,
    readback: wgpu::Buffer,
    period_ns: f64,
}

impl Timer {
    /// A timer where the device offers timestamps inside encoders, else `None`.
    fn new(ctx: &GpuContext) -> Option<Self> {
        if !ctx.encoder_timestamps() {
            return None;
        }
        let buffer = |usage| {
            ctx.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("bench_decode timestamps"),
                size: 16,
                usage,
                mapped_at_creation: false,
            })
        };
        Some(Self {
            queries: ctx.device.create_query_set(&wgpu::QuerySetDescriptor {
                label: Some("bench_decode timestamps"),
                ty: wgpu::QueryType::Timestamp,
                count: 2,
            }),
            resolve: buffer(wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC),
            readback: buffer(wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST),
            period_ns: f64::from(ctx.queue.get_timestamp_period()),
        })
    }

    /// Before the step's commands.
    fn begin(&self, enc: &mut wgpu::CommandEncoder) {
        enc.write_timestamp(&self.queries, 0);
    }

    /// After them: the two timestamps resolved into the readback buffer.
    fn end(&self, enc: &mut wgpu::CommandEncoder) {
        enc.write_timestamp(&self.queries, 1);
        enc.resolve_query_set(&self.queries, 0..2, &self.resolve, 0);
        enc.copy_buffer_to_buffer(&self.resolve, 0, &self.readback, 0, 16);
    }

    /// Milliseconds between the two timestamps (after the submit was waited for).
    fn read_ms(&self, ctx: &GpuContext) -> Result<f64, Box<dyn std::error::Error>> {
        self.readback
            .slice(..)
            .map_async(wgpu::MapMode::Read, |_| {});
        ctx.device.poll(wgpu::PollType::wait_indefinitely())?;
        let ticks: [u64; 2] = {
            let view = self.readback.slice(..).get_mapped_range()?;
            let t: &[u64] = bytemuck::cast_slice(&view);
            [t[0], t[1]]
        };
        self.readback.unmap();
        Ok(ticks[1].wrapping_sub(ticks[0]) as f64 * self.period_ns * 1e-6)
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn buffer(ctx: &GpuContext, data: &[f32]) -> wgpu::Buffer {
    ctx.device
        .create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: Some("bench"),
            contents: bytemuck::cast_slice(data),
            usage: wgpu::BufferUsages::STORAGE
                | wgpu::BufferUsages::COPY_SRC
                | wgpu::BufferUsages::COPY_DST,
        })
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let ctx = GpuContext::new()?;
    println!("adapter: {} ({:?})", ctx.info.name, ctx.info.backend);
    let timer = Timer::new(&ctx);
    println!(
        "GPU time per step: {}",
        if timer.is_some() {
            "timestamps around each step (gpu ms/t columns)"
        } else {
            "no TIMESTAMP_QUERY_INSIDE_ENCODERS on this device: wall clock only"
        }
    );
    let d = args.head_dim;
    let mut rows = Vec::new();
    println!(
        "{:>5} {:>3} {:>8} | {:>10} {:>10} {:>8} | {:>10} {:>10} | {:>9} | {:>10} {:>10}",
        "batch",
        "C",
        "context",
        "FMA ms/tok",
        "dense ms/t",
        "dense/F",
        "FMA tok/s",
        "dense tok/s",
        "record ms",
        "FMA gpu ms/t",
        "dense gpu ms/t"
    );
    for &batch in &args.batch {
        for &chunk in &args.chunk {
            for &n in &args.contexts {
                if (batch > 1 && n > args.batched_max) || (chunk > 1 && n > args.chunked_max) {
                    continue;
                }
                let steps = 2 * (args.reps + 1);
                let cfg = DecodeConfig::new(
                    FmaConfig::new(args.block, args.rank),
                    batch,
                    args.heads,
                    d,
                    n + steps * chunk,
                )
                .max_chunk(chunk);
                let dec = Decoder::new(&ctx, cfg)?;
                dec.prepare()?;
                let rows_n = batch * args.heads;
                // The context, one binding-sized piece of host memory at a time is not needed:
                // extend takes (batch, heads, N, d) and splits it itself.
                let k = normal_tensor(n as u64, rows_n * n * d);
                let v = normal_tensor(n as u64 + 1, rows_n * n * d);
                dec.extend(&k, &v, &vec![n; batch])?;
                drop((k, v));
                let len = rows_n * chunk * d;
                let (q, k, v) = (
                    buffer(&ctx, &normal_tensor(7, len)),
                    buffer(&ctx, &normal_tensor(8, len)),
                    buffer(&ctx, &normal_tensor(9, len)),
                );
                let (o, lse) = (
                    buffer(&ctx, &vec![0.0; len]),
                    buffer(&ctx, &vec![0.0; len / d]),
                );
                let t = StepTensors {
                    q: &q,
                    k: &k,
                    v: &v,
                    out: &o,
                    lse: &lse,
                };
                let mut fma = Vec::new();
                let mut dense = Vec::new();
                let mut record = Vec::new();
                let (mut fma_gpu, mut dense_gpu) = (Vec::new(), Vec::new());
                for rep in 0..=args.reps {
                    for mode in [DecodeMode::Fma, DecodeMode::Dense] {
                        let start = Instant::now();
                        let mut enc = ctx.device.create_command_encoder(&Default::default());
                        if let Some(tm) = &timer {
                            tm.begin(&mut enc);
                        }
                        let io = EncodeStep {
                            encoder: &mut enc,
                            tensors: t,
                            tokens: chunk,
                        };
                        dec.step(mode, io)?;
                        if let Some(tm) = &timer {
                            tm.end(&mut enc);
                        }
                        ctx.queue.submit([enc.finish()]);
                        let recorded = start.elapsed().as_secs_f64() * 1e3;
                        ctx.device.poll(wgpu::PollType::wait_indefinitely())?;
                        let ms = start.elapsed().as_secs_f64() * 1e3;
                        // Read after the wall clock stopped: the readback is not the step's.
                        let gpu_ms = timer.as_ref().map(|tm| tm.read_ms(&ctx)).transpose()?;
                        if rep > 0 {
                            match mode {
                                DecodeMode::Fma => {
                                    fma.push(ms);
                                    record.push(recorded);
                                    fma_gpu.extend(gpu_ms);
                                }
                                DecodeMode::Dense => {
                                    dense.push(ms);
                                    dense_gpu.extend(gpu_ms);
                                }
                            }
                        }
                    }
                }
                let row = Row {
                    batch,
                    chunk,
                    context: n,
                    fma_ms: median(fma),
                    dense_ms: median(dense),
                    record_ms: median(record),
                    gpu_ms: timer.as_ref().map(|_| (median(fma_gpu), median(dense_gpu))),
                };
                let per_tok = |ms: f64| ms / chunk as f64;
                let tps = |ms: f64| (batch * chunk) as f64 / (ms / 1e3);
                let gpu = |pick: fn((f64, f64)) -> f64| {
                    row.gpu_ms
                        .map_or("-".to_string(), |g| format!("{:.3}", per_tok(pick(g))))
                };
                println!(
                    "{:>5} {:>3} {:>8} | {:>10.3} {:>10.3} {:>8.1} | {:>10.1} {:>10.1} | {:>9.3} | {:>12} {:>14}",
                    batch,
                    chunk,
                    n,
                    per_tok(row.fma_ms),
                    per_tok(row.dense_ms),
                    row.dense_ms / row.fma_ms,
                    tps(row.fma_ms),
                    tps(row.dense_ms),
                    row.record_ms,
                    gpu(|g| g.0),
                    gpu(|g| g.1)
                );
                rows.push(row);
            }
        }
    }
    if let Some(dir) = std::path::Path::new(&args.out).parent() {
        std::fs::create_dir_all(dir)?;
    }
    let mut w = csv::Writer::from_path(&args.out)?;
    w.write_record([
        "batch",
        "chunk",
        "context",
        "fma_ms_per_step",
        "dense_ms_per_step",
        "record_ms",
        "fma_gpu_ms_per_step",
        "dense_gpu_ms_per_step",
    ])?;
    for r in &rows {
        w.write_record(&[
            r.batch.to_string(),
            r.chunk.to_string(),
            r.context.to_string(),
            format!("{:.4}", r.fma_ms),
            format!("{:.4}", r.dense_ms),
            format!("{:.4}", r.record_ms),
            r.gpu_ms.map_or(String::new(), |g| format!("{:.4}", g.0)),
            r.gpu_ms.map_or(String::new(), |g| format!("{:.4}", g.1)),
        ])?;
    }
    w.flush()?;
    plot(&rows, &args.out.replace(".csv", ".svg"))?;
    println!("wrote {} and its .svg", args.out);
    Ok(())
}

/// Per-token milliseconds against the context, log-log, one line per (mode, batch, chunk).
fn plot(rows: &[Row], path: &str) -> Result<(), Box<dyn std::error::Error>> {
    let root = SVGBackend::new(path, (900, 560)).into_drawing_area();
    root.fill(&WHITE)?;
    let xs: Vec<f64> = rows.iter().map(|r| r.context as f64).collect();
    let ys: Vec<f64> = rows
        .iter()
        .flat_map(|r| [r.fma_ms / r.chunk as f64, r.dense_ms / r.chunk as f64])
        .collect();
    let (x0, x1) = (
        xs.iter().cloned().fold(f64::MAX, f64::min),
        xs.iter().cloned().fold(0.0, f64::max),
    );
    let (y0, y1) = (
        ys.iter().cloned().fold(f64::MAX, f64::min),
        ys.iter().cloned().fold(0.0, f64::max),
    );
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "decoding: ms per token against context length",
            ("sans-serif", 20),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(
            (x0 * 0.8..x1 * 1.25).log_scale(),
            (y0 * 0.8..y1 * 1.25).log_scale(),
        )?;
    chart
        .configure_mesh()
        .x_desc("context (tokens)")
        .y_desc("ms per token")
        .draw()?;
    let mut series: Vec<(usize, usize)> = rows.iter().map(|r| (r.batch, r.chunk)).collect();
    series.dedup();
    for (i, (b, c)) in series.iter().enumerate() {
        for (mode, color) in [
            ("FMA", Palette99::pick(2 * i)),
            ("dense", Palette99::pick(2 * i + 1)),
        ] {
            let pts: Vec<(f64, f64)> = rows
                .iter()
                .filter(|r| r.batch == *b && r.chunk == *c)
                .map(|r| {
                    let ms = if mode == "FMA" { r.fma_ms } else { r.dense_ms };
                    (r.context as f64, ms / r.chunk as f64)
                })
                .collect();
            let style = color.stroke_width(2);
            chart
                .draw_series(LineSeries::new(pts.clone(), style))?
                .label(format!("{mode} batch {b} C {c}"))
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], style));
            chart.draw_series(pts.iter().map(|&p| Circle::new(p, 3, color.filled())))?;
        }
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}
