//! The coarse-query passes of the backward of one head too long for one storage binding
//! (issue 27; algorithm.md §8 with §6): what a [`BackwardSplitPlan`] of coarse queries runs
//! besides the passes every split head runs per chunk (D, dQ of the near field, dK/dV of the
//! near field, the downsampling's backward, which with coarse queries also adds dQ~ into dQ of
//! the chunk's tokens). Pure arithmetic, unit-tested without a GPU; `gpu/fma/backward_split.rs`
//! records it.
//!
//! Only one coarse-query pass reads tokens: `backward_coarse_stats` at level 1, which sums each
//! coarse-query row's tokens' dO, LSE and D into its (G, R, H). A window of level 1 is one fine
//! block and a chunk is whole fine blocks, so each chunk does the rows of its own windows from
//! its bound rows, and no row spans two chunks. Every other coarse-query pass reads coarse rows
//! alone (bound whole, as the split forward binds them): the higher levels' stats (from the
//! level below's rows), dQ~ of every level (`backward_coarse_dq`), and dK~/dV~ gathered over the
//! coarse-query rows that read them (`backward_dkv_coarse_q`, with its reader chunks' combine
//! rounds) run once per head, the unsplit plan's dispatches.
//!
//! So every pass does per row the float operations of the unsplit backward in the same order:
//! with one query head per K/V head the gradients are the unsplit bits (unlike fine queries,
//! whose coarse dK~/dV~ pass sums its readers chunk by chunk); a grouped-query K/V head's dK
//! and dV add its query heads' on the host in head order, a regrouping (rounding only).

use super::backward::BackwardPlan;
use super::split::SplitPlan;
use crate::error::Result;
use crate::plan::{dispatch, Dispatch, KernelLimits};

/// The coarse-query passes of a split head's backward (module header), in recording order:
/// after every chunk's D, dQ and near-field dK/dV, before the chunks' downsampling backward.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CoarseQuerySteps {
    /// Per chunk of the split, in chunk order: (G, R, H) of the level-1 coarse-query rows of
    /// its windows (`backward_coarse_stats` at level index 0 over its tokens `lo..hi`). Empty
    /// when the head has no coarse level.
    pub first_level: Vec<Dispatch>,
    /// Once per head, in order: `backward_coarse_stats` of the levels above the first,
    /// `backward_coarse_dq` of every level, and per level `backward_dkv_coarse_q` followed by its
    /// combine rounds: the unsplit plan's dispatches of one head.
    pub shared: Vec<Dispatch>,
}

impl CoarseQuerySteps {
    /// The coarse-query passes of `head` (the backward of one head, coarse queries) over the
    /// chunks of `split` (1D: a chunk's level-1 windows are `lo / w .. ceil(hi / w)`, as
    /// `chunk_groups` in `shaders/shared/geometry.wgsl` counts them).
    pub(super) fn new(
        split: &SplitPlan,
        head: &BackwardPlan,
        limits: &KernelLimits,
    ) -> Result<Self> {
        let (d, p) = (head.forward.shape.head_dim as u64, head.forward.levels.p);
        let first_level = match (
            head.coarse_stats.first(),
            head.forward.levels.levels.first(),
        ) {
            (Some(whole), Some(level)) => {
                let w = level.window;
                let wg = u64::from(whole.spec.wg);
                split
                    .chunks
                    .iter()
                    .map(|c| {
                        // The chunk's rows, each with its d channels of G and one (R, H) unit,
                        // as the whole level's dispatch counts them.
                        let rows = ((c.hi.div_ceil(w) - c.lo / w) * p) as u64;
                        let units = rows * (d + 1);
                        dispatch(
                            whole.pass,
                            whole.level,
                            units.div_ceil(wg),
                            whole.spec,
                            limits,
                        )
                    })
                    .collect::<Result<Vec<_>>>()?
            }
            _ => Vec::new(),
        };
        let mut shared: Vec<Dispatch> = head.coarse_stats.iter().skip(1).copied().collect();
        shared.extend(&head.coarse_dq);
        for (step, rounds) in head.dkv_coarse.iter().zip(&head.dkv_combine) {
            shared.push(*step);
            shared.extend(rounds);
        }
        Ok(Self {
            first_level,
            shared,
        })
    }
}

#[cfg(test)]
mod tests {
    use crate::config::{FmaConfig, Queries};
    use crate::plan::{BackwardPlan, BackwardSplitPlan, KernelLimits, Pass};
    use crate::shape::Shape;

    fn coarse(m: usize, p: usize) -> FmaConfig {
        FmaConfig::new(m, p).queries(Queries::Coarse)
    }

    #[test]
    fn each_chunk_does_its_level_one_rows_and_the_rest_runs_once() {
        // 1000 tokens of width 16 (64 KB per tensor) under a 16 KiB binding: chunks of 192
        // tokens; m = 32, p = 2: levels of windows 32 .. 256 (32, 16, 8, 4 windows).
        let limits = KernelLimits::with_binding(16 << 10);
        let (n, d) = (1000, 16);
        let plan = BackwardSplitPlan::new(n, d, &coarse(32, 2), &limits).unwrap();
        let cq = plan.coarse_queries.as_ref().expect("coarse-query steps");
        let chunks = &plan.split.chunks;
        assert!(chunks.len() > 1);
        assert_eq!(cq.first_level.len(), chunks.len());
        // The chunks' level-1 rows are the head's, each row once: (d + 1) units per row.
        let wg = u64::from(plan.head.coarse_stats[0].spec.wg);
        let mut rows = 0;
        for (c, step) in chunks.iter().zip(&cq.first_level) {
            assert_eq!(
                (step.pass, step.level),
                (Pass::BackwardCoarseStats, Some(0))
            );
            let own = (c.hi.div_ceil(32) - c.lo / 32) * 2;
            assert_eq!(step.workgroups as u64, (own as u64 * 17).div_ceil(wg));
            rows += own;
        }
        assert_eq!(rows, plan.head.forward.levels.levels[0].windows * 2);
        // The rest: the unsplit plan's coarse-query dispatches of one head, once, in its order.
        let roomy = KernelLimits::with_binding(128 << 20);
        let whole = BackwardPlan::new(Shape::new(1, 1, n, d), &coarse(32, 2), &roomy).unwrap();
        let unsplit: Vec<_> = whole
            .dispatches()
            .into_iter()
            .filter(|s| {
                matches!(
                    s.pass,
                    Pass::BackwardCoarseStats
                        | Pass::BackwardCoarseDq
                        | Pass::BackwardDkvCoarseQ
                        | Pass::BackwardDkvCombine
                ) && !(s.pass == Pass::BackwardCoarseStats && s.level == Some(0))
            })
            .collect();
        assert_eq!(cq.shared, unsplit);
        // Every chunk's passes: no coarse dK~/dV~ per chunk (it reads coarse rows alone), a
        // downsampling backward over K's, V's and Q's tokens of the chunk.
        let d4 = 4u64;
        assert!(plan.dkv_groups.is_empty());
        for (c, b) in chunks.iter().zip(&plan.chunks) {
            let tokens = (c.hi - c.lo) as u64 * d4;
            let unpool = b.downsample_backward.unwrap();
            assert_eq!(unpool.workgroups as u64, 2 * tokens.div_ceil(64));
        }
        // Recording order: the chunks' near field, the chunks' level-1 stats, the shared
        // steps, the chunks' downsampling backward; the forward's coarse attention is not run.
        let order: Vec<Pass> = plan.passes();
        let first = |p: Pass| order.iter().position(|&x| x == p).unwrap();
        let last = |p: Pass| order.iter().rposition(|&x| x == p).unwrap();
        assert!(!order.contains(&Pass::CoarseAttention));
        assert!(last(Pass::BackwardDkvFine) < first(Pass::BackwardCoarseStats));
        assert!(last(Pass::BackwardCoarseStats) < first(Pass::BackwardCoarseDq));
        assert!(last(Pass::BackwardCoarseDq) < first(Pass::BackwardDkvCoarseQ));
        assert!(last(Pass::BackwardDkvCoarseQ) < first(Pass::DownsampleBackward));
        let count = |p: Pass| order.iter().filter(|&&x| x == p).count();
        let levels = plan.head.forward.levels.count();
        assert_eq!(count(Pass::BackwardCoarseStats), chunks.len() + levels - 1);
        assert_eq!(count(Pass::BackwardCoarseDq), levels);
        assert_eq!(count(Pass::BackwardDkvCoarseQ), levels);
        assert_eq!(count(Pass::DownsampleBackward), chunks.len());
    }

    #[test]
    fn fine_queries_have_no_coarse_query_steps() {
        let limits = KernelLimits::with_binding(16 << 10);
        let plan = BackwardSplitPlan::new(1000, 16, &FmaConfig::new(32, 2), &limits).unwrap();
        assert!(plan.coarse_queries.is_none());
        assert_eq!(plan.dkv_groups.len(), plan.head.dkv_coarse.len());
    }

    #[test]
    fn the_plan_listing_shows_a_coarse_query_split_head() {
        // What `multipole-attn plan --backward --queries coarse` prints under a small binding.
        let limits = KernelLimits::with_binding(16 << 10);
        let cfg = coarse(32, 2);
        let problem = crate::problem::Problem::new(Shape::new(1, 1, 1000, 16));
        let all = crate::plan::fma_depths(&problem, &cfg, &limits, true).unwrap();
        let chunks = BackwardSplitPlan::new(1000, 16, &cfg, &limits)
            .unwrap()
            .chunks
            .len();
        let count = |p: Pass| all.iter().filter(|d| d.dispatch.pass == p).count();
        assert_eq!(count(Pass::UpsampleMerge), chunks);
        assert_eq!(count(Pass::BackwardDelta), chunks);
        assert_eq!(count(Pass::BackwardCoarseDq), 4);
        assert_eq!(count(Pass::BackwardCoarseStats), chunks + 3);
        // Level 1's stats read each row's m / p = 16 tokens twice (LSE, then dO or D).
        assert!(all
            .iter()
            .filter(|d| d.dispatch.pass == Pass::BackwardCoarseStats)
            .all(|d| d.serial_rows == if d.dispatch.level == Some(0) { 32 } else { 4 }));
    }
}
