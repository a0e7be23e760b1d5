//! Splitting one head's sequence across storage bindings: the plan of a forward whose Q, K, V
//! or O for a single head is larger than one binding (128 MiB by default; 2^19 tokens at
//! head_dim 64). Pure arithmetic, unit-tested without a GPU; `gpu/fma/split.rs` executes it.
//!
//! The head's tokens are cut into chunks of whole fine blocks, each bound together with one
//! block of halo on either side (a fine block's near field reaches one block left and right):
//!
//! ```text
//! tokens     |-- chunk 0 --|-- chunk 1 --|-- chunk 2 --|
//! bound      [ chunk 0   +m]
//!                       [-m  chunk 1   +m]
//!                                     [-m  chunk 2  ]
//! ```
//!
//! When the coarse rows of all levels of the head fit one binding (at most 4 n p / m floats per
//! tensor, so a small fraction of the tokens for p << m) they stay whole there: the far field
//! of any chunk reads them all. Per head the dispatches then run in this order:
//!
//! 1. per chunk, the downsample of level 1, the only one that reads tokens in Average mode
//!    (higher levels pool the level below); a window of level 1 is one fine block, so it never
//!    spans two chunks;
//! 2. once, the levels pooled from coarse rows, and (coarse queries) each level's coarse
//!    attention: the same dispatches as an unsplit plan of one head;
//! 3. per chunk, the fused attention of its queries and (coarse queries) the upsample-merge.
//!
//! When they do not (a long head, or a small m), [`SplitPlan::coarse`] splits them too
//! (`split_coarse.rs`): each step binds compact copies of the rows it touches, the chunks
//! shrink until the rows their far lists read fit, and the head is bounded by device memory.
//! A head whose tokens fit one binding then binds them whole in every chunk
//! ([`SplitPlan::shared_tokens`]).
//!
//! Each pass does the same float operations in the same order as in an unsplit run, so the
//! result is the unsplit result to the bit (tested against a device with a larger limit).
//!
//! Learned downsampling cannot split a head: its weights hold d p w_l floats per level and
//! pooled tensor, about d p n over all levels, so they outgrow a binding before a head does.
//! A head of Learned FMA that fits is one chunk (the buffer API copies heads that way), or
//! several sharing its one binding of tokens when its coarse rows are split.

use super::limits::BINDING_BYTES;
use super::split_coarse::{
    blocks_per_chunk, capacity, head_coarse_exceeds_binding, CoarseSplit, Head,
};
use crate::config::{Downsample, FmaConfig};
use crate::error::{FmaError, Result};
use crate::plan::{dispatch, Dispatch, FmaPlan, KernelLimits, Pass};
use crate::shape::Shape;

/// One chunk of a split head.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Chunk {
    /// Its tokens: queries attended, tokens pooled and merged, `lo..hi`. `lo` is a multiple of
    /// m; `hi` too, or n.
    pub lo: usize,
    /// One past its last token.
    pub hi: usize,
    /// First token of its bindings of Q, K, V, O and the LSE: `lo - m` (0 for the first, and
    /// for every chunk of [`SplitPlan::shared_tokens`]).
    pub row_base: usize,
    /// Tokens in those bindings: `row_base..min(hi + m, n)` (`0..n` when shared).
    pub rows: usize,
    /// Downsample of the token-reading levels (indices 0..[`SplitPlan::token_levels`]) over
    /// the windows that hold tokens of this chunk (none when the coarse rows are split: then
    /// [`CoarseSplit::pool`] pools).
    pub downsample: Vec<Dispatch>,
    /// The fused attention of this chunk's fine blocks.
    pub attention: Dispatch,
    /// Coarse queries: the upsample-merge of this chunk's tokens.
    pub merge: Option<Dispatch>,
}

/// The plan of one head cut into chunks (see the module documentation).
#[derive(Clone, Debug)]
pub struct SplitPlan {
    /// The plan of one head, shape (1, 1, n, d), less the tensor-binding check: its levels,
    /// buffer sizes and the dispatches that read only coarse rows (step 2).
    pub head: FmaPlan,
    /// Levels whose downsample reads tokens and so runs per chunk: 1 (Average) or L (Learned,
    /// then with a single chunk); 0 when the coarse rows are split.
    pub token_levels: usize,
    /// The chunks, in token order.
    pub chunks: Vec<Chunk>,
    /// The head's tokens fit one binding, which every chunk binds whole (several chunks only
    /// when the coarse rows are split).
    pub shared_tokens: bool,
    /// The coarse rows of all levels exceed one binding: the steps that move them through
    /// compact bindings (then the chunks' downsample and [`SplitPlan::shared_steps`] are
    /// empty, and each chunk's attention is [`CoarseSplit::attend`]).
    pub coarse: Option<CoarseSplit>,
}

/// Whether a head of `shape` is too long for one storage binding, so a forward must split its
/// sequence ([`SplitPlan`]) rather than only run a few heads at a time.
pub fn head_exceeds_binding(shape: Shape, limits: &KernelLimits) -> bool {
    (shape.seq as u64) * (shape.head_dim as u64) * 4 > limits.binding_bytes()
}

/// Whether an FMA forward of `shape` with `cfg` must take the split path ([`SplitPlan`]): one
/// head's tokens, or the coarse rows of all its levels, exceed one storage binding.
/// On a 2D grid (`cfg.grid`), whose forward is never split, the coarse rows are the grid's
/// (`SplitPlan::new` then says what does not fit).
pub fn fma_head_splits(shape: Shape, cfg: &FmaConfig, limits: &KernelLimits) -> bool {
    if let Some(grid) = cfg.grid {
        let (r, p) = crate::geometry::effective_cell(grid, cfg.block.max(1), cfg.rank.max(1));
        // An invalid grid (the plan's typed error) is left to the plan.
        if grid.h.checked_mul(grid.w) != Some(shape.seq) || p == 0 || r % p != 0 {
            return false;
        }
        let rows =
            crate::geometry::Geometry::total_rows(&crate::geometry::GridGeometry::new(grid, r, p));
        return head_exceeds_binding(shape, limits)
            || rows as u64 * shape.head_dim as u64 * 4 > limits.binding_bytes();
    }
    head_exceeds_binding(shape, limits)
        || head_coarse_exceeds_binding(shape.seq, shape.head_dim, cfg.block, cfg.rank, limits)
}

impl SplitPlan {
    /// Plans one head of `n` tokens of width `d` in chunks whose bindings (chunk plus halo)
    /// each fit `limits`. A head that fits whole is one chunk. Errors: what
    /// [`FmaPlan::new`] checks besides the tensor sizes (the coarse rows of one head must fit a
    /// binding), and [`FmaError::LimitExceeded`] when not even one fine block with its two
    /// neighbours (3 m tokens) fits, or (coarse rows split) not even the coarse rows one
    /// block reads.
    pub fn new(n: usize, d: usize, cfg: &FmaConfig, limits: &KernelLimits) -> Result<Self> {
        if let Some(grid) = cfg.grid {
            return Err(FmaError::LimitExceeded {
                what: format!("one head of a {grid} grid of head_dim {d} (2D FMA)"),
                requested: n as u64 * d as u64 * 4,
                max: limits.binding_bytes(),
                unit: BINDING_BYTES,
                advice: "2D grids are not split across storage bindings yet: a head's Q, K, V \
                         and its coarse rows must each fit one binding; use a smaller grid or \
                         head_dim"
                    .into(),
            });
        }
        let shape = Shape::new(1, 1, n, d);
        let split_coarse = head_coarse_exceeds_binding(n, d, cfg.block, cfg.rank, limits);
        let head = FmaPlan::without_tensor_bindings(shape, cfg, limits, !split_coarse)?;
        let m = head.levels.m;
        let row_bytes = d as u64 * 4;
        let max_rows = limits.binding_bytes() / row_bytes;
        let shared_tokens = n as u64 <= max_rows;
        let mut core = if shared_tokens {
            n
        } else {
            if let Downsample::Learned(_) = cfg.downsample {
                return Err(FmaError::LimitExceeded {
                    what: format!("one head of {n} tokens of head_dim {d} (Learned mode)"),
                    requested: n as u64 * row_bytes,
                    max: limits.binding_bytes(),
                    unit: BINDING_BYTES,
                    advice: "only Average downsampling splits a head's sequence over bindings \
                             (Learned weights grow with n and outgrow a binding first): use \
                             Average mode or shorter heads"
                        .into(),
                });
            }
            let need = 3 * m as u64;
            if max_rows < need {
                // m >= n is stored as m = n (levels.rs): then the block is the whole head.
                let block = if m == n {
                    format!("the block size m >= n makes the whole head of {n} tokens one block")
                } else {
                    format!("one fine block of m = {m} tokens")
                };
                return Err(FmaError::LimitExceeded {
                    what: format!(
                        "a head split across storage bindings binds one fine block and its two \
                         neighbours ({need} tokens of head_dim {d}), and {block}"
                    ),
                    requested: need * row_bytes,
                    max: limits.binding_bytes(),
                    unit: BINDING_BYTES,
                    advice: "use a smaller block size m".into(),
                });
            }
            ((max_rows - 2 * m as u64) / m as u64) as usize * m
        };
        let cap = capacity(d, limits);
        let coarse_q = head.merge.is_some();
        if split_coarse {
            // Chunks whose far lists' rows fit one compact binding.
            let k = blocks_per_chunk(&head.levels, core.div_ceil(m), cap, coarse_q, d)?;
            core = core.min(k * m);
        }
        let token_levels = match (&cfg.downsample, split_coarse) {
            (_, true) => 0,
            (Downsample::Average, false) => head.levels.count().min(1),
            (Downsample::Learned(_), false) => head.levels.count(),
        };
        let chunks = (0..n)
            .step_by(core)
            .map(|lo| {
                let mut c = Self::chunk(&head, token_levels, lo, (lo + core).min(n), m, limits)?;
                if shared_tokens {
                    (c.row_base, c.rows) = (0, n);
                }
                Ok(c)
            })
            .collect::<Result<Vec<_>>>()?;
        let coarse = if split_coarse {
            let h = Head {
                plan: &head,
                downsample: &cfg.downsample,
                limits,
                capacity: cap,
            };
            let mut pool = Vec::new();
            // Average: level 1 from each chunk's tokens; Learned (shared tokens): every level
            // from the head's one binding.
            let first_level = match cfg.downsample {
                Downsample::Average => {
                    for (i, c) in chunks.iter().enumerate() {
                        pool.push(h.pool_tokens(0, c.lo / m..c.hi.div_ceil(m), i)?);
                    }
                    1
                }
                Downsample::Learned(_) => 0,
            };
            pool.extend(h.pool_steps(first_level)?);
            let attend: Vec<_> = chunks
                .iter()
                .enumerate()
                .map(|(i, c)| {
                    let steps = std::iter::once(c.attention).chain(c.merge).collect();
                    h.attend_step(i, c.lo, c.hi, steps)
                })
                .collect();
            h.check(&pool)?;
            h.check(&attend)?;
            Some(CoarseSplit {
                capacity: cap,
                pool,
                attend,
            })
        } else {
            None
        };
        Ok(Self {
            head,
            token_levels,
            chunks,
            shared_tokens,
            coarse,
        })
    }

    fn chunk(
        head: &FmaPlan,
        token_levels: usize,
        lo: usize,
        hi: usize,
        m: usize,
        limits: &KernelLimits,
    ) -> Result<Chunk> {
        let (n, d, p) = (head.shape.seq, head.shape.head_dim, head.levels.p);
        let row_base = lo.saturating_sub(m);
        let pooled: u64 = if head.merge.is_some() { 3 } else { 2 };
        let downsample = head.levels.levels[..token_levels]
            .iter()
            .zip(&head.downsample)
            .enumerate()
            .map(|(i, (lv, whole))| {
                // Windows holding tokens of lo..hi, as `downsample.wgsl` derives them.
                let windows = hi.div_ceil(lv.window) - lo / lv.window;
                let per_tensor = ((windows * p * d) as u64).div_ceil(whole.spec.wg as u64);
                dispatch(
                    whole.pass,
                    Some(i as u32),
                    pooled * per_tensor,
                    whole.spec,
                    limits,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        let attention = dispatch(
            head.attention.pass,
            None,
            (hi - lo).div_ceil(m) as u64 * head.tiles_per_block as u64,
            head.attention.spec,
            limits,
        )?;
        let merge = head
            .merge
            .map(|whole| {
                let total = ((hi - lo) as u64).div_ceil(whole.spec.wg as u64);
                dispatch(whole.pass, None, total, whole.spec, limits)
            })
            .transpose()?;
        Ok(Chunk {
            lo,
            hi,
            row_base,
            rows: (hi + m).min(n) - row_base,
            downsample,
            attention,
            merge,
        })
    }

    /// The steps of [`SplitPlan::head`] that run once per head (step 2 of the module
    /// documentation), in execution order.
    pub fn shared_steps(&self) -> Vec<Dispatch> {
        if self.coarse.is_some() {
            return Vec::new();
        }
        self.head
            .steps()
            .into_iter()
            .filter(|s| match s.pass {
                Pass::Downsample => s.level.is_some_and(|l| l as usize >= self.token_levels),
                Pass::CoarseAttention => true,
                _ => false,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Queries;
    use crate::plan::Pass;
    use crate::weights::LearnedWeights;

    fn limits(binding: u64) -> KernelLimits {
        KernelLimits::with_binding(binding)
    }

    #[test]
    fn chunks_tile_the_head_and_their_bindings_fit() {
        // 1025 tokens of width 16 (65.6 KB per tensor) under a 16 KiB binding: 256 rows per
        // binding, chunks of 192 tokens plus halos of 32.
        let (n, d, m) = (1025, 16, 32);
        for cfg in [FmaConfig::new(m, 2), FmaConfig::new(m, 1).causal(true)] {
            let plan = SplitPlan::new(n, d, &cfg, &limits(16 << 10)).unwrap();
            assert_eq!(plan.chunks.len(), n.div_ceil(192));
            let mut next = 0;
            for c in &plan.chunks {
                assert_eq!(c.lo, next);
                assert_eq!(c.lo % m, 0);
                assert_eq!(c.row_base, c.lo.saturating_sub(m));
                assert_eq!(c.row_base + c.rows, (c.hi + m).min(n));
                assert!((c.rows * d * 4) as u64 <= 16 << 10);
                assert_eq!(c.attention.workgroups as usize, (c.hi - c.lo).div_ceil(m));
                // Level 1 (windows of m): the chunk's own windows.
                let windows = c.hi.div_ceil(m) - c.lo / m;
                let per_tensor = (windows * cfg.rank * d).div_ceil(64);
                assert_eq!(c.downsample[0].workgroups as usize, 2 * per_tensor);
                next = c.hi;
            }
            assert_eq!(next, n);
            assert_eq!(plan.token_levels, 1);
        }
    }

    #[test]
    fn learned_mode_pools_every_level_of_a_head_that_fits_and_cannot_split_one() {
        let cfg = FmaConfig::new(16, 2).downsample(Downsample::Learned(
            LearnedWeights::box_init_for(8, 16, 2, 4096),
        ));
        let plan = SplitPlan::new(4096, 8, &cfg, &limits(1 << 20)).unwrap();
        assert_eq!(plan.token_levels, plan.head.levels.count());
        assert!(plan.shared_steps().is_empty());
        assert_eq!(plan.chunks.len(), 1);
        assert_eq!(plan.chunks[0].downsample.len(), plan.token_levels);
        let e = SplitPlan::new(4096, 8, &cfg, &limits(8 << 10)).unwrap_err();
        assert!(matches!(e, FmaError::LimitExceeded { .. }), "{e}");
    }

    #[test]
    fn coarse_queries_attend_once_and_merge_per_chunk() {
        let cfg = FmaConfig::new(64, 2).queries(Queries::Coarse);
        let plan = SplitPlan::new(4096, 8, &cfg, &limits(8 << 10)).unwrap();
        assert_eq!(plan.chunks.len(), 4096 / 128);
        let shared = plan.shared_steps();
        let levels = plan.head.levels.count();
        // Levels 2..L pooled from coarse rows, and every level's coarse attention.
        assert_eq!(shared.len(), (levels - 1) + levels);
        assert!(shared
            .iter()
            .all(|s| matches!(s.pass, Pass::Downsample | Pass::CoarseAttention)));
        assert!(plan.chunks.iter().all(|c| c.merge.is_some()));
    }

    #[test]
    fn a_head_that_fits_is_one_chunk() {
        let plan = SplitPlan::new(1000, 16, &FmaConfig::new(16, 2), &limits(1 << 20)).unwrap();
        assert_eq!(plan.chunks.len(), 1);
        assert_eq!((plan.chunks[0].lo, plan.chunks[0].hi), (0, 1000));
        assert_eq!((plan.chunks[0].row_base, plan.chunks[0].rows), (0, 1000));
    }

    #[test]
    fn too_small_a_binding_for_three_blocks_is_a_typed_error() {
        // 3 m = 192 rows of 64 floats = 48 KiB > 32 KiB.
        let e = SplitPlan::new(1000, 64, &FmaConfig::new(64, 2), &limits(32 << 10));
        match e {
            Err(FmaError::LimitExceeded { requested, max, .. }) => {
                assert_eq!(requested, 192 * 64 * 4);
                assert_eq!(max, 32 << 10);
            }
            other => panic!("expected LimitExceeded, got {other:?}"),
        }
    }
}
