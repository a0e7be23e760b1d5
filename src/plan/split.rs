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
//! On a 2D grid (algorithm.md §9, tokens in raster order) the rows are rows of fine cells, r W
//! tokens each (r grid rows of the W columns): a query's near field is the 3 x 3 fine cells
//! around its own, so it reaches one row of cells above and below, and the halo is r W tokens.
//! A chunk's cells are consecutive (row-major), `chunk_blocks` and `chunk_groups` of
//! `shaders/shared/geometry_grid.wgsl` find them from `lo..hi`, and a level-1 cell (one fine
//! cell) never spans two chunks. The coarse rows of a 2D head must fit one binding (a typed
//! error otherwise: there is no 2D `split_coarse`); coarse queries split as in 1D.
//!
//! Each pass does the same float operations in the same order as in an unsplit run, so the
//! result is the unsplit result to the bit (tested against a device with a larger limit).
//!
//! Learned downsampling cannot split a head: its weights hold d p w_l floats per level and
//! pooled tensor, about d p n over all levels, so they outgrow a binding before a head does.
//! A head of Learned FMA that fits is one chunk (the buffer API copies heads that way), or
//! several sharing its one binding of tokens when its coarse rows are split.

use super::fine_tiled::FmaKernel;
use super::forward::{pool_level, POOL_TAPS};
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
    /// m (2D: of r W, whole rows of fine cells); `hi` too, or n.
    pub lo: usize,
    /// One past its last token.
    pub hi: usize,
    /// First token of its bindings of Q, K, V, O and the LSE: `lo - m` (2D: `lo - r W`; 0 for
    /// the first, and for every chunk of [`SplitPlan::shared_tokens`]).
    pub row_base: usize,
    /// Tokens in those bindings: `row_base..min(hi + m, n)` (2D: `hi + r W`; `0..n` when
    /// shared).
    pub rows: usize,
    /// Downsample of the token-reading levels (indices 0..[`SplitPlan::token_levels`]) over
    /// the windows that hold tokens of this chunk, each followed by its combine rounds (Learned
    /// levels in tap chunks) (none when the coarse rows are split: then
    /// [`CoarseSplit::pool`] pools).
    pub downsample: Vec<Dispatch>,
    /// The fused attention of this chunk's fine blocks (2D: fine cells).
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
/// On a 2D grid (`cfg.grid`) the coarse rows are the grid's; a 2D head splits only its tokens
/// (`SplitPlan::new` says so when its coarse rows do not fit).
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

/// How a head is cut: chunks of whole rows of `unit()` tokens, each bound with one row of halo
/// on either side, since a query's near field reaches one such row before and after its own.
#[derive(Clone, Copy, Debug)]
struct Cut {
    /// The fine block m (2D: the fine cell side r).
    m: usize,
    /// 2D: the grid width W (tokens in raster order); `None` in 1D.
    cols: Option<usize>,
}

impl Cut {
    /// Tokens per row: a fine block, m (2D: a row of fine cells, r W).
    fn unit(self) -> usize {
        self.cols.map_or(self.m, |w| self.m * w)
    }

    /// The groups of side `w` (1D windows, 2D cells) holding tokens of `lo..hi`, for `lo` a
    /// multiple of `unit()`: as `chunk_groups` in `shaders/shared/geometry*.wgsl` counts them.
    fn groups(self, lo: usize, hi: usize, w: usize) -> usize {
        match self.cols {
            None => hi.div_ceil(w) - lo / w,
            Some(cols) => {
                let (y0, y1) = (lo / cols, hi.div_ceil(cols));
                (y1.div_ceil(w) - y0 / w) * cols.div_ceil(w)
            }
        }
    }
}

impl SplitPlan {
    /// Plans one head of `n` tokens of width `d` (2D: `n` = H W tokens of `cfg.grid`) in
    /// chunks whose bindings (chunk plus halo) each fit `limits`. A head that fits whole is one
    /// chunk. Errors: what [`FmaPlan::new`] checks besides the tensor sizes, and
    /// [`FmaError::LimitExceeded`] when not even one fine block with its two neighbours (3 m
    /// tokens; 2D: three rows of fine cells, 3 r W tokens) fits, or (coarse rows split) not even
    /// the coarse rows one block reads, or (2D) the coarse rows of the head exceed a binding.
    pub fn new(n: usize, d: usize, cfg: &FmaConfig, limits: &KernelLimits) -> Result<Self> {
        Self::with_kernel(n, d, cfg, limits, FmaKernel::Rows)
    }

    /// [`SplitPlan::new`] whose chunks run the fused fine-query pass of shape `kernel`
    /// ([`crate::plan::fine_kernel_spec`]); chunks and bindings are the same either way.
    pub fn with_kernel(
        n: usize,
        d: usize,
        cfg: &FmaConfig,
        limits: &KernelLimits,
        kernel: FmaKernel,
    ) -> Result<Self> {
        let shape = Shape::new(1, 1, n, d);
        // 2D: the coarse rows stay whole (checked below with a message of its own).
        let split_coarse =
            cfg.grid.is_none() && head_coarse_exceeds_binding(n, d, cfg.block, cfg.rank, limits);
        let head = FmaPlan::without_tensor_bindings(
            shape,
            cfg,
            limits,
            !split_coarse && cfg.grid.is_none(),
            kernel,
        )?;
        let m = head.levels.m;
        let cut = Cut {
            m,
            cols: head.grid.map(|g| g.w),
        };
        if let Some(grid) = head.grid {
            let coarse = (head.levels.total_rows() * d) as u64 * 4;
            if coarse > limits.binding_bytes() {
                return Err(FmaError::LimitExceeded {
                    what: format!(
                        "the coarse keys of all levels of one head of a {grid} grid of head_dim \
                         {d} (2D FMA)"
                    ),
                    requested: coarse,
                    max: limits.binding_bytes(),
                    unit: BINDING_BYTES,
                    advice: "a 2D head's coarse rows are not split across storage bindings \
                             (1D's split_coarse): use a larger cell side r or a smaller rank p \
                             (a head has about 4 n p / (3 r^2) coarse rows)"
                        .into(),
                });
            }
        }
        let unit = cut.unit();
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
            let need = 3 * unit as u64;
            if max_rows < need {
                let (what, advice) = match head.grid {
                    // m >= n is stored as m = n (levels.rs): then the block is the whole head.
                    None if m == n => (
                        format!(
                            "the block size m >= n makes the whole head of {n} tokens one block"
                        ),
                        "use a smaller block size m",
                    ),
                    None => (
                        format!("one fine block of m = {m} tokens"),
                        "use a smaller block size m",
                    ),
                    Some(grid) => (
                        format!(
                            "on a {grid} grid one row of fine cells of side r = {m} holds \
                             {unit} tokens"
                        ),
                        "use a smaller cell side r or a narrower grid",
                    ),
                };
                let unit_name = if head.grid.is_some() {
                    "row of fine cells"
                } else {
                    "fine block"
                };
                return Err(FmaError::LimitExceeded {
                    what: format!(
                        "a head split across storage bindings binds one {unit_name} and its two \
                         neighbours ({need} tokens of head_dim {d}), and {what}"
                    ),
                    requested: need * row_bytes,
                    max: limits.binding_bytes(),
                    unit: BINDING_BYTES,
                    advice: advice.into(),
                });
            }
            ((max_rows - 2 * unit as u64) / unit as u64) as usize * unit
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
                let hi = (lo + core).min(n);
                let mut c = Self::chunk(&head, token_levels, lo, hi, cut, limits)?;
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
        cut: Cut,
        limits: &KernelLimits,
    ) -> Result<Chunk> {
        let (n, d, p) = (head.shape.seq, head.shape.head_dim, head.levels.p);
        let unit = cut.unit();
        let row_base = lo.saturating_sub(unit);
        let pooled: u64 = if head.merge.is_some() { 3 } else { 2 };
        let mut downsample = Vec::new();
        for (i, (lv, whole)) in head.levels.levels[..token_levels]
            .iter()
            .zip(&head.downsample)
            .enumerate()
        {
            // Windows (cells) holding tokens of lo..hi, as `downsample.wgsl` derives them; in
            // the head's chunks of learned taps with the same combine rounds (the unsplit bits).
            let windows = cut.groups(lo, hi, lv.window);
            let chunks = whole.args[0].max(1) as u64;
            let pool = pool_level(
                i,
                (windows * p) as u64,
                (1, 1, pooled == 3),
                d as u64,
                (chunks > 1).then_some(chunks * POOL_TAPS as u64),
                whole.spec,
                limits,
            )?;
            downsample.push(pool.downsample);
            downsample.extend(pool.combine);
        }
        let attention = dispatch(
            head.attention.pass,
            None,
            cut.groups(lo, hi, cut.m) as u64 * head.tiles_per_block as u64,
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
            rows: (hi + unit).min(n) - row_base,
            downsample,
            attention,
            merge,
        })
    }

    /// The fine blocks (2D: fine cells) whose queries chunk `c` attends: as many as
    /// `chunk_blocks` of `shaders/shared/geometry*.wgsl` finds from its tokens `lo..hi`.
    pub fn blocks(&self, c: &Chunk) -> usize {
        let cut = Cut {
            m: self.head.levels.m,
            cols: self.head.grid.map(|g| g.w),
        };
        cut.groups(c.lo, c.hi, cut.m)
    }

    /// The plan with every dispatch composed for `storage` (issue 29), as
    /// [`FmaPlan::with_storage`]: chunks, sizes and copies do not change (the executor copies
    /// rows of `storage.bytes()` per element).
    pub fn with_storage(mut self, storage: crate::Storage) -> Self {
        self.head = self.head.with_storage(storage);
        let chunks = self.chunks.iter_mut().flat_map(|c| {
            c.downsample
                .iter_mut()
                .chain(std::iter::once(&mut c.attention))
                .chain(c.merge.iter_mut())
        });
        let coarse = self.coarse.iter_mut().flat_map(|c| {
            c.pool
                .iter_mut()
                .chain(c.attend.iter_mut())
                .flat_map(|s| s.dispatches.iter_mut())
        });
        for d in chunks.chain(coarse) {
            d.spec.storage = storage;
        }
        self
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
        // The head's own pooling: every level, with its combine rounds (taps 512 .. 2048 in
        // chunks of 256), as an unsplit run records it.
        assert_eq!(plan.chunks[0].downsample, plan.head.pool_steps());
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

    /// 2D: chunks of whole rows of fine cells (r W tokens) with one such row of halo on
    /// either side, the attention and level-1 downsample over exactly the chunk's cells, every
    /// binding within the limit and every dispatch dimension within 65535.
    #[test]
    fn a_grid_is_cut_into_whole_rows_of_fine_cells() {
        use crate::geometry::{Geometry, Grid, GridGeometry};
        // (H, W, d, r, p, queries, binding): 16 KiB splits the small grids into several
        // chunks (45 x 70 at r = 4, d = 4: one row of cells per chunk); the 2048 x 8192 grid
        // at 128 MiB has chunks of 126 976 cells, folded into two dimensions.
        for (h, w, d, r, p, queries, binding) in [
            (45, 70, 4, 4, 1, Queries::Fine, 16 << 10),
            (45, 70, 4, 4, 2, Queries::Coarse, 16 << 10),
            (33, 20, 16, 2, 1, Queries::Fine, 16 << 10),
            (33, 20, 8, 2, 2, Queries::Coarse, 16 << 10),
            (33, 20, 16, 4, 2, Queries::Fine, 16 << 10),
            (2048, 8192, 16, 4, 1, Queries::Fine, 128 << 20),
        ] {
            let (n, grid) = (h * w, Grid::new(h, w));
            let cfg = FmaConfig::new(r, p).grid(Some(grid)).queries(queries);
            let plan = SplitPlan::new(n, d, &cfg, &limits(binding)).unwrap();
            let unit = r * w;
            let max_rows = binding as usize / (d * 4);
            assert!(plan.chunks.len() > 1, "{grid} d={d}: not split");
            assert_eq!(plan.token_levels, 1);
            assert!(!plan.shared_tokens && plan.coarse.is_none());
            let geo = GridGeometry::new(grid, r, p);
            assert_eq!(plan.head.levels.total_rows(), geo.total_rows());
            let cell_cols = w.div_ceil(r);
            let mut next = 0;
            for c in &plan.chunks {
                assert_eq!(c.lo, next);
                assert_eq!(c.lo % unit, 0, "{grid}: chunk starts inside a row of cells");
                assert!(c.hi == n || c.hi % unit == 0);
                assert_eq!(c.row_base, c.lo.saturating_sub(unit));
                assert_eq!(c.row_base + c.rows, (c.hi + unit).min(n));
                assert!(
                    c.rows <= max_rows,
                    "{grid}: {} rows over the binding",
                    c.rows
                );
                // The chunk's fine cells, one workgroup (tile) each.
                let cells = (c.hi.div_ceil(w).div_ceil(r) - c.lo / w / r) * cell_cols;
                let tiles = cells * plan.head.tiles_per_block as usize;
                assert_eq!(c.attention.workgroups as usize, tiles);
                let pooled = if queries == Queries::Coarse { 3 } else { 2 };
                let ds = pooled * (cells * p * d).div_ceil(64);
                assert_eq!(c.downsample[0].workgroups as usize, ds);
                assert_eq!(c.merge.is_some(), queries == Queries::Coarse);
                for s in std::iter::once(&c.attention)
                    .chain(&c.downsample)
                    .chain(&c.merge)
                {
                    assert!(s.grid.iter().all(|&g| g <= 65535), "{s:?}");
                }
                next = c.hi;
            }
            assert_eq!(next, n);
            // Every fine cell is attended by exactly one chunk.
            let total: u32 = plan.chunks.iter().map(|c| c.attention.workgroups).sum();
            assert_eq!(total, plan.head.attention.workgroups);
        }
    }

    #[test]
    fn what_a_grid_cannot_split_is_a_typed_error() {
        use crate::geometry::Grid;
        let grid = Some(Grid::new(45, 70));
        // Three rows of cells of side 8 are 3 * 8 * 70 = 1680 tokens: 26.9 KB at d = 4.
        let cfg = FmaConfig::new(8, 1).grid(grid);
        match SplitPlan::new(45 * 70, 4, &cfg, &limits(16 << 10)) {
            Err(FmaError::LimitExceeded { requested, .. }) => {
                assert_eq!(requested, 1680 * 4 * 4)
            }
            other => panic!("expected LimitExceeded, got {other:?}"),
        }
        // Coarse rows over the binding: r = p = 2 on 45 x 70 has 2192 coarse rows of 32 B.
        let cfg = FmaConfig::new(2, 2).grid(grid);
        let e = SplitPlan::new(45 * 70, 8, &cfg, &limits(16 << 10)).unwrap_err();
        assert!(
            matches!(&e, FmaError::LimitExceeded { what, .. } if what.contains("coarse")),
            "{e}"
        );
        // Learned mode does not split a head (its weights outgrow the binding first here).
        let lw = LearnedWeights::box_init_grid_for(4, 4, 1, Grid::new(45, 70));
        let cfg = FmaConfig::new(4, 1)
            .grid(grid)
            .downsample(Downsample::Learned(lw));
        let plan = SplitPlan::new(45 * 70, 4, &cfg, &limits(1 << 20)).unwrap();
        assert_eq!(plan.chunks.len(), 1);
        let e = SplitPlan::new(45 * 70, 4, &cfg, &limits(16 << 10)).unwrap_err();
        assert!(
            matches!(&e, FmaError::LimitExceeded { what, .. } if what.contains("earned")),
            "{e}"
        );
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
