//! The plan of one FMA forward, fine or coarse queries: (shape, config, adapter limits) -> the
//! dispatches per level. Pure arithmetic, unit-tested without a GPU; `gpu::fma` executes it.

use super::backward::combine_rounds;
use super::dispatch::{attention_spec, dispatch, Dispatch, COARSE_WG, DOWNSAMPLE_WG, MERGE_WG};
use super::fine_tiled::{fine_kernel_spec, FmaKernel};
use super::limits::KernelLimits;
use super::pass::{Pass, SoftmaxFlags, Specialization};
use crate::config::{Downsample, FmaConfig, Queries};
use crate::error::{FmaError, Result};
use crate::geometry::{effective_cell, Grid, GridGeometry};
use crate::levels::Levels;
use crate::shape::Shape;
use crate::storage::Storage;
use crate::variants::HeadSpan;

/// Checks the shape and that Q, K, V and O each fit one storage binding.
pub(crate) fn check_tensors(shape: Shape, limits: &KernelLimits) -> Result<()> {
    shape.validate()?;
    // Only `encode` (the caller's encoder, one recording) reaches these: the other entry points
    // split tensors over bindings themselves.
    let advice = "record fewer heads per encode call, or use forward_buffers, which splits \
                  tensors over bindings itself";
    limits.check_binding("a Q or O tensor", shape.elements() as u64 * 4, advice)?;
    limits.check_binding("a K or V tensor", shape.kv_elements() as u64 * 4, advice)
}

/// Taps of a learned kernel one invocation of `downsample` walks: a level of more (w_l > 256;
/// 2D s_l^2 > 256) walks them in chunks of this many, one invocation per (row, channel, chunk),
/// whose partial sums `downsample_combine` adds by [`combine_rounds`] (fan-in 16), so no
/// invocation's chain grows with n (w_l reaches n / 4 at the top level). Levels of at most one
/// chunk keep the single pass and its bits: no extra dispatch where the chain is short anyway
/// (every level up to w_l = 256, i.e. up to 3 levels at m = 64).
pub const POOL_TAPS: u32 = 256;

/// One level's pooling: its downsample dispatch and the combine rounds after it.
#[derive(Clone, Debug)]
pub(crate) struct PoolLevel {
    pub downsample: Dispatch,
    pub combine: Vec<Dispatch>,
    /// Partial-sum elements after K~'s (and V~'s) rows; 0 for one chunk.
    pub kv_partials: u64,
    /// The same after Q~'s rows.
    pub q_partials: u64,
}

/// Chunks of a level's learned taps (`taps`: w_l, 2D s_l^2, clipped at the longest sequence);
/// `None` (Average) is one.
pub(crate) fn pool_chunks(taps: Option<u64>) -> u64 {
    taps.map_or(1, |t| t.div_ceil(POOL_TAPS as u64).max(1))
}

/// The dispatches of level index `level`'s pooling over `rows` coarse rows per head of
/// `kv_heads` K/V heads (and, coarse queries, `heads` query heads) of head dimension `d`:
/// an invocation per (tensor, head, row, chunk of taps, channel) in workgroups of one tensor
/// (`shaders/shared/pool_units.wgsl`), then per combine round one per (tensor, head, row,
/// group, channel).
#[allow(clippy::too_many_arguments)]
pub(crate) fn pool_level(
    level: usize,
    rows: u64,
    (kv_heads, heads, coarse_q): (u64, u64, bool),
    d: u64,
    taps: Option<u64>,
    spec: Specialization,
    limits: &KernelLimits,
) -> Result<PoolLevel> {
    let chunks = pool_chunks(taps);
    let wg = spec.wg as u64;
    let workgroups = |per_row: u64| {
        let q = if coarse_q {
            (heads * rows * per_row).div_ceil(wg)
        } else {
            0
        };
        2 * (kv_heads * rows * per_row).div_ceil(wg) + q
    };
    let lvl = Some(level as u32);
    let mut downsample = dispatch(Pass::Downsample, lvl, workgroups(d * chunks), spec, limits)?;
    downsample.args = [chunks as u32, POOL_TAPS];
    let combine = combine_rounds(chunks)
        .into_iter()
        .map(|(stride, groups)| {
            let mut c = dispatch(
                Pass::DownsampleCombine,
                lvl,
                workgroups(d * groups),
                spec,
                limits,
            )?;
            c.args = [chunks as u32, stride as u32];
            Ok(c)
        })
        .collect::<Result<Vec<_>>>()?;
    let partials = |h: u64| if chunks > 1 { h * rows * chunks * d } else { 0 };
    Ok(PoolLevel {
        downsample,
        combine,
        kv_partials: partials(kv_heads),
        q_partials: if coarse_q { partials(heads) } else { 0 },
    })
}

/// Byte sizes of the buffers a forward needs besides Q, K, V and O.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Workspace {
    /// Rows of [K~_1; ...; K~_L] per head.
    pub coarse_rows: usize,
    /// Bytes of Q~ and of the coarse queries' partial outputs (coarse queries): (bh,
    /// coarse_rows, d) f32, one block per query head. Limits are checked on this size, the
    /// larger of the two.
    pub coarse_bytes: u64,
    /// Bytes of each of the coarse K~ and V~ buffers: (bh / group, coarse_rows, d) f32, one
    /// block per K/V head (grouped-query attention pools each K/V head once).
    pub coarse_kv_bytes: u64,
    /// Bytes of the coarse queries' partial LSEs, (bh, coarse_rows) f32 (0 with fine queries).
    pub coarse_lse_bytes: u64,
    /// Bytes of the LSE: (bh, n) f32.
    pub lse_bytes: u64,
    /// f32 elements of the Learned downsample pass's tap-chunk partial sums after K~'s (and
    /// after V~'s) rows: the largest level's of more than one chunk, 0 if none.
    pub pool_partials_kv: u64,
    /// The same after Q~'s rows (coarse queries).
    pub pool_partials_q: u64,
}

impl Workspace {
    /// Bytes of each of the K~ and V~ buffers: their rows, then the downsample pass's partial
    /// sums (from element `coarse_kv_bytes / 4`, `params.partials_at`).
    pub fn coarse_kv_buffer_bytes(&self) -> u64 {
        self.coarse_kv_bytes + self.pool_partials_kv * 4
    }

    /// Bytes of the Q~ buffer (coarse queries): its rows, then the partial sums (from element
    /// `coarse_bytes / 4`, `params.q_partials_at`).
    pub fn coarse_q_buffer_bytes(&self) -> u64 {
        self.coarse_bytes + self.pool_partials_q * 4
    }

    /// Device memory the library allocates for a forward on caller buffers besides Q, K, V, O:
    /// the coarse K~ and V~ (with coarse queries also Q~, the partial outputs and their LSEs)
    /// and the LSE; the uniforms add under 1 KiB.
    pub fn device_bytes(&self) -> u64 {
        let query_side = if self.coarse_lse_bytes > 0 { 2 } else { 0 };
        2 * self.coarse_kv_bytes
            + query_side * self.coarse_bytes
            + self.coarse_lse_bytes
            + self.lse_bytes
    }
}

/// The plan of one FMA forward, fine or coarse queries.
///
/// Fine queries: per level a downsample (K, V), then the fused attention pass.
/// Coarse queries (algorithm.md §6): per level a downsample (K, V and Q) and that level's
/// coarse attention, then the fused pass for the near field alone, then the upsample-merge.
/// [`FmaPlan::steps`] lists them in execution order; all go into one submit.
#[derive(Clone, Debug)]
pub struct FmaPlan {
    /// The problem's shape.
    pub shape: Shape,
    /// Fine or coarse queries.
    pub queries: Queries,
    /// Level geometry for (n, m, p); on a 2D grid (algorithm.md §9) the grid's levels as
    /// `GridGeometry::plan_levels` lays them out (cell sides and cell counts).
    pub levels: Levels,
    /// The 2D grid the tokens lie on (`FmaConfig::grid`), or `None` in 1D.
    pub grid: Option<Grid>,
    /// Query blocks (fine blocks; 2D: fine cells) per head (a variable-length batch: of its
    /// longest sequence): the fused pass's workgroups per head are this times
    /// `tiles_per_block`.
    pub query_blocks: usize,
    /// One downsample dispatch per coarse level (K and V, and Q with coarse queries), in level
    /// order.
    pub downsample: Vec<Dispatch>,
    /// Per level, the rounds that add its downsample's tap-chunk partial sums (Learned mode,
    /// levels of more than [`POOL_TAPS`] taps; empty otherwise).
    pub downsample_combine: Vec<Vec<Dispatch>>,
    /// Coarse queries: one coarse attention dispatch per level (empty with fine queries).
    pub coarse_attention: Vec<Dispatch>,
    /// The fused attention dispatch: every level (fine queries) or the near field only.
    pub attention: Dispatch,
    /// Coarse queries: the upsample-merge dispatch, last (None with fine queries).
    pub merge: Option<Dispatch>,
    /// A padded variable-length batch: the fill of its padding rows (O = 0, LSE = -inf), last.
    pub pad: Option<Dispatch>,
    /// Query tiles per fine block: ceil(m / WG).
    pub tiles_per_block: u32,
    /// Buffer sizes.
    pub workspace: Workspace,
    /// A variable-length batch's sequence table ([`FmaPlan::for_sequences`]); `None` for a
    /// batch of equal sequences.
    pub sequences: Option<super::sequences::SeqTable>,
    /// Which of the caller's query heads the problems are (a run of heads: its sinks'
    /// heads); [`HeadSpan::whole`] of `shape` unless [`FmaPlan::in_span`] says otherwise.
    pub head_span: HeadSpan,
}

impl FmaPlan {
    /// The plan of a run of the caller's heads: problem qh is the caller's head
    /// `(span.first + qh) mod span.heads` (its sink); nothing else changes.
    pub fn in_span(mut self, span: HeadSpan) -> Self {
        self.head_span = span;
        self
    }

    /// Plans FMA for `shape` and `cfg` under `limits`; every limit is checked here, before
    /// anything is recorded.
    pub fn new(shape: Shape, cfg: &FmaConfig, limits: &KernelLimits) -> Result<Self> {
        Self::with_kernel(shape, cfg, limits, FmaKernel::Rows)
    }

    /// [`FmaPlan::new`] with the fused fine-query pass of shape `kernel`
    /// ([`crate::plan::fine_kernel_spec`]): the other steps are the same either way.
    pub fn with_kernel(
        shape: Shape,
        cfg: &FmaConfig,
        limits: &KernelLimits,
        kernel: FmaKernel,
    ) -> Result<Self> {
        check_tensors(shape, limits)?;
        Self::without_tensor_bindings(shape, cfg, limits, true, kernel)
    }

    /// [`FmaPlan::new`] less the check that Q, K, V and O each fit one storage binding: the
    /// plan of a head whose sequence `crate::plan::SplitPlan` cuts into chunks that do; with
    /// `coarse_in_one_binding` false also less the check that the coarse rows of all levels
    /// do (a head whose coarse rows `crate::plan::CoarseSplit` splits).
    pub(crate) fn without_tensor_bindings(
        shape: Shape,
        cfg: &FmaConfig,
        limits: &KernelLimits,
        coarse_in_one_binding: bool,
        kernel: FmaKernel,
    ) -> Result<Self> {
        shape.validate()?;
        shape.check_self_attention()?;
        cfg.validate(shape.head_dim, shape.seq)?;
        let (n, d) = (shape.seq, shape.head_dim);
        // The index maps' (m, p): a block of at least n is the block of n (levels.rs,
        // `effective_block`; 2D `effective_cell`), so no size below grows with a larger m.
        let (levels, query_blocks, block_queries) = match cfg.grid {
            None => {
                let mut levels = Levels::new(n, cfg.block, cfg.rank);
                // A window is FMA's near field alone (docs/variants.md): no coarse level, so
                // no downsampling, no far field and no coarse gradient is planned.
                if cfg.variants.window.is_some() {
                    levels.levels.clear();
                }
                let blocks = levels.fine_blocks();
                let m = levels.m;
                (levels, blocks, m)
            }
            Some(grid) => {
                let (r, p) = effective_cell(grid, cfg.block, cfg.rank);
                let geometry = GridGeometry::new(grid, r, p);
                let (rows, cols) = geometry.cells(0);
                (
                    geometry.plan_levels(),
                    rows * cols,
                    geometry.block_queries(),
                )
            }
        };
        let (m, p) = (levels.m, levels.p);
        // Taps of level l's learned kernel: w_l (2D: s_l^2).
        let taps = |window: usize| {
            if cfg.grid.is_some() {
                window * window
            } else {
                window
            }
        };
        let grid = cfg.grid.is_some();
        if m > u32::MAX as usize / 4 {
            return Err(FmaError::InvalidConfig {
                what: "block size m",
                value: m.to_string(),
                allowed: format!(
                    "m < 2^30 when it is below the sequence length n = {n} (the shaders index \
                     tokens in u32: use a smaller m, or m >= n for exact attention)"
                ),
            });
        }
        let bh = shape.batch_heads();
        let kv_bh = shape.kv_batch_heads();
        let coarse_rows = levels.total_rows();
        // K~ and V~ per K/V head; Q~ and the coarse queries' partial outputs per query head.
        let coarse_bytes = (bh * coarse_rows * d) as u64 * 4;
        let coarse_kv_bytes = (kv_bh * coarse_rows * d) as u64 * 4;
        if coarse_in_one_binding {
            limits.check_binding(
                "the coarse keys of all levels",
                coarse_bytes,
                "use a larger block size m or a smaller rank p (a head has about 2 n p / m \
                 coarse rows), or fewer heads per call",
            )?;
        }
        let coarse_q = cfg.queries == Queries::Coarse;
        // Tensors the downsample pass pools: K, V (and Q).
        let pooled: u64 = if coarse_q { 3 } else { 2 };
        if let Downsample::Learned(_) = &cfg.downsample {
            let per_level: usize = levels.levels.iter().map(|l| d * p * taps(l.window)).sum();
            limits.check_binding(
                "the learned weights of every level and tensor",
                pooled * per_level as u64 * 4,
                "Learned weights hold d p w_l floats per level, about 2 d p n in all: use \
                 Average downsampling, a smaller rank p, or shorter sequences",
            )?;
        }

        // The near field's runs of consecutive keys: 1D a third of 3 blocks, 2D a row of 3
        // cells (the tiled pass's key tile need not be longer).
        let run_keys = if grid { 3 * m } else { m };
        let (pass, spec) = fine_kernel_spec(kernel, d, block_queries, run_keys, limits)?;
        let spec = Specialization {
            grid,
            softmax: SoftmaxFlags::of(&cfg.variants),
            storage: Storage::F32,
            ..spec
        };
        let tiles_per_block = (block_queries as u32).div_ceil(spec.wg);
        let attention = dispatch(
            pass,
            None,
            (bh as u64) * query_blocks as u64 * tiles_per_block as u64,
            spec,
            limits,
        )?;

        let ds_spec = Specialization {
            wg: DOWNSAMPLE_WG.min(limits.max_workgroup),
            bk: 1,
            d4: 1,
            grid,
            softmax: SoftmaxFlags::PLAIN,
            storage: Storage::F32,
        };
        let learned = matches!(cfg.downsample, Downsample::Learned(_));
        let pools = levels
            .levels
            .iter()
            .enumerate()
            .map(|(i, lv)| {
                let taps = learned.then(|| taps(lv.window).min(n) as u64);
                pool_level(
                    i,
                    lv.rows(p) as u64,
                    (kv_bh as u64, bh as u64, coarse_q),
                    d as u64,
                    taps,
                    ds_spec,
                    limits,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        let pool_partials_kv = pools.iter().map(|l| l.kv_partials).max().unwrap_or(0);
        let pool_partials_q = pools.iter().map(|l| l.q_partials).max().unwrap_or(0);
        if coarse_in_one_binding {
            let advice = "use a larger block size m, a smaller rank p, or fewer heads per call";
            limits.check_binding(
                "the coarse keys with the downsampling's partial sums",
                coarse_kv_bytes + pool_partials_kv * 4,
                advice,
            )?;
            limits.check_binding(
                "the coarse queries with the downsampling's partial sums",
                coarse_bytes + pool_partials_q * 4,
                advice,
            )?;
        }
        let downsample = pools.iter().map(|l| l.downsample).collect();
        let downsample_combine = pools.into_iter().map(|l| l.combine).collect();

        let (coarse_attention, merge) = if coarse_q {
            // One invocation per coarse query, COARSE_WG per workgroup (its keys are read
            // directly, no tile: `coarse_attention.wgsl` says why).
            let c_spec = Specialization {
                wg: COARSE_WG.min(limits.max_workgroup),
                bk: 1,
                d4: attention_spec(d, 1, limits)?.d4,
                grid,
                softmax: SoftmaxFlags::PLAIN,
                storage: Storage::F32,
            };
            let coarse = levels
                .levels
                .iter()
                .enumerate()
                .map(|(i, lv)| {
                    let total = ((bh * lv.rows(p)) as u64).div_ceil(c_spec.wg as u64);
                    dispatch(Pass::CoarseAttention, Some(i as u32), total, c_spec, limits)
                })
                .collect::<Result<Vec<_>>>()?;
            let m_spec = Specialization {
                wg: MERGE_WG.min(limits.max_workgroup),
                bk: 1,
                d4: 1,
                grid,
                softmax: SoftmaxFlags::PLAIN,
                storage: Storage::F32,
            };
            let total = (shape.rows() as u64).div_ceil(m_spec.wg as u64);
            let merge = dispatch(Pass::UpsampleMerge, None, total, m_spec, limits)?;
            (coarse, Some(merge))
        } else {
            (Vec::new(), None)
        };

        Ok(Self {
            shape,
            head_span: HeadSpan::whole(shape),
            queries: cfg.queries,
            levels,
            grid: cfg.grid,
            query_blocks,
            downsample,
            downsample_combine,
            coarse_attention,
            attention,
            merge,
            pad: None,
            tiles_per_block,
            workspace: Workspace {
                coarse_rows,
                coarse_bytes,
                coarse_kv_bytes,
                coarse_lse_bytes: if coarse_q {
                    (bh * coarse_rows) as u64 * 4
                } else {
                    0
                },
                lse_bytes: shape.rows() as u64 * 4,
                pool_partials_kv,
                pool_partials_q,
            },
            sequences: None,
        })
    }

    /// The pooling of every level in execution order: level by level the downsample and its
    /// combine rounds (the backward recomputes K~, V~ (Q~) with them).
    pub fn pool_steps(&self) -> Vec<Dispatch> {
        let mut steps = Vec::new();
        for (i, ds) in self.downsample.iter().enumerate() {
            steps.push(*ds);
            steps.extend(self.downsample_combine.get(i).into_iter().flatten());
        }
        steps
    }

    /// The plan with its passes composed for `storage` (issue 29): every step, so the passes
    /// that bind Q, K, V or O load and store them as that type (the others compose the same
    /// text either way). Dispatches and sizes do not change: the binding checks count 4 bytes
    /// per element, which f16 tensors undercut.
    pub fn with_storage(mut self, storage: crate::Storage) -> Self {
        let all = self
            .downsample
            .iter_mut()
            .chain(self.downsample_combine.iter_mut().flatten())
            .chain(self.coarse_attention.iter_mut())
            .chain(std::iter::once(&mut self.attention))
            .chain(self.merge.iter_mut())
            .chain(self.pad.iter_mut());
        for d in all {
            d.spec.storage = storage;
        }
        self
    }

    /// Every dispatch in execution order: level by level the downsample (and, coarse queries,
    /// that level's coarse attention), then the fused attention, then (coarse) the merge.
    pub fn steps(&self) -> Vec<Dispatch> {
        let mut steps = Vec::with_capacity(2 * self.downsample.len() + 2);
        for (i, ds) in self.downsample.iter().enumerate() {
            steps.push(*ds);
            steps.extend(self.downsample_combine.get(i).into_iter().flatten());
            steps.extend(self.coarse_attention.get(i).copied());
        }
        steps.push(self.attention);
        steps.extend(self.merge);
        steps.extend(self.pad);
        steps
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::{fold, DensePlan};

    #[test]
    fn one_downsample_dispatch_per_level_then_attention() {
        let plan = FmaPlan::new(
            Shape::new(1, 4, 4096, 64),
            &FmaConfig::new(64, 2),
            &KernelLimits::lavapipe(),
        )
        .unwrap();
        assert_eq!(plan.levels.count(), 5);
        assert_eq!(plan.downsample.len(), 5);
        for (i, d) in plan.downsample.iter().enumerate() {
            assert_eq!(d.level, Some(i as u32));
            // (bh * windows * p * d) threads per tensor (K and V) in workgroups of 64.
            let threads = 4 * plan.levels.levels[i].windows * 2 * 64;
            assert_eq!(d.workgroups as usize, 2 * threads.div_ceil(64));
        }
        assert_eq!(plan.attention.workgroups, 4 * 64);
        assert_eq!(plan.attention.spec.wg, 64);
        // algorithm.md §11: coarse storage <= 4 n p d / m floats per head.
        assert!(plan.workspace.coarse_rows * 64 <= 4 * 4096 * 2 * 64 / 64);
    }

    #[test]
    fn a_grid_plans_one_workgroup_per_cell_and_its_levels() {
        // 45 x 70 tokens, cells 8 x 8: 6 x 9 fine cells of up to 64 queries; L = 3 (ceil(70 /
        // 64) = 2), levels of 6 x 9, 3 x 5 and 2 x 3 cells.
        let grid = Grid::new(45, 70);
        let cfg = FmaConfig::new(8, 2).grid(Some(grid));
        let plan = FmaPlan::new(
            Shape::new(1, 3, 45 * 70, 16),
            &cfg,
            &KernelLimits::lavapipe(),
        )
        .unwrap();
        assert_eq!((plan.query_blocks, plan.tiles_per_block), (54, 1));
        assert_eq!(plan.attention.workgroups, 3 * 54);
        assert!(plan.attention.spec.grid && plan.downsample.iter().all(|d| d.spec.grid));
        assert_eq!(plan.attention.spec.wg, 64);
        let cells: Vec<usize> = plan.levels.levels.iter().map(|l| l.windows).collect();
        assert_eq!(cells, vec![54, 15, 6]);
        assert_eq!(plan.workspace.coarse_rows, (54 + 15 + 6) * 2);
        // A cell of at least the grid is the grid's longer side, with p = 1 and no level.
        let whole = FmaConfig::new(1 << 20, 4).grid(Some(grid));
        let plan = FmaPlan::new(
            Shape::new(1, 1, 45 * 70, 16),
            &whole,
            &KernelLimits::lavapipe(),
        )
        .unwrap();
        assert_eq!(
            (plan.levels.m, plan.levels.p, plan.levels.count()),
            (70, 1, 0)
        );
        assert_eq!((plan.query_blocks, plan.tiles_per_block), (1, 13));
    }

    #[test]
    fn coarse_queries_chain_pool_and_attend_level_by_level_then_near_field_then_merge() {
        let shape = Shape::new(1, 4, 4096, 64);
        let cfg = FmaConfig::new(64, 2).queries(Queries::Coarse);
        let plan = FmaPlan::new(shape, &cfg, &KernelLimits::lavapipe()).unwrap();
        let fine = FmaPlan::new(shape, &FmaConfig::new(64, 2), &KernelLimits::lavapipe()).unwrap();
        assert!(fine.coarse_attention.is_empty() && fine.merge.is_none());
        assert_eq!(fine.steps().len(), 6);
        let steps = plan.steps();
        assert_eq!(steps.len(), 2 * 5 + 2);
        for l in 0..5 {
            let (ds, ca) = (steps[2 * l], steps[2 * l + 1]);
            assert_eq!((ds.pass, ds.level), (Pass::Downsample, Some(l as u32)));
            assert_eq!((ca.pass, ca.level), (Pass::CoarseAttention, Some(l as u32)));
            // K, V and Q pooled: 3/2 of the fine plan's workgroups (K and V).
            assert_eq!(2 * ds.workgroups, 3 * fine.downsample[l].workgroups);
            // One invocation per coarse query (4 heads x windows x p = 2), 64 per workgroup.
            let queries = 4 * plan.levels.levels[l].windows * 2;
            assert_eq!(ca.workgroups as usize, queries.div_ceil(64));
            assert_eq!((ca.spec.wg, ca.spec.d4), (64, 16));
        }
        assert_eq!(steps[10].pass, Pass::FineAttention);
        assert_eq!(steps[10], fine.attention);
        assert_eq!(steps[11].pass, Pass::UpsampleMerge);
        assert_eq!(steps[11].workgroups, 4 * 4096 / MERGE_WG);
        assert_eq!(
            plan.workspace.coarse_lse_bytes,
            4 * plan.workspace.coarse_rows as u64 * 4
        );
        // Coarse work per level shrinks with the window: O(n) in total.
        let total: u32 = plan.coarse_attention.iter().map(|d| d.workgroups).sum();
        assert!(total < 2 * 4 * 4096 / 64);
    }

    #[test]
    fn learned_levels_of_many_taps_pool_in_chunks_added_by_a_tree() {
        // n = 65536, m = 64, p = 2: windows 64 .. 16384; levels of at most 256 taps pool in
        // one pass, the others in chunks of 256 taps (up to 64 at w = 16384: two rounds).
        let n = 65536;
        let w = crate::weights::LearnedWeights::box_init_for(4, 64, 2, n);
        let cfg = FmaConfig::new(64, 2)
            .queries(Queries::Coarse)
            .downsample(Downsample::Learned(w));
        let shape = Shape::new(1, 2, n, 4);
        let plan = FmaPlan::new(shape, &cfg, &KernelLimits::discrete_gpu()).unwrap();
        let mut most = (0, 0);
        for (i, lv) in plan.levels.levels.iter().enumerate() {
            let chunks = lv.window.div_ceil(POOL_TAPS as usize) as u64;
            let ds = plan.downsample[i];
            assert_eq!(ds.args, [chunks as u32, POOL_TAPS]);
            // K, V and Q of 2 heads: (rows x chunks x d) units each, in workgroups of 64.
            let units = 2 * lv.rows(2) as u64 * chunks * 4;
            assert_eq!(ds.workgroups as u64, 3 * units.div_ceil(64));
            let rounds: Vec<[u32; 2]> = plan.downsample_combine[i].iter().map(|c| c.args).collect();
            let want: Vec<[u32; 2]> = combine_rounds(chunks)
                .into_iter()
                .map(|(stride, _)| [chunks as u32, stride as u32])
                .collect();
            assert_eq!(rounds, want);
            if chunks > 1 {
                most = most.max((2 * lv.rows(2) as u64 * chunks * 4, i));
            }
        }
        assert_eq!(plan.downsample_combine[8].len(), 2);
        assert_eq!(plan.workspace.pool_partials_kv, most.0);
        assert_eq!(plan.workspace.pool_partials_q, most.0);
        // Recording order: each level's rounds right after its downsample.
        let steps = plan.steps();
        let first = steps
            .iter()
            .position(|s| s.pass == Pass::DownsampleCombine)
            .unwrap();
        assert_eq!(
            (steps[first - 1].pass, steps[first - 1].level),
            (Pass::Downsample, steps[first].level)
        );
        // Average mode: one pass per level, no partials.
        let avg =
            FmaPlan::new(shape, &FmaConfig::new(64, 2), &KernelLimits::discrete_gpu()).unwrap();
        assert!(avg.downsample_combine.iter().all(Vec::is_empty));
        assert_eq!(avg.workspace.pool_partials_kv, 0);
    }

    #[test]
    fn causal_coarse_queries_are_refused() {
        let cfg = FmaConfig::new(64, 2).queries(Queries::Coarse).causal(true);
        let e =
            FmaPlan::new(Shape::new(1, 1, 4096, 64), &cfg, &KernelLimits::lavapipe()).unwrap_err();
        assert!(matches!(e, FmaError::CausalCoarseQueries), "{e}");
    }

    #[test]
    fn no_grid_dimension_exceeds_the_limit() {
        // 70000 heads of one block each: a 1D dispatch would need 70000 workgroups.
        let plan = FmaPlan::new(
            Shape::new(7, 10000, 16, 16),
            &FmaConfig::new(16, 2),
            &KernelLimits::lavapipe(),
        )
        .unwrap();
        assert_eq!(plan.attention.workgroups, 70000);
        let g = plan.attention.grid;
        assert!(g[0] <= 65535 && g[1] <= 65535);
        assert!(g[0] as u64 * g[1] as u64 >= 70000);
        for total in [1u32, 65535, 65536, 1 << 20, u32::MAX / 2] {
            let g = fold(total, 65535).unwrap();
            assert!(g[0] <= 65535 && g[1] <= 65535 && g[0] as u64 * g[1] as u64 >= total as u64);
        }
    }

    #[test]
    fn a_folded_grid_launches_fewer_than_a_row_of_spare_workgroups() {
        // Just past the limit (the downsample pass's level 1 at n = 131072, 8 heads): two rows
        // of 32768, not 65535 x 2 with 65534 workgroups doing nothing.
        assert_eq!(fold(65536, 65535).unwrap(), [32768, 2, 1]);
        assert_eq!(fold(65535, 65535).unwrap(), [65535, 1, 1]);
        assert_eq!(fold(0, 65535).unwrap(), [1, 1, 1]);
        for total in [1u32, 7, 65535, 65536, 98304, 131071, 1 << 20, 65535 * 65535] {
            for max in [1u32, 256, 65535] {
                let Ok([x, y, z]) = fold(total, max) else {
                    assert!(total.div_ceil(max) > max, "{total} {max}");
                    continue;
                };
                assert_eq!(z, 1);
                assert!(x <= max && y <= max, "{total} {max}: {x} x {y}");
                let launched = x as u64 * y as u64;
                assert!(launched >= total as u64, "{total} {max}: {x} x {y}");
                assert!(
                    launched < total.max(1) as u64 + y as u64,
                    "{total} {max}: {x} x {y}"
                );
            }
        }
    }

    #[test]
    fn workgroups_and_tiles_follow_the_adapter_limits() {
        let mut web = KernelLimits::lavapipe();
        web.max_workgroup = 256;
        web.workgroup_storage = 16384;
        let plan =
            FmaPlan::new(Shape::new(1, 1, 1000, 128), &FmaConfig::new(512, 4), &web).unwrap();
        assert_eq!(plan.attention.spec.wg, 256);
        assert_eq!(plan.tiles_per_block, 2);
        let s = plan.attention.spec;
        assert!(2 * s.bk * s.d4 * 16 + 4 * s.bk <= 16384);
        let small = FmaPlan::new(Shape::new(1, 1, 97, 40), &FmaConfig::new(4, 2), &web).unwrap();
        assert_eq!(small.attention.spec.wg, 4);
    }

    #[test]
    fn limits_are_typed_errors() {
        let mut tiny = KernelLimits::lavapipe();
        tiny.max_binding = 1 << 20;
        let e = FmaPlan::new(Shape::new(1, 8, 8192, 64), &FmaConfig::default(), &tiny).unwrap_err();
        assert!(matches!(e, FmaError::LimitExceeded { .. }), "{e}");
        let e = FmaPlan::new(
            Shape::new(1, 1, 64, 300),
            &FmaConfig::default(),
            &KernelLimits::lavapipe(),
        )
        .unwrap_err();
        assert!(
            matches!(
                e,
                FmaError::InvalidConfig {
                    what: "head_dim",
                    ..
                }
            ),
            "{e}"
        );
        let mut no_mem = KernelLimits::lavapipe();
        no_mem.workgroup_storage = 1024;
        let e = DensePlan::new(Shape::new(1, 1, 64, 256), &no_mem).unwrap_err();
        assert!(matches!(e, FmaError::LimitExceeded { .. }), "{e}");
        let e = FmaPlan::new(
            Shape::new(1, 1, 0, 16),
            &FmaConfig::default(),
            &KernelLimits::lavapipe(),
        )
        .unwrap_err();
        assert!(matches!(e, FmaError::InvalidConfig { .. }), "{e}");
    }
}
