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
//! of recording and submitting one FMA step (its overhead, not waited for). Writes CSV and an SVG
//! plot (`--out`, default results/decode.csv and .svg).

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
    let d = args.head_dim;
    let mut rows = Vec::new();
    println!(
        "{:>5} {:>3} {:>8} | {:>10} {:>10} {:>8} | {:>10} {:>10} | {:>9}",
        "batch",
        "C",
        "context",
        "FMA ms/tok",
        "dense ms/t",
        "dense/F",
        "FMA tok/s",
        "dense tok/s",
        "record ms"
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
                for rep in 0..=args.reps {
                    for mode in [DecodeMode::Fma, DecodeMode::Dense] {
                        let start = Instant::now();
                        let mut enc = ctx.device.create_command_encoder(&Default::default());
                        let io = EncodeStep {
                            encoder: &mut enc,
                            tensors: t,
                            tokens: chunk,
                        };
                        dec.step(mode, io)?;
                        ctx.queue.submit([enc.finish()]);
                        let recorded = start.elapsed().as_secs_f64() * 1e3;
                        ctx.device.poll(wgpu::PollType::wait_indefinitely())?;
                        let ms = start.elapsed().as_secs_f64() * 1e3;
                        if rep > 0 {
                            match mode {
                                DecodeMode::Fma => {
                                    fma.push(ms);
                                    record.push(recorded);
                                }
                                DecodeMode::Dense => dense.push(ms),
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
                };
                let per_tok = |ms: f64| ms / chunk as f64;
                let tps = |ms: f64| (batch * chunk) as f64 / (ms / 1e3);
                println!(
                    "{:>5} {:>3} {:>8} | {:>10.3} {:>10.3} {:>8.1} | {:>10.1} {:>10.1} | {:>9.3}",
                    batch,
                    chunk,
                    n,
                    per_tok(row.fma_ms),
                    per_tok(row.dense_ms),
                    row.dense_ms / row.fma_ms,
                    tps(row.fma_ms),
                    tps(row.dense_ms),
                    row.record_ms
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
    ])?;
    for r in &rows {
        w.write_record(&[
            r.batch.to_string(),
            r.chunk.to_string(),
            r.context.to_string(),
            format!("{:.4}", r.fma_ms),
            format!("{:.4}", r.dense_ms),
            format!("{:.4}", r.record_ms),
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
