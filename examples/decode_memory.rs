//! The decoder's memory against the context length, measured: every GPU buffer a decoder holds
//! (`Decoder::allocated_bytes`) once its sequences have reached each context.
//!
//! `cargo run --release --example decode_memory [-- --contexts 1024,16384,262144 --window 128]`
//!
//! Columns: a sliding-window decoder (docs/variants.md: a ring of the last L + C keys and
//! values, no coarse level, no history) made for the longest context and grown through every
//! context in turn (`Decoder::extend` in pieces of at most 16384 tokens, then one step at each
//! context); the same made for each context alone (max_len = the context); and, for scale,
//! the cache proper (`Decoder::bytes`: without the host path's staging buffers, which a long
//! `extend` piece grows) of plain decoders made for each context: FMA without history (its
//! fixed state grows with log n: the levels) and with the history the dense decode reads
//! (pages of every key and value, allocated a page at a time), and K and V themselves. Exits
//! 1 if the windowed decoder's bytes differ anywhere.

use clap::Parser;
use multipole_attn::gpu::{DecodeMode, Decoder, GpuContext, Host};
use multipole_attn::random::normal_tensor;
use multipole_attn::{DecodeConfig, FmaConfig, Variants, Window};

#[derive(Parser)]
struct Args {
    /// Context lengths (tokens per sequence), increasing.
    #[arg(long, value_delimiter = ',', default_value = "1024,16384,262144")]
    contexts: Vec<usize>,
    /// Window L (keys i - L ..= i); 128 as gpt-oss's sliding layers.
    #[arg(long, default_value_t = 128)]
    window: usize,
    /// Sequences.
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Query heads per sequence.
    #[arg(long, default_value_t = 8)]
    heads: usize,
    /// K/V heads per sequence (grouped-query attention).
    #[arg(long, default_value_t = 2)]
    kv_heads: usize,
    /// Head dimension.
    #[arg(long, default_value_t = 64)]
    head_dim: usize,
    /// Block size m (FMA; at least the window for the FMA mode).
    #[arg(long, default_value_t = 128)]
    block: usize,
    /// Tokens per step.
    #[arg(long, default_value_t = 1)]
    chunk: usize,
    /// Skip the plain decoders (their extend writes every token).
    #[arg(long)]
    window_only: bool,
}

type Res<T> = Result<T, Box<dyn std::error::Error>>;

/// Grows a decoder of `cfg` through `contexts` and returns at each its bytes: every buffer,
/// and the cache proper (FMA state and history).
fn measure(
    ctx: &GpuContext,
    cfg: DecodeConfig,
    contexts: &[usize],
    a: &Args,
) -> Res<Vec<(u64, u64)>> {
    let dec = Decoder::new(ctx, cfg)?;
    let (b, hk, d, c) = (a.batch, a.kv_heads, a.head_dim, a.chunk);
    let mut at = 0;
    let mut bytes = Vec::new();
    for &n in contexts {
        let target = n - c;
        while at < target {
            let piece = (target - at).min(16384);
            let k = normal_tensor(at as u64, b * hk * piece * d);
            let v = normal_tensor(at as u64 + 1, b * hk * piece * d);
            dec.extend(&k, &v, &vec![piece; b])?;
            at += piece;
        }
        let q = normal_tensor(n as u64, b * a.heads * c * d);
        let kv = normal_tensor(n as u64 + 2, b * hk * c * d);
        dec.step(DecodeMode::Fma, Host::new(&q, &kv, &kv))?;
        at += c;
        assert_eq!(dec.lens()?, vec![n; b]);
        let (fixed, history) = dec.bytes()?;
        bytes.push((dec.allocated_bytes()?, fixed + history));
    }
    Ok(bytes)
}

fn main() -> Res<()> {
    let a = Args::parse();
    let ctx = GpuContext::new()?;
    println!("adapter: {} ({:?})", ctx.info.name, ctx.info.backend);
    let max_len = *a.contexts.iter().max().ok_or("no context")?;
    let cfg = |max_len: usize| {
        DecodeConfig::new(
            FmaConfig::new(a.block, 2),
            a.batch,
            a.heads,
            a.head_dim,
            max_len,
        )
        .kv_heads(a.kv_heads)
        .max_chunk(a.chunk)
    };
    let window = Variants {
        window: Some(Window {
            left: a.window,
            right: 0,
        }),
        ..Variants::default()
    };
    let grown: Vec<u64> = measure(&ctx, cfg(max_len).variants(window.clone()), &a.contexts, &a)?
        .iter()
        .map(|b| b.0)
        .collect();
    println!(
        "batch {}, heads {}/{} K/V, d {}, window {}, m {}, C {}; bytes:",
        a.batch, a.heads, a.kv_heads, a.head_dim, a.window, a.block, a.chunk
    );
    println!(
        "{:>8} | {:>13} | {:>13} | {:>13} | {:>13} | {:>13}",
        "context", "window grown", "window alone", "FMA cache", "+history", "K, V"
    );
    let mut alone = Vec::new();
    for (i, &n) in a.contexts.iter().enumerate() {
        let one = [n];
        alone.push(measure(&ctx, cfg(n).variants(window.clone()), &one, &a)?[0].0);
        let plain = |history: bool| -> Res<String> {
            if a.window_only {
                return Ok("-".into());
            }
            Ok(measure(&ctx, cfg(n).history(history), &one, &a)?[0]
                .1
                .to_string())
        };
        let kv = (2 * a.batch * a.kv_heads * n * a.head_dim * 4) as u64;
        println!(
            "{n:>8} | {:>13} | {:>13} | {:>13} | {:>13} | {kv:>13}",
            grown[i],
            alone[i],
            plain(false)?,
            plain(true)?
        );
    }
    if grown.iter().chain(&alone).any(|&x| x != grown[0]) {
        return Err(format!("the windowed decoder's bytes changed: {grown:?} {alone:?}").into());
    }
    Ok(())
}
