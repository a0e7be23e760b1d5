//! `multipole-attn grad`: load Q, K, V and dO, run FMA forward and backward (on the GPU or
//! with the f64 CPU reference), write dQ, dK, dV and, in Learned mode, the gradients of every
//! level's weights to an .npz named like the weights (`k_w1`, `k_b1`, `v_w1`, `v_b1`, ...;
//! with `--queries coarse` also `q_w1`, `q_b1`, ...).
//! A variable-length batch (`--seqlens`, `--lengths`) is differentiated sequence by sequence
//! (each its own FMA; 0 on padding rows; weight gradients summed over the sequences).
//! `--dense` differentiates exact attention instead (`Method::Dense`; variable-length batches too, each sequence attending to itself):
//! dq, dk, dv only.

use crate::args::GradArgs;
use crate::error::{CliError, CliResult};
use crate::npy_io::{check_output_path, read_tensor, write_f16_npz};
use crate::run::{build_config, problem, problem_shape};
use crate::tensor::{fmt_shape, Tensor};
use multipole_attn::gpu::{Attention, GpuContext, Host, HostGrad};
use multipole_attn::levels::window;
use multipole_attn::{cpu, FmaConfig, Gradients, Method, Problem, Queries, Shape, Storage};
use ndarray::{ArrayD, IxDyn};
use ndarray_npy::{NpzWriter, WritableElement, WriteNpzError};
use std::fs::File;
use std::path::Path;

/// Runs the `grad` subcommand.
pub fn grad(args: &GradArgs) -> CliResult<()> {
    let run = &args.run;
    if run.lse.is_some() {
        return Err(CliError::Input(
            "--lse is an output of run, not of grad (grad writes only the gradients .npz)".into(),
        ));
    }
    check_output_path(&run.out)?;
    let q = read_tensor(&run.q, "Q")?;
    let k = read_tensor(&run.k, "K")?;
    let v = read_tensor(&run.v, "V")?;
    let dout = read_tensor(&args.dout, "dO")?;
    let shape = problem_shape(&q.shape, &k.shape, &v.shape)?;
    let problem = problem(run, shape)?;
    if dout.shape != q.shape {
        return Err(CliError::Input(format!(
            "dO must have the shape of Q (and of O), but Q has shape {} and dO has shape {}",
            fmt_shape(&q.shape),
            fmt_shape(&dout.shape)
        )));
    }
    shape.validate()?;
    let (x_shape, kv_shape) = (q.shape.clone(), k.shape.clone());
    log::info!(
        "{} gradients {shape} on {}",
        if run.dense { "dense" } else { "FMA" },
        if run.reference {
            "the CPU reference"
        } else {
            "the GPU"
        }
    );
    let method = if run.dense {
        Method::Dense
    } else {
        Method::Fma(build_config(run, &problem)?)
    };
    let shapes = (&x_shape[..], &kv_shape[..]);
    if run.reference {
        // f64 inputs keep their precision in the reference.
        let (q, k, v, dout) = (q.into_f64(), k.into_f64(), v.into_f64(), dout.into_f64());
        let g = cpu::backward(&method, &problem, (&q, &k, &v), &dout)?;
        write_gradients(&run.out, shapes, shape, method.fma(), g)
    } else {
        let storage = run.storage.storage();
        let g = run_gpu(&method, (q, k, v, dout), &problem, storage)?;
        let f32_only = g.weights.is_some() || g.dsinks.is_some();
        match storage {
            // f16 storage: dQ, dK, dV are f16 values, written as float16; with the learned
            // weights' or the sinks' gradients (f32 sums) every array is float32 (the f16
            // values widened exactly), one dtype per file.
            Storage::F16 if !f32_only => write_f16_npz(
                &run.out,
                &[
                    ("dq", shapes.0, &g.dq),
                    ("dk", shapes.1, &g.dk),
                    ("dv", shapes.1, &g.dv),
                ],
            ),
            _ => write_gradients(&run.out, shapes, shape, method.fma(), g),
        }
    }
}

/// Forward (keeping what the backward needs) and backward on the GPU, tensors stored as
/// `storage`.
fn run_gpu(
    method: &Method,
    (q, k, v, dout): (Tensor, Tensor, Tensor, Tensor),
    problem: &Problem,
    storage: Storage,
) -> CliResult<Gradients<f32>> {
    let (q, k, v) = (q.into_f32("Q")?, k.into_f32("K")?, v.into_f32("V")?);
    let dout = dout.into_f32("dO")?;
    let ctx = GpuContext::new()?;
    log::info!("adapter: {} ({:?})", ctx.info.name, ctx.info.backend);
    let attention = Attention::new(&ctx, method.clone())?.storage(storage)?;
    let (_, saved) = attention.train(problem, Host::new(&q, &k, &v))?;
    Ok(attention.backward(&saved, HostGrad(&dout))?)
}

fn write_error(path: &Path, e: WriteNpzError) -> CliError {
    let kind = match &e {
        WriteNpzError::Npy(ndarray_npy::WriteNpyError::Io(io)) => Some(io.kind()),
        _ => None,
    };
    CliError::Write {
        path: path.to_path_buf(),
        message: e.to_string(),
        kind,
    }
}

/// Writes `dq` with the shape of Q, `dk`, `dv` with the shape of K (grouped-query heads: each
/// K/V head's gradient sums its group of query heads), and for FMA (`cfg`) per level l
/// `k_w{l}`, `v_w{l}` (d, p, m 2^(l-1)) and `k_b{l}`, `v_b{l}` (d, p); with coarse queries also
/// `q_w{l}`, `q_b{l}`.
fn write_gradients<T: WritableElement + Clone>(
    path: &Path,
    (x_shape, kv_shape): (&[usize], &[usize]),
    shape: Shape,
    cfg: Option<&FmaConfig>,
    g: Gradients<T>,
) -> CliResult<()> {
    let file = File::create(path).map_err(|e| CliError::Write {
        path: path.to_path_buf(),
        message: e.to_string(),
        kind: Some(e.kind()),
    })?;
    let mut npz = NpzWriter::new(file);
    let mut add = |name: String, dims: &[usize], data: Vec<T>| -> CliResult<()> {
        let len = data.len();
        let arr = ArrayD::from_shape_vec(IxDyn(dims), data).map_err(|_| {
            CliError::Runtime(format!(
                "internal error: {len} values do not fill {name} of shape {}",
                fmt_shape(dims)
            ))
        })?;
        npz.add_array(name, &arr).map_err(|e| write_error(path, e))
    };
    add("dq".into(), x_shape, g.dq)?;
    add("dk".into(), kv_shape, g.dk)?;
    add("dv".into(), kv_shape, g.dv)?;
    if let Some(dsinks) = g.dsinks {
        let heads = dsinks.len();
        add("dsinks".into(), &[heads], dsinks)?;
    }
    let Some(cfg) = cfg else {
        return npz.finish().map_err(|e| write_error(path, e)).map(|_| ());
    };
    let (d, p) = (shape.head_dim, cfg.rank);
    for (i, lg) in g.weights.into_iter().flatten().enumerate() {
        let l = i + 1;
        // 2D weights (--grid, algorithm.md §9): (d, p, s_l, s_l).
        let s = window(cfg.block, l);
        let w = if cfg.grid.is_some() {
            vec![d, p, s, s]
        } else {
            vec![d, p, s]
        };
        add(format!("k_w{l}"), &w, lg.wk)?;
        add(format!("k_b{l}"), &[d, p], lg.bk)?;
        add(format!("v_w{l}"), &w, lg.wv)?;
        add(format!("v_b{l}"), &[d, p], lg.bv)?;
        // Fine queries do not use the query weights (their gradients would be zeros).
        if cfg.queries == Queries::Coarse {
            add(format!("q_w{l}"), &w, lg.wq)?;
            add(format!("q_b{l}"), &[d, p], lg.bq)?;
        }
    }
    npz.finish().map_err(|e| write_error(path, e))?;
    Ok(())
}
