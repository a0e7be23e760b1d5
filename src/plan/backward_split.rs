//! The backward of one head too long for one storage binding (issue 27): the forward's
//! [`SplitPlan`] chunks (whole fine blocks, each bound with one block of halo on either side),
//! and per chunk the backward passes over its rows. Pure arithmetic, unit-tested without a GPU;
//! `gpu/fma/backward_split.rs` executes it.
//!
//! Per head, in this order (each step after the ones it reads):
//!
//! 1. the coarse K~, V~ (coarse queries: and Q~) recomputed as the split forward pools them
//!    ([`SplitPlan`]'s steps 1 and 2 without its coarse attention: level 1 per chunk, the
//!    higher levels once from the coarse rows);
//! 2. per chunk: D = rowsum(dO O) of its bound rows (halo included: the near-field dK/dV of
//!    its keys reads the halo's queries), dQ of its queries, dK and dV of its keys' near field;
//! 3. level by level, each level in groups of its coarse rows whose reader chunks' partial sums
//!    fit one binding after dK~'s rows ([`DkvRowGroup`], `backward_split_rows.rs`; the groups
//!    share the partial sums' space): per chunk, in chunk order, the group's coarse dK~/dV~
//!    summed over the readers in the chunk and added to the earlier chunks' sums
//!    (`backward_dkv_coarse.wgsl`), then the group's combine rounds of the reader chunks'
//!    partial sums (coarse queries instead: each chunk's
//!    level-1 coarse-query stats, then the passes over coarse rows alone once:
//!    [`CoarseQuerySteps`], `backward_split_coarse_q.rs`);
//! 4. per chunk: the downsampling's backward of its tokens (dK~, dV~ into dK, dV; coarse
//!    queries: dQ~ into dQ too).
//!
//! Every pass but the coarse dK~/dV~ one (of fine queries; with coarse queries that one too:
//! `backward_split_coarse_q.rs`) does per row the float operations of the unsplit backward in
//! the same order: dQ, the near-field dK, dV and D are its bits. A coarse row's
//! sum over a reader chunk (the unsplit plan's `DKV_COARSE_CHUNK` queries) is the unsplit sum
//! when the reader chunk's queries lie in one token chunk (the other chunks add +0); one that
//! straddles a chunk boundary is the sum of its two parts, added in chunk order: a regrouping
//! of the same terms, rounding only, and the same bits run to run.
//!
//! A 2D grid (algorithm.md §9) splits the same way, in the split forward's chunks of whole
//! rows of fine cells bound with one row of cells of halo above and below (`plan/split.rs`):
//! the passes find a chunk's cells from its tokens through the geometry interface
//! (`chunk_blocks`), a cell's 3 x 3 near field (its dQ's keys, its keys' dK/dV readers) lies
//! in the bound rows, and a coarse row's readers (cells of a far list, each cell's tokens in
//! raster order) are summed per token chunk as in 1D (`tests_backward_split_grid.rs` tests the plan).
//!
//! What stays refused, with a typed error: Learned pooling (its weights outgrow a binding
//! before a head does, as the forward's split), coarse queries on a 2D grid, coarse rows
//! that do not fit one binding ([`SplitPlan::coarse`]; a 2D head's always must) or leave no
//! room for one window's partial sums (coarse queries: a level's), softmax variants.

use super::backward::Work;
use super::backward_split_coarse_q::CoarseQuerySteps;
use super::backward_split_rows::{dkv_row_groups, restrict_to_chunks, DkvRowGroup};
use super::depth::{with_depth, DepthModel, DispatchDepth};
use super::limits::BINDING_BYTES;
use crate::config::{Downsample, FmaConfig, Queries};
use crate::error::{FmaError, Result};
use crate::plan::{dispatch, BackwardPlan, Dispatch, FmaKernel, KernelLimits, Pass, SplitPlan};
use crate::shape::Shape;

/// The dispatches of one head of `shape` split across bindings, with their depth: the split
/// forward's (its chunks' pooling, the shared levels, its chunks' attention), and with
/// `backward` the [`BackwardSplitPlan`]'s; every head runs the same list; the forward's fused
/// pass of shape `kernel`. `cfg` carries the
/// problem's mask. What `multipole-attn plan` prints for such a head.
pub(super) fn split_head_depths(
    shape: Shape,
    cfg: &FmaConfig,
    limits: &KernelLimits,
    (backward, kernel): (bool, FmaKernel),
) -> Result<Vec<DispatchDepth>> {
    let (n, d) = (shape.seq, shape.head_dim);
    let split = SplitPlan::with_kernel(n, d, cfg, limits, kernel)?;
    if split.coarse.is_some() {
        // Listed by their own compact bindings' steps (`CoarseSplit`), not here.
        return Err(FmaError::LimitExceeded {
            what: format!("the coarse rows of one head of {n} tokens of head_dim {d}"),
            requested: (split.head.levels.total_rows() * d) as u64 * 4,
            max: limits.binding_bytes(),
            unit: BINDING_BYTES,
            advice: "the plan lists a split head whose coarse rows fit one binding".into(),
        });
    }
    let model = DepthModel::new(&split.head, cfg);
    let mut steps: Vec<Dispatch> = split
        .chunks
        .iter()
        .flat_map(|c| c.downsample.iter().copied())
        .collect();
    steps.extend(split.shared_steps());
    steps.extend(
        split
            .chunks
            .iter()
            .flat_map(|c| std::iter::once(c.attention).chain(c.merge)),
    );
    if backward {
        steps.extend(BackwardSplitPlan::new(n, d, cfg, limits)?.dispatches());
    }
    Ok(steps.into_iter().map(|s| with_depth(&model, s)).collect())
}

/// The backward passes of one chunk of a split head.
#[derive(Clone, Debug)]
pub struct BackwardChunk {
    /// D of the chunk's bound rows (`row_base .. row_base + rows` of [`crate::plan::Chunk`]).
    pub delta: Dispatch,
    /// dQ of its queries' tiles (the forward's attention tiles of `lo..hi`).
    pub dq: Dispatch,
    /// Near-field dK, dV of its keys' tiles.
    pub dkv_fine: Dispatch,
    /// dK~, dV~ into dK, dV of its tokens `lo..hi` (coarse queries: and dQ~ into dQ).
    pub downsample_backward: Option<Dispatch>,
}

/// The backward of one head of `n` tokens split across storage bindings.
#[derive(Clone, Debug)]
pub struct BackwardSplitPlan {
    /// The forward's split: chunks, their bindings, the pooling steps of the coarse K~, V~.
    pub split: SplitPlan,
    /// The backward of one head, shape (1, 1, n, d), less the tensor-binding check: buffer
    /// offsets, the combine rounds, the specialisations.
    pub head: BackwardPlan,
    /// The backward passes of each chunk of `split.chunks`.
    pub chunks: Vec<BackwardChunk>,
    /// Fine queries: per level, its groups of coarse rows whose reader chunks' partial sums
    /// fit one binding, in order; each chunk runs a group's coarse dK~/dV~ over its readers
    /// (in chunk order), then the group's combine rounds run. Empty with coarse queries (the
    /// pass reads coarse rows alone: [`CoarseQuerySteps::shared`]).
    pub dkv_groups: Vec<Vec<DkvRowGroup>>,
    /// Coarse queries: their passes (per chunk level 1's stats, the rest once per head).
    pub coarse_queries: Option<CoarseQuerySteps>,
}

impl BackwardSplitPlan {
    /// Plans the backward of one head of `n` tokens of width `d`. Errors: what
    /// [`SplitPlan::new`] and [`BackwardPlan::new`] check besides the tensor sizes, and
    /// [`FmaError::LimitExceeded`] for a head over one binding whose configuration the split
    /// backward does not run (module header), saying which.
    pub fn new(n: usize, d: usize, cfg: &FmaConfig, limits: &KernelLimits) -> Result<Self> {
        let refuse = |value: &str| FmaError::LimitExceeded {
            what: format!(
                "the backward of one head of {n} tokens of head_dim {d} with {value}, over one \
                 storage binding"
            ),
            requested: (n * d) as u64 * 4,
            max: limits.binding_bytes(),
            unit: BINDING_BYTES,
            advice: "the backward splits one head along its sequence (1D with fine or coarse \
                     queries, or a 2D grid in rows of cells with fine queries) with Average \
                     downsampling and no softmax variant: use those, shorter sequences per head, \
                     or a device with larger storage bindings"
                .into(),
        };
        if cfg.queries == Queries::Coarse && cfg.grid.is_some() {
            return Err(refuse("coarse queries on a 2D grid"));
        }
        if let Downsample::Learned(_) = cfg.downsample {
            return Err(refuse("Learned downsampling"));
        }
        if !cfg.variants.is_plain() {
            return Err(refuse("a softmax variant (softcap, sinks or a window)"));
        }
        let split = SplitPlan::new(n, d, cfg, limits)?;
        if split.coarse.is_some() {
            return Err(FmaError::LimitExceeded {
                what: format!(
                    "the coarse rows of all levels of one head of {n} tokens of head_dim {d} \
                     (the split backward binds them whole)"
                ),
                requested: (split.head.levels.total_rows() * d) as u64 * 4,
                max: limits.binding_bytes(),
                unit: BINDING_BYTES,
                advice: "use a larger block size m or a smaller rank p (a head has about \
                         2 n p / m coarse rows)"
                    .into(),
            });
        }
        let forward = split.head.clone();
        let work = Work {
            fine_tiles: forward.query_blocks as u64 * forward.tiles_per_block as u64,
            level_windows: forward
                .levels
                .levels
                .iter()
                .map(|lv| lv.windows as u64)
                .collect(),
            kv_elements: (n * d) as u64,
            // The LSE and D are bound per chunk, as its Q and O.
            stats_rows: split
                .chunks
                .iter()
                .map(|c| c.rows as u64)
                .max()
                .unwrap_or(0),
            // Fine queries: each level's partial sums in groups of rows that fit a binding.
            group_partials: true,
        };
        // What is left over a binding is the head's coarse scratch (dK~, dV~ and one window's
        // reader chunks' partial sums; coarse queries: a level's), or at head_dim 1 a chunk's
        // LSE and D (8 bytes a row, its tensors 4): not a matter of heads.
        let head = BackwardPlan::build(forward, cfg, limits, work).map_err(|e| match e {
            FmaError::LimitExceeded {
                what,
                requested,
                max,
                unit,
                ..
            } => FmaError::LimitExceeded {
                what: format!("{what}, of one head of {n} tokens split across bindings"),
                requested,
                max,
                unit,
                advice: "a split head binds its coarse rows' gradients whole, with one group of \
                         their reader chunks' partial sums (coarse queries: a level's), and a \
                         chunk's LSE and D (8 bytes a row): use a larger block size m (cell side \
                         r), a smaller rank p, or head_dim >= 2"
                    .into(),
            },
            other => other,
        })?;
        let d4 = d.div_ceil(4) as u64;
        let coarse_q = cfg.queries == Queries::Coarse;
        let chunks = split
            .chunks
            .iter()
            .map(|c| {
                // Its fine blocks (2D: fine cells), as the forward's attention tiles them.
                let tiles = split.blocks(c) as u64 * head.forward.tiles_per_block as u64;
                let sized = |whole: &Dispatch, total: u64| {
                    dispatch(whole.pass, whole.level, total, whole.spec, limits)
                };
                let wg = u64::from(head.delta.spec.wg);
                Ok(BackwardChunk {
                    delta: sized(&head.delta, (c.rows as u64).div_ceil(wg))?,
                    dq: sized(&head.dq, tiles)?,
                    dkv_fine: sized(&head.dkv_fine, tiles)?,
                    downsample_backward: head
                        .downsample_backward
                        .as_ref()
                        .map(|whole| {
                            // K's and V's tokens, then (coarse queries) Q's, as the head's.
                            let wg = u64::from(whole.spec.wg);
                            let kv = ((c.hi - c.lo) as u64 * d4).div_ceil(wg);
                            sized(whole, if coarse_q { 2 * kv } else { kv })
                        })
                        .transpose()?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let coarse_queries = coarse_q
            .then(|| CoarseQuerySteps::new(&split, &head, limits))
            .transpose()?;
        let dkv_groups = if coarse_q {
            Vec::new()
        } else {
            let mut groups = dkv_row_groups(&head, limits)?;
            restrict_to_chunks(&mut groups, &head, &split.chunks, limits)?;
            groups
        };
        Ok(Self {
            split,
            head,
            chunks,
            dkv_groups,
            coarse_queries,
        })
    }

    /// The pooling of the levels above the token-reading ones, once per head:
    /// [`SplitPlan::shared_steps`] without the forward's coarse attention (coarse queries),
    /// which the backward does not read.
    pub fn shared_pool(&self) -> Vec<Dispatch> {
        let mut steps = self.split.shared_steps();
        steps.retain(|s| s.pass != Pass::CoarseAttention);
        steps
    }

    /// The plan with every dispatch composed for `storage` (issue 29), as
    /// [`BackwardPlan::with_storage`] (chunks and sizes do not change).
    pub fn with_storage(mut self, storage: crate::Storage) -> Self {
        self.split = self.split.with_storage(storage);
        self.head = self.head.with_storage(storage);
        for c in &mut self.chunks {
            let all = [&mut c.delta, &mut c.dq, &mut c.dkv_fine]
                .into_iter()
                .chain(c.downsample_backward.iter_mut());
            for d in all {
                d.spec.storage = storage;
            }
        }
        for g in self.dkv_groups.iter_mut().flatten() {
            let per_chunk = g.chunks.iter_mut().flatten().map(|c| &mut c.dkv_coarse);
            let all = std::iter::once(&mut g.dkv_coarse)
                .chain(per_chunk)
                .chain(g.combine.iter_mut());
            for d in all {
                d.spec.storage = storage;
            }
        }
        if let Some(cq) = &mut self.coarse_queries {
            for d in cq.first_level.iter_mut().chain(cq.shared.iter_mut()) {
                d.spec.storage = storage;
            }
        }
        self
    }

    /// Every dispatch of one head's backward in execution order (module header): what
    /// `plan --backward` lists for a split head.
    pub fn dispatches(&self) -> Vec<Dispatch> {
        let mut out = Vec::new();
        for c in &self.split.chunks {
            out.extend(c.downsample.iter().copied());
        }
        out.extend(self.shared_pool());
        for c in &self.chunks {
            out.extend([c.delta, c.dq, c.dkv_fine]);
        }
        if let Some(cq) = &self.coarse_queries {
            out.extend(&cq.first_level);
            out.extend(&cq.shared);
        } else {
            for g in self.dkv_groups.iter().flatten() {
                out.extend(g.chunks.iter().flatten().map(|c| c.dkv_coarse));
                out.extend(g.combine.iter().copied());
            }
        }
        for c in &self.chunks {
            out.extend(c.downsample_backward);
        }
        out
    }

    /// The passes of [`BackwardSplitPlan::dispatches`] (for the pipelines to build).
    pub fn passes(&self) -> Vec<Pass> {
        self.dispatches().iter().map(|d| d.pass).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::FmaConfig;

    fn cfg(m: usize, p: usize, causal: bool) -> FmaConfig {
        FmaConfig {
            block: m,
            rank: p,
            causal,
            ..FmaConfig::default()
        }
    }

    #[test]
    fn chunks_cover_the_head_and_size_their_passes() {
        // 1000 tokens of width 16 (64 KB per tensor) under a 16 KiB binding.
        let limits = KernelLimits::with_binding(16 << 10);
        for causal in [false, true] {
            let plan = BackwardSplitPlan::new(1000, 16, &cfg(32, 2, causal), &limits).unwrap();
            let chunks = &plan.split.chunks;
            assert!(chunks.len() > 1);
            assert_eq!(chunks.len(), plan.chunks.len());
            let mut next = 0;
            let mut tiles = 0;
            for (c, b) in chunks.iter().zip(&plan.chunks) {
                assert_eq!(c.lo, next);
                next = c.hi;
                assert!((c.rows * 16 * 4) as u64 <= limits.binding_bytes());
                assert_eq!(
                    b.delta.workgroups,
                    (c.rows as u32).div_ceil(b.delta.spec.wg)
                );
                assert_eq!(b.dq.workgroups, b.dkv_fine.workgroups);
                tiles += b.dq.workgroups;
            }
            assert_eq!(next, 1000);
            // The chunks' tiles are the head's.
            assert_eq!(tiles, plan.head.dq.workgroups);
            let passes = plan.passes();
            let count = |p: Pass| passes.iter().filter(|&&x| x == p).count();
            assert_eq!(count(Pass::BackwardDelta), chunks.len());
            assert_eq!(count(Pass::DownsampleBackward), chunks.len());
            let groups: usize = plan.dkv_groups.iter().map(Vec::len).sum();
            assert_eq!(count(Pass::BackwardDkvCoarse), chunks.len() * groups);
        }
    }

    #[test]
    fn the_plan_listing_shows_a_split_head_per_chunk() {
        // What `multipole-attn plan --backward` prints under a small binding: the chunks'
        // dispatches, not the binding error.
        let limits = KernelLimits::with_binding(16 << 10);
        let cfg = cfg(32, 2, true);
        let problem = crate::problem::Problem::new(Shape::new(1, 1, 1000, 16)).causal(true);
        assert!(crate::plan::FmaPlan::new(problem.shape, &cfg, &limits).is_err());
        let all = crate::plan::fma_depths(&problem, &cfg, &limits, true).unwrap();
        let chunks = BackwardSplitPlan::new(1000, 16, &cfg, &limits)
            .unwrap()
            .chunks
            .len();
        let count = |p: Pass| all.iter().filter(|d| d.dispatch.pass == p).count();
        assert!(chunks > 1);
        assert_eq!(count(Pass::FineAttention), chunks);
        assert_eq!(count(Pass::BackwardDelta), chunks);
        assert_eq!(count(Pass::BackwardDq), chunks);
        assert_eq!(count(Pass::DownsampleBackward), chunks);
        // Without the backward: the forward's list alone.
        let forward = crate::plan::fma_depths(&problem, &cfg, &limits, false).unwrap();
        assert!(forward
            .iter()
            .all(|d| d.dispatch.pass != Pass::BackwardDelta));
    }

    #[test]
    fn what_a_split_head_does_not_run_is_a_typed_error() {
        let limits = KernelLimits::with_binding(16 << 10);
        let sinks = FmaConfig {
            queries: Queries::Coarse,
            variants: crate::variants::Variants {
                sinks: Some(vec![0.5]),
                ..Default::default()
            },
            ..cfg(32, 2, false)
        };
        assert!(matches!(
            BackwardSplitPlan::new(1000, 16, &sinks, &limits),
            Err(FmaError::LimitExceeded { what, advice, .. })
                if what.contains("softmax variant") && advice.contains("coarse")
        ));
    }
}
