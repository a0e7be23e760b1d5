//! `multipole-attn decode`: prefill P tokens, then decode the rest C tokens at a time through
//! the decoder's cache (FMA or exact dense), and write every row of O (and the LSE).

use std::time::Instant;

use indicatif::{ProgressBar, ProgressStyle};

use crate::args::{DecodeArgs, QueriesArg};
use crate::error::{CliError, CliResult};
use crate::npy_io::{check_output_path, read_tensor, write_array, write_f16};
use crate::run::{build_config, problem, problem_shape};
use crate::tensor::fmt_shape;
use multipole_attn::gpu::{DecodeMode, Decoder, GpuContext, Host};
use multipole_attn::levels::num_levels;
use multipole_attn::{cpu, DecodeConfig, Shape, Storage};

/// Rows [lo, lo + len) of each of the `heads` (batch, head) rows of `x` (n = `s.seq` rows
/// each), as (batch, heads, len, d): Q's heads or K's and V's (fewer, grouped-query).
fn rows<T: Copy>(x: &[T], s: Shape, heads: usize, lo: usize, len: usize) -> Vec<T> {
    let (n, d) = (s.seq, s.head_dim);
    (0..heads)
        .flat_map(|bh| {
            x[(bh * n + lo) * d..(bh * n + lo + len) * d]
                .iter()
                .copied()
        })
        .collect()
}

/// Writes `part` (batch, heads, len, width) into rows [lo, lo + len) of `all` (shape `s`).
fn put<T: Copy>(all: &mut [T], part: &[T], s: Shape, lo: usize, len: usize, width: usize) {
    let n = s.seq;
    for bh in 0..s.batch_heads() {
        all[(bh * n + lo) * width..(bh * n + lo + len) * width]
            .copy_from_slice(&part[bh * len * width..(bh + 1) * len * width]);
    }
}

/// Runs the `decode` subcommand.
pub fn decode(args: &DecodeArgs) -> CliResult<()> {
    let run = &args.run;
    check_output_path(&run.out)?;
    if let Some(lse) = &run.lse {
        check_output_path(lse)?;
    }
    if run.queries == QueriesArg::Coarse {
        return Err(CliError::Input(
            "--queries coarse cannot decode: decoding is causal and coarse queries are bidirectional \
             only (a pooled query would read later tokens); use fine queries"
                .into(),
        ));
    }
    if run.grid.is_some() {
        return Err(CliError::Input(
            "decode does not take --grid: decoding appends tokens of a 1D sequence (2D FMA is \
             bidirectional)"
                .into(),
        ));
    }
    if args.chunk == 0 {
        return Err(CliError::Input(
            "--chunk must be at least 1 token per step".into(),
        ));
    }
    let (q, k, v) = (
        read_tensor(&run.q, "Q")?,
        read_tensor(&run.k, "K")?,
        read_tensor(&run.v, "V")?,
    );
    let shape = problem_shape(&q.shape, &k.shape, &v.shape)?;
    if run.seqlens.is_some() || run.lengths.is_some() {
        return Err(CliError::Input(
            "decode does not take --seqlens, --seqlens-kv or --lengths yet: variable-length batches \
             have a forward (`run`) but no decoding cache"
                .into(),
        ));
    }
    shape.validate()?;
    if !shape.is_self() {
        return Err(CliError::Input(format!(
            "decode needs Q, K and V of one length (the tokens to decode), but Q has {} rows and \
             K, V {}: decoding appends each token's key and value as it goes",
            shape.seq, shape.seq_kv
        )));
    }
    let n = shape.seq;
    if args.prefill > n {
        return Err(CliError::Input(format!(
            "--prefill {} is longer than the sequence: Q, K, V have n = {n} tokens ({})",
            args.prefill,
            fmt_shape(&q.shape)
        )));
    }
    // Decoding is causal: each token sees the ones before it (a window's R must be 0). The
    // variants (--softcap, --sinks, --window) are `run`'s, read and checked the same way.
    let problem = problem(run, shape)?.causal(true);
    problem.validate()?;
    let fma = build_config(run, &problem)?;
    let cfg = DecodeConfig::new(fma, shape.batch, shape.heads, shape.head_dim, n)
        .kv_heads(shape.kv_heads)
        .max_chunk(args.chunk.min(n.max(1)))
        .history(run.dense)
        .variants(problem.variants.clone())
        .storage(run.storage.storage());
    cfg.validate()?;
    if !run.dense {
        // FMA's window is its near field (L <= m), as for `run --causal`.
        cfg.check_fma_window()?;
    }
    let o_shape = q.shape.clone();
    let lse_shape = o_shape[..o_shape.len() - 1].to_vec();
    if run.reference {
        let (o, lse) = reference(
            &cfg,
            run.dense,
            q.into_f64(),
            k.into_f64(),
            v.into_f64(),
            shape,
        )?;
        write_array(&run.out, &o_shape, o)?;
        if let Some(path) = &run.lse {
            write_array(path, &lse_shape, lse)?;
        }
        return Ok(());
    }
    let (o, lse) = gpu(
        args,
        &cfg,
        q.into_f32("Q")?,
        k.into_f32("K")?,
        v.into_f32("V")?,
        shape,
    )?;
    match cfg.storage {
        // f16 storage: O holds f16 values; written as the float16 it is (as `run`).
        Storage::F16 => write_f16(&run.out, &o_shape, &o)?,
        Storage::F32 => write_array(&run.out, &o_shape, o)?,
    }
    if let Some(path) = &run.lse {
        write_array(path, &lse_shape, lse)?;
    }
    Ok(())
}

/// Decodes on the GPU: the prefill, then the steps (timed), every row gathered.
fn gpu(
    args: &DecodeArgs,
    cfg: &DecodeConfig,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    s: Shape,
) -> CliResult<(Vec<f32>, Vec<f32>)> {
    let ctx = GpuContext::new()?;
    log::info!("adapter: {} ({:?})", ctx.info.name, ctx.info.backend);
    let dec = Decoder::new(&ctx, cfg.clone())?;
    dec.prepare()?;
    let mode = if args.run.dense {
        DecodeMode::Dense
    } else {
        DecodeMode::Fma
    };
    let (n, d, p) = (s.seq, s.head_dim, args.prefill);
    let mut o = vec![0f32; s.elements()];
    let mut lse = vec![0f32; s.rows()];
    if p > 0 {
        let pre = dec.prefill(
            &rows(&q, s, s.batch_heads(), 0, p),
            &rows(&k, s, s.kv_batch_heads(), 0, p),
            &rows(&v, s, s.kv_batch_heads(), 0, p),
            &vec![p; s.batch],
            mode,
        )?;
        put(&mut o, &pre.o, s, 0, p, d);
        put(&mut lse, &pre.lse.unwrap_or_default(), s, 0, p, 1);
    }
    let start = Instant::now();
    let mut steps = 0;
    let mut at = p;
    let bar = progress_bar(n - p);
    while at < n {
        let c = args.chunk.min(n - at);
        bar.inc(c as u64);
        let (qs, ks, vs) = (
            rows(&q, s, s.batch_heads(), at, c),
            rows(&k, s, s.kv_batch_heads(), at, c),
            rows(&v, s, s.kv_batch_heads(), at, c),
        );
        let out = dec.step(mode, Host::new(&qs, &ks, &vs))?;
        put(&mut o, &out.o, s, at, c, d);
        put(&mut lse, &out.lse.unwrap_or_default(), s, at, c, 1);
        at += c;
        steps += 1;
    }
    bar.finish_and_clear();
    let secs = start.elapsed().as_secs_f64();
    let tokens = (n - p) * s.batch;
    let (fixed, history) = dec.bytes()?;
    outln!(
        "decode: {} ({}), prefill {p}, {steps} steps of up to {} tokens: {tokens} tokens in {:.3} s, {:.1} tokens/s (wall clock incl. upload and readback)",
        s,
        if args.run.dense { "dense" } else { "FMA" },
        args.chunk,
        secs,
        tokens as f64 / secs.max(1e-9)
    );
    if cfg.variants.window.is_some() {
        outln!(
            "cache: a window's ring, {fixed} bytes (fixed: no history, no coarse level); every \
             buffer of the decoder {} bytes; K and V themselves: {} bytes",
            dec.allocated_bytes()?,
            2 * s.kv_elements() as u64 * cfg.storage.bytes()
        );
    } else {
        outln!(
            "cache: FMA state {fixed} bytes (fixed), history {history} bytes; K and V themselves: {} bytes",
            2 * s.kv_elements() as u64 * cfg.storage.bytes()
        );
    }
    Ok((o, lse))
}

/// A bar of decoded tokens on stderr; indicatif draws it only when stderr is a terminal, so
/// logs and CI output stay clean.
fn progress_bar(tokens: usize) -> ProgressBar {
    let bar = ProgressBar::new(tokens as u64);
    if let Ok(style) =
        ProgressStyle::with_template("   decoding [{bar:30}] {pos}/{len} tokens {per_sec} {eta}")
    {
        bar.set_style(style.progress_chars("=> "));
    }
    bar
}

/// Decodes with the f64 CPU mirror (FMA) or takes exact causal attention (dense), with the
/// variants.
fn reference(
    cfg: &DecodeConfig,
    dense: bool,
    q: Vec<f64>,
    k: Vec<f64>,
    v: Vec<f64>,
    s: Shape,
) -> CliResult<(Vec<f64>, Vec<f64>)> {
    if dense {
        let r = cpu::dense_attention_with(&q, &k, &v, s, true, &cfg.variants)?;
        return Ok((r.o, r.lse));
    }
    let (n, d) = (s.seq, s.head_dim);
    let mut o = vec![0f64; s.elements()];
    let mut lse = vec![0f64; s.rows()];
    for bh in 0..s.batch_heads() {
        let mut dec = cpu::decode::Decoder::new(&cfg.fma, d, num_levels(n, cfg.fma.block))
            .with_variants(&cfg.variants)
            .head(bh % s.heads);
        // Grouped-query heads: query head bh reads K/V head bh / group.
        let kv = bh / s.group();
        for i in 0..n {
            let r = (bh * n + i) * d..(bh * n + i + 1) * d;
            let rk = (kv * n + i) * d..(kv * n + i + 1) * d;
            let (row, l) = dec.step(&q[r.clone()], &k[rk.clone()], &v[rk]);
            o[r].copy_from_slice(&row);
            lse[bh * n + i] = l;
        }
    }
    Ok((o, lse))
}
