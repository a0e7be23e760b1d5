//! `multipole-attn plan`: the dispatches a problem would run, with each one's work and depth
//! (`multipole_attn::plan::DispatchDepth`), without opening a GPU: for users who want to see
//! what will run, and for tests.

use crate::args::{parse_grid, DownsampleArg, QueriesArg};
use crate::error::CliResult;
use clap::Args;
use multipole_attn::plan::{
    dense_backward_depths, dense_depths, dense_split_depths, exceeds_binding, fma_depths_with,
    DenseBackwardPlan, DenseBackwardSplitPlan, DenseKernel, DensePlan, DenseSplitPlan,
    DispatchDepth, FmaKernel, KernelLimits,
};
use multipole_attn::{Downsample, FmaConfig, Grid, LearnedWeights, Problem, Queries, Shape};
use serde::Serialize;

/// Arguments of `multipole-attn plan`.
#[derive(Debug, Args)]
pub struct PlanArgs {
    /// Sequence length n.
    #[arg(long, value_name = "N")]
    pub n: usize,
    /// Head dimension d.
    #[arg(long, value_name = "D")]
    pub head_dim: usize,
    /// Fine block size m.
    #[arg(long, value_name = "M", default_value_t = 64)]
    pub block: usize,
    /// Coarse rank p.
    #[arg(long, value_name = "P", default_value_t = 2)]
    pub rank: usize,
    /// Heads per batch element.
    #[arg(long, value_name = "H", default_value_t = 1)]
    pub heads: usize,
    /// Batch size.
    #[arg(long, value_name = "B", default_value_t = 1)]
    pub batch: usize,
    /// Causal mask.
    #[arg(long)]
    pub causal: bool,
    /// Fine or coarse queries.
    #[arg(long, value_enum, value_name = "KIND", default_value = "fine")]
    pub queries: QueriesArg,
    /// Downsampling (learned: the box initialisation's shapes).
    #[arg(long, value_enum, value_name = "MODE", default_value = "average")]
    pub downsample: DownsampleArg,
    /// The tokens lie on an H x W grid in raster order (2D FMA, algorithm.md §9), as `run
    /// --grid`: n must be H*W, --block is the cell side r.
    #[arg(long, value_name = "H,W", value_parser = parse_grid)]
    pub grid: Option<Grid>,
    /// The forward's dispatches, then the backward's.
    #[arg(long)]
    pub backward: bool,
    /// Exact dense attention instead of FMA (the tiled kernel a GPU runs). A head over one
    /// binding: its (query chunk, key chunk) pairs, and with --backward those of one K/V head.
    #[arg(long, conflicts_with_all = ["queries", "downsample", "grid"])]
    pub dense: bool,
    /// Bytes per storage binding, in MiB [default: 2048, a discrete GPU's].
    #[arg(long, value_name = "MIB")]
    pub binding_mib: Option<u64>,
    /// Bytes of workgroup memory [default: 49152, a discrete GPU's].
    #[arg(long, value_name = "BYTES")]
    pub workgroup_storage: Option<u32>,
    /// Print `{"dispatches": [...]}` instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// One dispatch as `--json` prints it.
#[derive(Debug, Serialize)]
struct Row {
    pass: &'static str,
    /// The coarse level l >= 1 of a per-level dispatch.
    level: Option<u32>,
    workgroups: [u32; 3],
    invocations: u32,
    serial_rows: u64,
    rows: u64,
}

#[derive(Debug, Serialize)]
struct Document {
    dispatches: Vec<Row>,
}

/// The limits the plan is made under.
fn limits(a: &PlanArgs) -> KernelLimits {
    let mut l = KernelLimits::discrete_gpu();
    if let Some(mib) = a.binding_mib {
        l.max_binding = mib << 20;
        l.max_buffer = l.max_buffer.max(l.max_binding);
    }
    if let Some(bytes) = a.workgroup_storage {
        l.workgroup_storage = bytes;
    }
    l
}

/// The dispatches of the problem `a` describes, in recording order, with their depth.
pub fn dispatches(a: &PlanArgs) -> CliResult<Vec<DispatchDepth>> {
    let shape = Shape::new(a.batch, a.heads, a.n, a.head_dim);
    let limits = limits(a);
    if a.dense {
        return dense_dispatches(a, shape, &limits);
    }
    let mut cfg = FmaConfig::new(a.block, a.rank).grid(a.grid);
    if a.queries == QueriesArg::Coarse {
        cfg = cfg.queries(Queries::Coarse);
    }
    if a.downsample == DownsampleArg::Learned {
        let w = match a.grid {
            Some(grid) => LearnedWeights::box_init_grid_for(a.head_dim, a.block, a.rank, grid),
            None => LearnedWeights::box_init_for(a.head_dim, a.block, a.rank, a.n),
        };
        cfg = cfg.downsample(Downsample::Learned(w));
    }
    let problem = Problem::new(shape).causal(a.causal);
    // The fused pass's kernel a GPU runs (`FmaKernel::for_device`), as for dense attention.
    let kernel = FmaKernel::Tiled;
    Ok(fma_depths_with(
        &problem, &cfg, &limits, a.backward, kernel,
    )?)
}

/// Dense attention's dispatches: the forward's, then with `--backward` the backward's. Tensors
/// over one binding: those of one head, split into (query chunk, key chunk) pairs when the head
/// itself exceeds a binding (`DenseSplitPlan`, `DenseBackwardSplitPlan`), as the executor runs
/// them head by head.
fn dense_dispatches(
    a: &PlanArgs,
    shape: Shape,
    limits: &KernelLimits,
) -> CliResult<Vec<DispatchDepth>> {
    // The kernel a GPU runs (`DenseKernel::for_device`), as the default limits are a GPU's.
    let kernel = DenseKernel::Tiled;
    let mut all = match DensePlan::with_kernel(shape, limits, kernel) {
        Ok(plan) => dense_depths(&plan),
        Err(e) if exceeds_binding(&e) => {
            let split =
                DenseSplitPlan::with_kernel(a.n, a.head_dim, a.causal, limits, (None, kernel))?;
            dense_split_depths(&split)
        }
        Err(e) => return Err(e.into()),
    };
    if a.backward {
        match DenseBackwardPlan::new(shape, limits) {
            Ok(plan) => all.extend(dense_backward_depths(&plan)),
            Err(e) if exceeds_binding(&e) => {
                let split =
                    DenseBackwardSplitPlan::new((a.n, a.head_dim, 1), a.causal, limits, None)?;
                all.extend(split.depths());
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(all)
}

/// Runs the `plan` subcommand.
pub fn plan(a: &PlanArgs) -> CliResult<()> {
    let all = dispatches(a)?;
    let rows: Vec<Row> = all
        .iter()
        .map(|d| Row {
            pass: d.dispatch.pass.name(),
            level: d.dispatch.level.map(|l| l + 1),
            workgroups: d.dispatch.grid,
            invocations: d.invocations,
            serial_rows: d.serial_rows,
            rows: d.rows,
        })
        .collect();
    if a.json {
        let doc = Document { dispatches: rows };
        let text = serde_json::to_string_pretty(&doc)
            .map_err(|e| crate::error::CliError::Runtime(e.to_string()))?;
        outln!("{text}");
        return Ok(());
    }
    outln!(
        "{:<24} {:>5} {:>20} {:>11} {:>11} {:>14}",
        "pass",
        "level",
        "workgroups",
        "invocations",
        "serial_rows",
        "rows"
    );
    for r in &rows {
        let level = r.level.map_or("-".to_string(), |l| l.to_string());
        let [x, y, z] = r.workgroups;
        outln!(
            "{:<24} {:>5} {:>20} {:>11} {:>11} {:>14}",
            r.pass,
            level,
            format!("{x} x {y} x {z}"),
            r.invocations,
            r.serial_rows,
            r.rows
        );
    }
    let deepest = rows.iter().map(|r| r.serial_rows).max().unwrap_or(0);
    let total: u64 = rows.iter().map(|r| r.rows).sum();
    outln!(
        "{} dispatches; longest chain {deepest} rows; {total} rows read",
        rows.len()
    );
    Ok(())
}
