//! The scheduler: (shape, config, adapter limits) -> the dispatches of a forward, a backward or
//! a split head, level by level. Pure arithmetic, unit-tested without a GPU. This layer imports
//! nothing from `gpu`: a plan names its passes by [`Pass`], and the engine (`gpu::engine`)
//! maps each to its WGSL and bindings.

mod backward;
mod backward_split;
mod decode;
mod dense;
mod dense_backward;
mod dense_tiled;
mod depth;
mod dispatch;
mod forward;
mod limits;
mod pass;
mod sequences;
mod split;
mod split_coarse;
mod split_dense;
mod varlen;
mod varlen_backward;

pub use backward::{
    coarse_rows_per_workgroup, combine_rounds, max_readers, reader_chunks, weight_chunks,
    BackwardPlan, BACKWARD_WG, COMBINE_FAN_IN, DKV_COARSE_CHUNK, WEIGHT_CHUNK_WINDOWS,
};
pub use backward_split::{BackwardChunk, BackwardSplitPlan};
pub use decode::{DecodeLayout, DecodeTuning, DenseCut, DenseSplit, DECODE_WG};
pub use dense::{DensePlan, DENSE_KEY_TILES_PER_DISPATCH, UNROLLED_D4};
pub use dense_backward::{DenseBackwardPlan, DENSE_BACKWARD_WG};
pub use dense_tiled::{
    dense_kernel_spec, tile_bytes, tiled_spec, tiled_threads, DenseKernel, TILED_LANES, TILED_ROWS,
};
pub use depth::{
    backward_depths, dense_depths, dispatch_depth, forward_depths, Depth, DepthModel, DispatchDepth,
};
pub(crate) use dispatch::dispatch;
pub use dispatch::{
    attention_spec, fold, Dispatch, COARSE_WG, DOWNSAMPLE_WG, MAX_HEAD_DIM, MAX_KEY_TILE, MERGE_WG,
    MIN_KEY_TILE,
};
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
/// with `backward` the backward's after them: what `multipole-attn plan` prints.
pub fn fma_depths(
    p: &crate::problem::Problem,
    cfg: &crate::config::FmaConfig,
    limits: &KernelLimits,
    backward: bool,
) -> crate::error::Result<Vec<DispatchDepth>> {
    let cfg = cfg.clone().causal(p.causal);
    let forward = match FmaPlan::new(p.shape, &cfg, limits) {
        Ok(forward) => forward,
        // One head over a binding: its chunks' dispatches (those of every head).
        Err(e) if exceeds_binding(&e) && head_exceeds_binding(p.shape, limits) => {
            return backward_split::split_head_depths(p.shape, &cfg, limits, backward)
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
