//! The scheduler: (shape, config, adapter limits) -> the dispatches of a forward, a backward or
//! a split head, level by level. Pure arithmetic, unit-tested without a GPU. This layer imports
//! nothing from `gpu`: a plan names its passes by [`Pass`], and the engine (`gpu::engine`)
//! maps each to its WGSL and bindings.

mod backward;
mod backward_split;
mod backward_split_coarse_q;
mod backward_split_rows;
mod decode;
mod dense;
mod dense_backward;
mod dense_backward_split;
mod dense_tiled;
mod depth;
mod dispatch;
mod fine_tiled;
mod forward;
mod limits;
mod pass;
mod sequences;
mod split;
mod split_coarse;
mod split_dense;
#[cfg(test)]
mod tests_backward_split_grid;
mod varlen;
mod varlen_backward;

pub use backward::{
    coarse_rows_per_workgroup, combine_rounds, max_readers, reader_chunks, weight_chunks,
    BackwardPlan, BACKWARD_WG, COMBINE_FAN_IN, DKV_COARSE_CHUNK, WEIGHT_CHUNK_WINDOWS,
};
pub use backward_split::{BackwardChunk, BackwardSplitPlan};
pub use backward_split_coarse_q::CoarseQuerySteps;
pub use backward_split_rows::{reader_windows, DkvChunkRows, DkvRowGroup};
pub use decode::{DecodeLayout, DecodeTuning, DenseCut, DenseSplit, DECODE_WG};
pub use dense::{DensePlan, DENSE_KEY_TILES_PER_DISPATCH, UNROLLED_D4};
pub use dense_backward::{DenseBackwardPlan, DENSE_BACKWARD_WG};
pub use dense_backward_split::{DenseBackwardSplitPlan, DenseBackwardStep};
pub use dense_tiled::{
    dense_kernel_spec, tile_bytes, tiled_spec, tiled_threads, DenseKernel, TILED_LANES, TILED_ROWS,
};
pub use depth::{
    backward_depths, dense_backward_depths, dense_delta, dense_depths, dense_split_depths,
    dispatch_depth, forward_depths, Depth, DepthModel, DispatchDepth,
};
pub(crate) use dispatch::dispatch;
pub use dispatch::{
    attention_spec, fold, Dispatch, COARSE_WG, DOWNSAMPLE_WG, MAX_HEAD_DIM, MAX_KEY_TILE, MERGE_WG,
    MIN_KEY_TILE,
};
pub use fine_tiled::{fine_kernel_spec, fine_tile_bytes, fine_tiled_spec, FmaKernel};
pub use forward::{FmaPlan, Workspace, POOL_TAPS};
pub use limits::{exceeds_binding, KernelLimits};
pub use pass::{Pass, SoftmaxFlags, Specialization};
pub use sequences::SeqTable;
pub use split::{fma_head_splits, head_exceeds_binding, Chunk, SplitPlan};
pub use split_coarse::{
    attend_rows_bound, attend_windows, blocks_per_chunk, head_coarse_exceeds_binding, CoarseSplit,
    CoarseStep, CoarseTensor, Slice,
};
pub use split_dense::{DensePair, DenseSplitPlan};

/// FMA's forward dispatches of the problem `p` (the mask from `p`) with the depth of each, and
/// with `backward` the backward's after them; the forward's fused pass the rows kernel
/// ([`FmaKernel::Rows`], a CPU adapter's): [`fma_depths_with`] of it.
pub fn fma_depths(
    p: &crate::problem::Problem,
    cfg: &crate::config::FmaConfig,
    limits: &KernelLimits,
    backward: bool,
) -> crate::error::Result<Vec<DispatchDepth>> {
    fma_depths_with(p, cfg, limits, backward, FmaKernel::Rows)
}

/// [`fma_depths`] with the forward's fused fine-query pass of shape `kernel` (the backward is
/// the same either way): what `multipole-attn plan` prints, with the tiled kernel a GPU runs.
pub fn fma_depths_with(
    p: &crate::problem::Problem,
    cfg: &crate::config::FmaConfig,
    limits: &KernelLimits,
    backward: bool,
    kernel: FmaKernel,
) -> crate::error::Result<Vec<DispatchDepth>> {
    let cfg = cfg.clone().causal(p.causal);
    let forward = match FmaPlan::with_kernel(p.shape, &cfg, limits, kernel) {
        Ok(forward) => forward,
        // One head over a binding: its chunks' dispatches (those of every head).
        Err(e) if exceeds_binding(&e) && head_exceeds_binding(p.shape, limits) => {
            let what = (backward, kernel);
            return backward_split::split_head_depths(p.shape, &cfg, limits, what)
                .map_err(|split| if exceeds_binding(&split) { e } else { split });
        }
        Err(e) => return Err(e),
    };
    let mut all = forward_depths(&forward, &cfg);
    if backward {
        let plan = BackwardPlan::new(p.shape, &cfg, limits)?;
        all.extend(backward_depths(&plan, &cfg));
    }
    Ok(all)
}
