//! `multipole-attn run`: load Q, K, V, build the configuration, compute on the GPU or with the
//! CPU reference, write O (and the LSE).

use crate::args::{DownsampleArg, QueriesArg, RunArgs};
use crate::error::{CliError, CliResult};
use crate::npy_io::{check_output_path, read_shape, read_tensor, write_array, write_f16};
use crate::tensor::fmt_shape;
use crate::weights_npz::read_weights;
use multipole_attn::gpu::{Attention, GpuContext, Host};
use multipole_attn::levels::num_levels;
use multipole_attn::{cpu, cross, Downsample, FmaConfig, LearnedWeights, Method, Problem};
use multipole_attn::{Queries, Sequences, Shape, Storage, Variants};

/// Runs the `run` subcommand.
pub fn run(args: &RunArgs) -> CliResult<()> {
    // Check the outputs first so a bad path does not cost a whole computation.
    check_output_path(&args.out)?;
    if let Some(lse) = &args.lse {
        check_output_path(lse)?;
    }
    // Headers first: the shape, the configuration and (on the GPU) the adapter's limits are
    // checked before the data is read, which for long sequences is gigabytes.
    let shapes = [
        read_shape(&args.q, "Q")?,
        read_shape(&args.k, "K")?,
        read_shape(&args.v, "V")?,
    ];
    let shape = problem_shape(&shapes[0], &shapes[1], &shapes[2])?;
    shape.validate()?;
    let problem = problem(args, shape)?;
    let o_shape = shapes[0].clone();
    let lse_shape = o_shape[..o_shape.len() - 1].to_vec();
    let method = if args.dense {
        Method::Dense
    } else {
        Method::Fma(build_config(args, &problem)?)
    };
    let gpu = if args.reference {
        None
    } else {
        Some(prepare_gpu(
            method.clone(),
            &problem,
            args.storage.storage(),
        )?)
    };
    let q = read_tensor(&args.q, "Q")?;
    let k = read_tensor(&args.k, "K")?;
    let v = read_tensor(&args.v, "V")?;
    for (name, t) in [("Q", &q), ("K", &k), ("V", &v)] {
        log::info!("{name}: {} {}", t.dtype(), fmt_shape(&t.shape));
    }
    log::info!(
        "{} {shape} on {}",
        if args.dense { "dense" } else { "FMA" },
        if args.reference {
            "the CPU reference"
        } else {
            "the GPU"
        }
    );
    if let Some(gpu) = gpu {
        let (q, k, v) = (q.into_f32("Q")?, k.into_f32("K")?, v.into_f32("V")?);
        let host = Host::new(&q, &k, &v);
        let host = if args.lse.is_some() {
            host
        } else {
            host.without_lse()
        };
        let out = gpu.forward(&problem, host)?;
        match gpu.storage_type() {
            // f16 storage: O holds f16 values; written as the float16 it is.
            Storage::F16 => write_f16(&args.out, &o_shape, &out.o)?,
            Storage::F32 => write_array(&args.out, &o_shape, out.o)?,
        }
        if let Some(path) = &args.lse {
            let lse = out.lse.ok_or_else(|| {
                CliError::Runtime(
                    "the GPU forward returned no LSE although it was asked for".into(),
                )
            })?;
            write_array(path, &lse_shape, lse)?;
        }
    } else {
        // f64 inputs keep their precision in the reference.
        let (q, k, v) = (q.into_f64(), k.into_f64(), v.into_f64());
        let r = cpu::forward(&method, &problem, &q, &k, &v)?;
        write_array(&args.out, &o_shape, r.o)?;
        if let Some(path) = &args.lse {
            write_array(path, &lse_shape, r.lse)?;
        }
    }
    Ok(())
}

/// The problem shape of Q, K, V: 2 axes (n, d) for Q and (n_kv, d) for K and V, or 4:
/// Q (batch, heads, n, d), K and V (batch, kv_heads, n_kv, d). K and V may have fewer heads
/// than Q (grouped-query attention: their heads must divide Q's, and query head h reads K/V
/// head h / (heads / kv_heads)) and another length (cross-length attention: n_kv != n; what
/// each method takes of it is checked by the method).
pub(crate) fn problem_shape(q: &[usize], k: &[usize], v: &[usize]) -> CliResult<Shape> {
    if v != k {
        return Err(CliError::Input(format!(
            "K and V must have the same shape, but K has shape {} and V has shape {}",
            fmt_shape(k),
            fmt_shape(v)
        )));
    }
    match (q, k) {
        (&[n, d], &[nk, dk]) if dk == d => Ok(Shape::cross(1, 1, n, nk, d)),
        (&[b, h, n, d], &[bk, hk, nk, dk]) if (bk, dk) == (b, d) && hk > 0 => {
            if !h.is_multiple_of(hk) {
                return Err(CliError::Input(format!(
                    "K and V have {hk} heads, which does not divide Q's {h} heads: grouped-query \
                     attention needs K/V heads that divide the query heads (each K/V head serves \
                     heads / kv_heads consecutive query heads); shapes Q {}, K {}",
                    fmt_shape(q),
                    fmt_shape(k)
                )));
            }
            Ok(Shape::cross(b, h, n, nk, d).with_kv_heads(hk))
        }
        (&[_, _], _) | (&[_, _, _, _], _) if q.len() == k.len() => Err(CliError::Input(format!(
            "Q, K and V must agree in batch and head_dim (K/V may have fewer heads, for \
             grouped-query attention, and another length, for cross-length attention), but Q \
             has shape {} and K has shape {}",
            fmt_shape(q),
            fmt_shape(k)
        ))),
        _ => Err(CliError::Input(format!(
            "Q, K and V must all have 2 axes (n, d) or all 4 (batch, heads, n, d), but Q has shape \
             {} and K has shape {}",
            fmt_shape(q),
            fmt_shape(k)
        ))),
    }
}

/// The FMA configuration from the arguments; learned weights are read (or box-initialised) and
/// validated here so that every input error surfaces before any computation.
pub(crate) fn build_config(args: &RunArgs, problem: &Problem) -> CliResult<FmaConfig> {
    // The levels are those of the keys' sequence (a shorter Q is its last positions).
    let (d, n) = (problem.shape.head_dim, problem.shape.seq_kv);
    let queries = match args.queries {
        QueriesArg::Fine => Queries::Fine,
        QueriesArg::Coarse => Queries::Coarse,
    };
    let base = FmaConfig::new(args.block, args.rank)
        .count_correction(!args.no_count_correction)
        .queries(queries)
        .grid(args.grid);
    // m and p first (and causal + coarse, and a grid of n tokens, not causal): the weight
    // shapes and the box initialisation assume m >= 1 and p | m.
    cross::check(&base, problem)?;
    let learned = match (args.downsample, &args.weights) {
        (Some(DownsampleArg::Average), Some(_)) => {
            return Err(CliError::Input(
                "--weights gives learned downsampling weights, but --downsample average was asked for; \
                 drop one of them"
                    .into(),
            ))
        }
        (Some(DownsampleArg::Learned), _) | (None, Some(_)) => true,
        (Some(DownsampleArg::Average) | None, None) => false,
    };
    if !learned {
        cross::check(&base, problem)?;
        return Ok(base);
    }
    let levels = match args.grid {
        Some(grid) => grid.num_levels(args.block),
        None => num_levels(n, args.block),
    };
    let weights = match (&args.weights, args.grid) {
        (Some(path), grid) => read_weights(path, d, args.block, args.rank, levels, grid.is_some())?,
        (None, Some(grid)) => LearnedWeights::box_init_grid_for(d, args.block, args.rank, grid),
        (None, None) => LearnedWeights::box_init_for(d, args.block, args.rank, n),
    };
    let cfg = base.downsample(Downsample::Learned(weights));
    cross::check(&cfg, problem)?;
    Ok(cfg)
}

/// The problem of the arguments: the arrays' shape, the sequences of `--seqlens` or
/// `--lengths`, `--causal` and the variants (`--softcap`, `--sinks`, `--window`), checked.
pub(crate) fn problem(args: &RunArgs, shape: Shape) -> CliResult<Problem> {
    let sinks = match &args.sinks {
        None => None,
        Some(path) => {
            let t = read_tensor(path, "sinks")?;
            if t.shape != [shape.heads] {
                return Err(CliError::Input(format!(
                    "--sinks {} has shape {}, but Q has {} heads: one sink logit per query head, \
                     shape ({},)",
                    path.display(),
                    fmt_shape(&t.shape),
                    shape.heads,
                    shape.heads
                )));
            }
            Some(t.into_f32("sinks")?)
        }
    };
    let problem = Problem {
        sequences: sequences(args, shape)?,
        ..Problem::new(shape).causal(args.causal).variants(Variants {
            softcap: args.softcap,
            sinks,
            window: args.window,
        })
    };
    problem.validate()?;
    Ok(problem)
}

/// The variable-length batch of `--seqlens` (packed) or `--lengths` (padded), checked against
/// the arrays' shape; `None` without either.
pub(crate) fn sequences(args: &RunArgs, shape: Shape) -> CliResult<Option<Sequences>> {
    let n = shape.seq;
    if let (Some(lens), Some(kv)) = (&args.seqlens, &args.seqlens_kv) {
        if shape.batch != 1 {
            return Err(CliError::Input(format!(
                "--seqlens packs sequences along the sequence axis of arrays (n, d) or (1, heads, \
                 n, d), but Q has batch {} ({shape})",
                shape.batch
            )));
        }
        if kv.len() != lens.len() {
            return Err(CliError::Input(format!(
                "--seqlens-kv {} gives {} key lengths for the {} sequences of --seqlens {}: one \
                 each",
                join(kv),
                kv.len(),
                lens.len(),
                join(lens)
            )));
        }
        for (flag, l, total) in [("--seqlens", lens, n), ("--seqlens-kv", kv, shape.seq_kv)] {
            let sum: usize = l.iter().sum();
            if sum != total {
                return Err(CliError::Input(format!(
                    "{flag} {} sum to {sum} tokens, but the arrays have {total} ({shape}): Q is \
                     packed by --seqlens and K, V by --seqlens-kv",
                    join(l)
                )));
            }
        }
        return Ok(Some(Sequences::packed_cross(lens.clone(), kv.clone())?));
    }
    if !shape.is_self() && (args.seqlens.is_some() || args.lengths.is_some()) {
        return Err(CliError::Input(format!(
            "--seqlens and --lengths need K and V as long as Q ({shape}), or --seqlens-kv with \
             the key lengths: the sequences of a variable-length batch each attend to their own \
             tokens"
        )));
    }
    if let Some(lens) = &args.seqlens {
        if shape.batch != 1 {
            return Err(CliError::Input(format!(
                "--seqlens packs sequences along the sequence axis of arrays (n, d) or (1, heads, \
                 n, d), but Q has batch {} ({shape}); for one sequence per batch row use --lengths",
                shape.batch
            )));
        }
        let total: usize = lens.iter().sum();
        if total != n {
            return Err(CliError::Input(format!(
                "--seqlens {} sum to {total} tokens, but Q, K and V have n = {n}: the lengths of \
                 a packed batch must sum to n",
                join(lens)
            )));
        }
        return Ok(Some(Sequences::packed(lens.clone())?));
    }
    if let Some(lens) = &args.lengths {
        if lens.len() != shape.batch {
            return Err(CliError::Input(format!(
                "--lengths {} gives {} lengths, but Q has {} batch rows ({shape}): one length per \
                 row",
                join(lens),
                lens.len(),
                shape.batch
            )));
        }
        if let Some(&l) = lens.iter().find(|&&l| l > n) {
            return Err(CliError::Input(format!(
                "--lengths {}: length {l} is over the rows' n = {n} tokens (lengths 0..=n; 0 is a \
                 row with no sequence, all padding)",
                join(lens)
            )));
        }
        return Ok(Some(Sequences::padded(n, lens.clone())?));
    }
    Ok(None)
}

fn join(lens: &[usize]) -> String {
    lens.iter()
        .map(|l| l.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

/// Opens the adapter and prepares `method` with `storage` (f16: a typed error without
/// SHADER_F16), checking the problem against the adapter's limits before any data is read.
fn prepare_gpu(method: Method, problem: &Problem, storage: Storage) -> CliResult<Attention> {
    let ctx = GpuContext::new()?;
    log::info!("adapter: {} ({:?})", ctx.info.name, ctx.info.backend);
    let attention = Attention::new(&ctx, method)?.storage(storage)?;
    attention.check(problem)?;
    Ok(attention)
}
