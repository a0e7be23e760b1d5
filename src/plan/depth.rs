//! Work and depth of every dispatch of a plan, from the plan's parameters alone (no GPU): per
//! dispatch `serial_rows`, the most rows (of Q, K, V, O, dO, dK, dV, coarse rows or partial
//! sums) one invocation reads one after another (loop trip count times rows per trip), and
//! `rows`, all rows the dispatch reads (a row staged once in workgroup memory, or read by the
//! invocations of its channels, counts once). On two CPU cores total work decides; on a GPU
//! with ~17,000 invocations in flight the longest chain does (`../shared/design/gpu.md`), so a
//! pass whose `serial_rows` grows with n is the pass that makes a GPU slow (issue 27).
//!
//! The figures come from the index maps (algorithm.md §3, §8, §9): the near field of a query
//! (1D: 3 blocks, causal 2; 2D: 9 cells), its far list (per level up to 3 windows of p rows,
//! causal 2; 2D up to 27 cells), a coarse row's readers (the same lists inverted), each clipped
//! at the sequence; the widest block's and window's lists are walked over the blocks and
//! windows ([`DepthModel::widest_gather`], [`DepthModel::far_lists`]). On a sequence whose
//! windows are all full every `serial_rows` is what the shaders walk, exactly, and `rows` too
//! but for the attention passes and the coarse dK~/dV~ pass, where it is an upper bound
//! (`tests/gpu/depth_counts.rs` counts both on the shaders); partial windows stay under them.
//! `multipole-attn plan` prints them.

use super::backward::{
    coarse_rows_per_workgroup, max_readers, BackwardPlan, COMBINE_FAN_IN, DKV_COARSE_CHUNK,
    WEIGHT_CHUNK_WINDOWS,
};
use super::dense::DensePlan;
use super::dense_backward::DenseBackwardPlan;
use super::dense_tiled::{tiled_threads, TILED_ROWS};
use super::dispatch::Dispatch;
use super::forward::{FmaPlan, POOL_TAPS};
use super::pass::Pass;
use super::split_dense::DenseSplitPlan;
use crate::config::{Downsample, FmaConfig, Queries};
use crate::geometry::GridGeometry;
use crate::levels::{far_list, near_blocks};

/// Rows the subgroup coarse dK~/dV~ walk takes per pass over its readers (`RB` in
/// `shaders/shared/dkv_coarse_rows_subgroup.wgsl`).
const SUBGROUP_WALK_ROWS: u64 = 4;

/// The work and depth of one dispatch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DispatchDepth {
    /// The dispatch (pass, level, workgroups, folded grid, specialisation).
    pub dispatch: Dispatch,
    /// Invocations per workgroup.
    pub invocations: u32,
    /// The most rows one invocation reads one after another.
    pub serial_rows: u64,
    /// All rows the dispatch reads.
    pub rows: u64,
}

/// The `(serial_rows, rows)` of one dispatch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Depth {
    /// The most rows one invocation reads one after another.
    pub serial_rows: u64,
    /// All rows the dispatch reads.
    pub rows: u64,
}

/// What the figures depend on: the problem's index maps and sizes, taken from a plan.
#[derive(Clone, Debug)]
pub struct DepthModel {
    /// Tokens per sequence.
    pub n: u64,
    /// Fine block (2D: fine cell side r).
    pub m: u64,
    /// Coarse rank.
    pub p: u64,
    /// Per coarse level, its window (2D: cell side) and windows (cells).
    pub levels: Vec<(u64, u64)>,
    /// Query heads over the batch.
    pub bh: u64,
    /// K/V heads over the batch.
    pub kv_bh: u64,
    /// A 2D grid (algorithm.md §9).
    pub grid: bool,
    /// Causal masking.
    pub causal: bool,
    /// Coarse queries (§6).
    pub coarse_queries: bool,
    /// Learned downsampling (§4).
    pub learned: bool,
    /// The most keys one query block's gather list holds: the near field of its widest query
    /// (causal: the block's last) plus, with fine queries, its far list over every level (p
    /// rows per window or cell), maximised over the blocks together. At most
    /// [`DepthModel::near`] + [`DepthModel::far`], and less where no block has the largest
    /// far list of every level at once (1D: the top level's 2 to 4 windows give any window at
    /// most 2 far windows, not 3).
    pub widest_gather: u64,
    /// The most levels at which one token's coarse query has a key (a far list that is not
    /// empty): the partial results `upsample_merge` reads for it, over every token.
    pub widest_merge: u64,
    /// Per coarse level, its far lists over its windows (2D: cells).
    pub far_lists: Vec<FarLists>,
}

/// One coarse level's far lists over its windows (2D: cells), from the index maps.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FarLists {
    /// The most far windows of any window (its p coarse queries' far list, over p).
    pub widest: u64,
    /// Far windows summed over the level's windows.
    pub total: u64,
    /// Tokens of the windows whose far list is not empty: the tokens whose coarse query at
    /// this level has a key.
    pub tokens_with_far: u64,
    /// The most windows whose far list holds one window: its coarse rows' reader windows (the
    /// far lists inverted; 1D causal is not symmetric).
    pub widest_readers: u64,
}

impl DepthModel {
    /// The model of `plan`'s problem under `cfg`.
    pub fn new(plan: &FmaPlan, cfg: &FmaConfig) -> Self {
        let shape = plan.shape;
        Self {
            n: shape.seq as u64,
            m: plan.levels.m as u64,
            p: plan.levels.p as u64,
            levels: plan
                .levels
                .levels
                .iter()
                .map(|l| (l.window as u64, l.windows as u64))
                .collect(),
            bh: shape.batch_heads() as u64,
            kv_bh: shape.kv_batch_heads() as u64,
            grid: plan.grid.is_some(),
            causal: cfg.causal,
            coarse_queries: plan.queries == Queries::Coarse,
            learned: matches!(cfg.downsample, Downsample::Learned(_)),
            widest_gather: widest_blocks(plan, cfg.causal).0,
            widest_merge: widest_blocks(plan, false).1,
            far_lists: far_lists(plan, cfg.causal),
        }
    }

    /// Query heads per K/V head.
    fn group(&self) -> u64 {
        (self.bh / self.kv_bh.max(1)).max(1)
    }

    /// Fine keys of a query (and, by symmetry, queries that read a fine key).
    pub fn near(&self) -> u64 {
        let blocks = match (self.grid, self.causal) {
            (true, _) => 9 * self.m * self.m,
            (false, true) => 2 * self.m,
            (false, false) => 3 * self.m,
        };
        blocks.min(self.n)
    }

    /// Coarse keys of a query at level index `i`: its far list's windows times p.
    pub fn far_level(&self, i: usize) -> u64 {
        let windows = self.levels[i].1;
        let list = match (self.grid, self.causal) {
            (true, _) => 27,
            (false, true) => 2,
            (false, false) => 3,
        };
        list.min(windows) * self.p
    }

    /// Coarse keys of a query over every level.
    pub fn far(&self) -> u64 {
        (0..self.levels.len()).map(|i| self.far_level(i)).sum()
    }

    /// Coarse rows of level index `i` per head.
    fn level_rows(&self, i: usize) -> u64 {
        self.levels[i].1 * self.p
    }

    /// Tokens of a level's learned kernel (w_l; 2D s_l^2), clipped at the sequence.
    fn taps(&self, i: usize) -> u64 {
        let w = self.levels[i].0;
        let taps = if self.grid { w * w } else { w };
        taps.min(self.n)
    }

    /// Rows a coarse row of the first level pools (w_1 / p tokens; 2D r^2 / p).
    fn first_level_tokens(&self) -> u64 {
        let w = self.levels.first().map_or(self.m, |l| l.0);
        let tokens = if self.grid { w * w } else { w };
        tokens.div_ceil(self.p).min(self.n)
    }

    /// Rows of level l - 1 a coarse row of level l >= 2 pools (1D 2; 2D 4).
    fn children(&self) -> u64 {
        if self.grid {
            4
        } else {
            2
        }
    }

    /// Levels.
    fn count(&self) -> u64 {
        self.levels.len() as u64
    }
}

/// Over every query block of `plan`'s problem (1D fine blocks, 2D fine cells), from the index
/// maps (`levels::near_blocks` and `levels::far_list` in 1D, the 3 x 3 fine cells and
/// `GridGeometry::far_cells` in 2D): the largest gather list ([`DepthModel::widest_gather`])
/// and the most levels with a far list that is not empty ([`DepthModel::widest_merge`]).
/// O(blocks x levels).
fn widest_blocks(plan: &FmaPlan, causal: bool) -> (u64, u64) {
    let levels = &plan.levels;
    let (m, p, n) = (levels.m, levels.p, plan.shape.seq);
    // With coarse queries the fused pass sees the near field alone.
    let far_rank = if plan.queries == Queries::Coarse {
        0
    } else {
        p
    };
    let (mut widest, mut merged) = (0, 0);
    let mut take = |near: usize, far: &mut dyn Iterator<Item = usize>| {
        let (mut keys, mut present) = (near, 0);
        for f in far {
            keys += f * far_rank;
            present += usize::from(f > 0);
        }
        widest = widest.max(keys);
        merged = merged.max(present);
    };
    match plan.grid {
        None => {
            let blocks = levels.fine_blocks();
            for a0 in 0..blocks {
                let near = near_blocks(a0, causal, blocks);
                let mut far = levels
                    .levels
                    .iter()
                    .enumerate()
                    .map(|(i, level)| far_list(a0 >> i, causal, level.windows).len());
                take((near.end * m).min(n) - near.start * m, &mut far);
            }
        }
        Some(grid) => {
            let g = GridGeometry::new(grid, m, p);
            let (rows, cols) = g.cells(0);
            for a in 0..rows {
                let ys = (a.saturating_sub(1) * m, ((a + 2) * m).min(grid.h));
                for b in 0..cols {
                    let xs = (b.saturating_sub(1) * m, ((b + 2) * m).min(grid.w));
                    let mut far = (1..=levels.levels.len())
                        .map(|l| g.far_cells(l, a >> (l - 1), b >> (l - 1)).len());
                    take((ys.1 - ys.0) * (xs.1 - xs.0), &mut far);
                }
            }
        }
    }
    (widest as u64, merged as u64)
}

/// [`DepthModel::far_lists`] of `plan`'s problem: every window's (2D: cell's) far list at
/// every level, from the same index maps as [`widest_blocks`]. O(coarse windows).
fn far_lists(plan: &FmaPlan, causal: bool) -> Vec<FarLists> {
    let levels = &plan.levels;
    let n = plan.shape.seq;
    let mut all = Vec::with_capacity(levels.levels.len());
    for (i, level) in levels.levels.iter().enumerate() {
        let mut lists = FarLists::default();
        // Per window, the windows whose far list holds it.
        let mut readers = vec![0u64; level.windows];
        let mut take = |far: &[usize], tokens: usize| {
            lists.widest = lists.widest.max(far.len() as u64);
            lists.total += far.len() as u64;
            if !far.is_empty() {
                lists.tokens_with_far += tokens as u64;
            }
            for &b in far {
                readers[b] += 1;
            }
        };
        match plan.grid {
            None => {
                let w = level.window;
                for a in 0..level.windows {
                    take(
                        &far_list(a, causal, level.windows),
                        ((a + 1) * w).min(n) - a * w,
                    );
                }
            }
            Some(grid) => {
                let g = GridGeometry::new(grid, levels.m, levels.p);
                let (rows, cols) = g.cells(i + 1);
                let s = level.window;
                for a in 0..rows {
                    let ys = ((a + 1) * s).min(grid.h) - a * s;
                    for b in 0..cols {
                        let xs = ((b + 1) * s).min(grid.w) - b * s;
                        take(&g.far_cells(i + 1, a, b), ys * xs);
                    }
                }
            }
        }
        lists.widest_readers = readers.into_iter().max().unwrap_or(0);
        all.push(lists);
    }
    all
}

/// Heads the downsample pass pools: K and V of every K/V head, and Q of every query head
/// with coarse queries.
fn pooled_heads(m: &DepthModel) -> u64 {
    2 * m.kv_bh + if m.coarse_queries { m.bh } else { 0 }
}

/// `downsample` at level index `i`: an invocation per (tensor, head, coarse row, channel)
/// pools its row's tokens (level 1, Average), its children rows (Average, level >= 2) or one
/// chunk of at most `POOL_TAPS` of its window's w_l kernel taps (Learned).
pub fn downsample(m: &DepthModel, i: usize) -> Depth {
    let (serial, per_row) = if m.learned {
        let taps = m.taps(i);
        (taps.min(POOL_TAPS as u64), taps)
    } else if i == 0 {
        (m.first_level_tokens(), m.first_level_tokens())
    } else {
        (m.children(), m.children())
    };
    Depth {
        serial_rows: serial,
        rows: pooled_heads(m) * m.level_rows(i) * per_row,
    }
}

/// `downsample_combine`, one round at level index `i`: an invocation per (tensor, head, row,
/// group, channel) adds at most 16 partial sums.
pub fn downsample_combine(m: &DepthModel, i: usize, d: &Dispatch) -> Depth {
    let [chunks, stride] = d.args.map(u64::from);
    let added = chunks.div_ceil(stride).min(COMBINE_FAN_IN);
    let read = chunks.div_ceil(stride);
    Depth {
        serial_rows: added,
        rows: pooled_heads(m) * m.level_rows(i) * read,
    }
}

/// `fine_attention`: a workgroup per query tile stages the block's gather list (K and V of
/// its near keys and, with fine queries, its coarse keys); each invocation walks all of them
/// for its query: the widest block's (exact); `rows` bounds every block's by the widest
/// near field and far list.
pub fn fine_attention(m: &DepthModel, d: &Dispatch) -> Depth {
    let keys = m.near() + if m.coarse_queries { 0 } else { m.far() };
    let wg = d.spec.wg as u64;
    Depth {
        serial_rows: 1 + 2 * m.widest_gather,
        rows: d.workgroups as u64 * (wg + 2 * keys),
    }
}

/// `fine_attention_tiled`: the same keys as [`fine_attention`], staged once per workgroup of a
/// tile's `wg` queries; each invocation holds the queries of its row group (4 rows, or the
/// block's fewer) and walks every staged key tile (its micro-tiles read them).
pub fn fine_tiled(m: &DepthModel, d: &Dispatch) -> Depth {
    let keys = m.near() + if m.coarse_queries { 0 } else { m.far() };
    let wg = d.spec.wg as u64;
    let block = if m.grid { m.m * m.m } else { m.m };
    Depth {
        serial_rows: (TILED_ROWS as u64).min(block).min(wg) + 2 * m.widest_gather,
        rows: d.workgroups as u64 * (wg + 2 * keys),
    }
}

/// `coarse_attention` at level index `i`: an invocation per coarse query, over its far list.
/// Exact on full windows: the widest far list's p rows per window, and every row's own.
pub fn coarse_attention(m: &DepthModel, i: usize) -> Depth {
    let far = m.far_lists[i];
    Depth {
        serial_rows: 1 + 2 * m.p * far.widest,
        rows: m.bh * (m.level_rows(i) + 2 * m.p * m.p * far.total),
    }
}

/// `upsample_merge`: an invocation per token merges the near field's partial result and one
/// per level whose coarse query has a key (exact).
pub fn upsample_merge(m: &DepthModel) -> Depth {
    let merged: u64 = m.far_lists.iter().map(|f| f.tokens_with_far).sum();
    Depth {
        serial_rows: 1 + m.widest_merge,
        rows: m.bh * (m.n + merged),
    }
}

/// `dense_attention`: an invocation per query walks the dispatch's key chunk.
pub fn dense_attention(d: &Dispatch, keys: u64) -> Depth {
    let wg = d.spec.wg as u64;
    Depth {
        serial_rows: 1 + 2 * keys,
        rows: d.workgroups as u64 * (wg + 2 * keys),
    }
}

/// The dense backward (`dense_backward_dkv`, `dense_backward_dq`, FlashAttention-2's
/// structure): an invocation owns a key (a query) and walks every query row of its K/V head's
/// group, q, dO and the row's (LSE, D) (every key and value), as dense attention's forward
/// walks its keys: O(n) by definition of exact attention, cut into per-dispatch chunks for
/// llvmpipe only. An upper bound over one whole walk.
pub fn dense_backward(d: &Dispatch, walked: u64, rows_per_step: u64) -> Depth {
    let wg = d.spec.wg as u64;
    Depth {
        serial_rows: 1 + rows_per_step * walked,
        rows: d.workgroups as u64 * (wg + rows_per_step * walked),
    }
}

/// `backward_delta`: an invocation per row reads dO and O.
pub fn backward_delta(m: &DepthModel) -> Depth {
    Depth {
        serial_rows: 2,
        rows: 2 * m.bh * m.n,
    }
}

/// `backward_dq`: the forward's tiles and gather lists, each query with its dO (serial: the
/// widest block's, as [`fine_attention`]).
pub fn backward_dq(m: &DepthModel, d: &Dispatch) -> Depth {
    let keys = m.near() + if m.coarse_queries { 0 } else { m.far() };
    let wg = d.spec.wg as u64;
    Depth {
        serial_rows: 2 + 2 * m.widest_gather,
        rows: d.workgroups as u64 * (2 * wg + 2 * keys),
    }
}

/// `backward_dkv_fine`: a workgroup per key tile walks the queries (q and dO) of every query
/// head of its K/V head that read the tile's block: the near field inverted.
pub fn backward_dkv_fine(m: &DepthModel, d: &Dispatch) -> Depth {
    let queries = m.group() * m.near();
    let wg = d.spec.wg as u64;
    Depth {
        serial_rows: 2 + 2 * queries,
        rows: d.workgroups as u64 * (2 * wg + 2 * queries),
    }
}

/// `backward_dkv_coarse(_q)` at level index `i`: a workgroup per (window, rows, reader chunk)
/// walks at most `DKV_COARSE_CHUNK` of its rows' readers (q and dO each), once per group of 4
/// rows on the subgroup path, after loading its rows' k~ and v~.
pub fn backward_dkv_coarse(m: &DepthModel, i: usize, d: &Dispatch) -> Depth {
    // The widest row's readers (the plan's chunks are sized by `max_readers`, a bound).
    let size = if m.coarse_queries { m.p } else { m.taps(i) };
    let readers = m.far_lists[i].widest_readers * size * m.group();
    debug_assert!(
        readers
            <= max_readers(
                m.grid,
                m.causal,
                m.coarse_queries,
                m.levels[i].0 as usize,
                m.p as usize
            ) * m.group()
    );
    let chunk = readers.min(DKV_COARSE_CHUNK as u64);
    let pr = coarse_rows_per_workgroup(d.spec.wg, d.spec.d4) as u64;
    let rows = m.p.min(pr);
    Depth {
        serial_rows: 2 * rows + 2 * chunk * rows.div_ceil(SUBGROUP_WALK_ROWS),
        rows: d.workgroups as u64 * (2 * rows + 2 * chunk),
    }
}

/// `backward_dkv_combine`, one round at level index `i`: an invocation per (row, group, vec4)
/// adds at most 16 partial sums of dK~ and of dV~.
pub fn backward_dkv_combine(m: &DepthModel, i: usize, d: &Dispatch) -> Depth {
    let [chunks, stride] = d.args.map(u64::from);
    let fan_in = COMBINE_FAN_IN;
    let added = chunks.div_ceil(stride).min(fan_in);
    // Every partial of the round's stride is read once: ceil(chunks / stride) per row.
    let read = chunks.div_ceil(stride);
    Depth {
        serial_rows: 2 * added,
        rows: m.kv_bh * m.level_rows(i) * 2 * read,
    }
}

/// `backward_coarse_stats` at level index `i`: an invocation per (coarse-query row, channel)
/// pools its tokens' dO (level 1) or its children rows' (level >= 2).
pub fn backward_coarse_stats(m: &DepthModel, i: usize) -> Depth {
    let serial = if i == 0 {
        2 * m.first_level_tokens()
    } else {
        2 * m.children()
    };
    Depth {
        serial_rows: serial,
        rows: m.bh * m.level_rows(i) * serial,
    }
}

/// `backward_coarse_dq` at level index `i`: an invocation per coarse-query row over its far
/// list (k~ and v~ of each key, after its q~ and G).
/// Exact on full windows, as [`coarse_attention`].
pub fn backward_coarse_dq(m: &DepthModel, i: usize) -> Depth {
    let far = m.far_lists[i];
    Depth {
        serial_rows: 2 + 2 * m.p * far.widest,
        rows: m.bh * (2 * m.level_rows(i) + 2 * m.p * m.p * far.total),
    }
}

/// `downsample_backward`: an invocation per (token, vec4) adds, per level, the coarse rows
/// its token went into (Average 1, Learned p; dK~ and dV~) to its dK, dV; with coarse queries
/// the query part does the same for dQ.
pub fn downsample_backward(m: &DepthModel) -> Depth {
    let per_level = if m.learned { m.p } else { 1 };
    let kv = 2 + 2 * m.count() * per_level;
    let q = 1 + m.count() * per_level;
    let q_rows = if m.coarse_queries { m.bh * m.n * q } else { 0 };
    Depth {
        serial_rows: kv,
        rows: m.kv_bh * m.n * kv + q_rows,
    }
}

/// `weights_backward` at level index `i`: an invocation per (weight element (c, j, t), chunk)
/// sums over at most `WEIGHT_CHUNK_WINDOWS` of the level's windows over every K/V head (dK~,
/// K, dV~, V of each; a bias element dK~ and dV~ only).
pub fn weights_backward(m: &DepthModel, i: usize) -> Depth {
    let windows = m.kv_bh * m.levels[i].1;
    Depth {
        serial_rows: 4 * windows.min(WEIGHT_CHUNK_WINDOWS as u64),
        rows: (4 * m.taps(i) + 2) * m.p * windows,
    }
}

/// `weights_backward_combine`, one round: an invocation per (element, group) adds at most 16
/// partial (K, V) pairs.
pub fn weights_backward_combine(m: &DepthModel, i: usize, d: &Dispatch) -> Depth {
    let [chunks, stride] = d.args.map(u64::from);
    let added = chunks.div_ceil(stride).min(COMBINE_FAN_IN);
    let read = chunks.div_ceil(stride);
    Depth {
        serial_rows: 2 * added,
        rows: (m.taps(i) + 1) * m.p * 2 * read,
    }
}

/// `weights_backward_q` at level index `i`: the same over the query heads' windows (dQ~ and Q
/// of each; a bias element dQ~ only).
pub fn weights_backward_q(m: &DepthModel, i: usize) -> Depth {
    let windows = m.bh * m.levels[i].1;
    Depth {
        serial_rows: 2 * windows.min(WEIGHT_CHUNK_WINDOWS as u64),
        rows: (2 * m.taps(i) + 1) * m.p * windows,
    }
}

/// `weights_backward_q_combine`, one round: an invocation per (element, group) adds at most
/// 16 partial sums.
pub fn weights_backward_q_combine(m: &DepthModel, i: usize, d: &Dispatch) -> Depth {
    let [chunks, stride] = d.args.map(u64::from);
    let added = chunks.div_ceil(stride).min(COMBINE_FAN_IN);
    let read = chunks.div_ceil(stride);
    Depth {
        serial_rows: added,
        rows: (m.taps(i) + 1) * m.p * read,
    }
}

/// `pad_rows`, `pad_gradients`: writes only.
fn writes_only() -> Depth {
    Depth {
        serial_rows: 0,
        rows: 0,
    }
}

/// The depth of dispatch `d` of a plan of `model`'s problem (not dense attention: see
/// [`dense_depths`]; not the decoder's passes).
pub fn dispatch_depth(model: &DepthModel, d: &Dispatch) -> Depth {
    let level = d.level.unwrap_or(0) as usize;
    match d.pass {
        Pass::Downsample => downsample(model, level),
        Pass::DownsampleCombine => downsample_combine(model, level, d),
        Pass::FineAttention => fine_attention(model, d),
        Pass::FineTiled => fine_tiled(model, d),
        Pass::CoarseAttention => coarse_attention(model, level),
        Pass::UpsampleMerge => upsample_merge(model),
        Pass::BackwardDelta => backward_delta(model),
        Pass::BackwardDq => backward_dq(model, d),
        Pass::BackwardDkvFine => backward_dkv_fine(model, d),
        Pass::BackwardDkvCoarse | Pass::BackwardDkvCoarseQ => backward_dkv_coarse(model, level, d),
        Pass::BackwardDkvCombine => backward_dkv_combine(model, level, d),
        Pass::BackwardCoarseStats => backward_coarse_stats(model, level),
        Pass::BackwardCoarseDq => backward_coarse_dq(model, level),
        Pass::DownsampleBackward => downsample_backward(model),
        Pass::WeightsBackward => weights_backward(model, level),
        Pass::WeightsBackwardCombine => weights_backward_combine(model, level, d),
        Pass::WeightsBackwardQ => weights_backward_q(model, level),
        Pass::WeightsBackwardQCombine => weights_backward_q_combine(model, level, d),
        Pass::PadRows | Pass::PadGradients => writes_only(),
        Pass::DenseAttention | Pass::DenseTiled => dense_attention(d, model.n),
        Pass::DenseBackwardDkv => dense_backward(d, model.n, 3),
        Pass::DenseBackwardDq => dense_backward(d, model.n, 2),
        Pass::DecodeIngest
        | Pass::DecodeStep
        | Pass::DecodeAttention
        | Pass::DecodeDense
        | Pass::DecodeMerge => writes_only(),
    }
}

/// Invocations per workgroup of `d`: its specialisation's `wg`, except the tiled kernels
/// (dense and FMA's fine pass), whose `wg` is their block of query rows and whose workgroup
/// holds 16 lanes per 4 rows.
fn invocations(d: &Dispatch) -> u32 {
    match d.pass {
        Pass::DenseTiled | Pass::FineTiled => tiled_threads(d.spec.wg),
        _ => d.spec.wg,
    }
}

pub(super) fn with_depth(model: &DepthModel, d: Dispatch) -> DispatchDepth {
    let depth = dispatch_depth(model, &d);
    DispatchDepth {
        dispatch: d,
        invocations: invocations(&d),
        serial_rows: depth.serial_rows,
        rows: depth.rows,
    }
}

/// Every dispatch of a forward in recording order, with its depth.
pub fn forward_depths(plan: &FmaPlan, cfg: &FmaConfig) -> Vec<DispatchDepth> {
    let model = DepthModel::new(plan, cfg);
    plan.steps()
        .into_iter()
        .map(|d| with_depth(&model, d))
        .collect()
}

/// Every dispatch of a backward in recording order, with its depth.
pub fn backward_depths(plan: &BackwardPlan, cfg: &FmaConfig) -> Vec<DispatchDepth> {
    let model = DepthModel::new(&plan.forward, cfg);
    plan.dispatches()
        .into_iter()
        .map(|d| with_depth(&model, d))
        .collect()
}

/// Every dispatch of dense attention in recording order (one per key chunk), with its depth.
pub fn dense_depths(plan: &DensePlan) -> Vec<DispatchDepth> {
    let chunks = plan.key_chunks(plan.keys_per_dispatch());
    let mut all: Vec<DispatchDepth> = chunks
        .iter()
        .map(|&(lo, hi)| {
            let d = plan.attention;
            let depth = dense_attention(&d, (hi - lo) as u64);
            DispatchDepth {
                dispatch: d,
                invocations: invocations(&d),
                serial_rows: depth.serial_rows,
                rows: depth.rows,
            }
        })
        .collect();
    all.extend(plan.pad.map(|d| DispatchDepth {
        dispatch: d,
        invocations: invocations(&d),
        serial_rows: 0,
        rows: 0,
    }));
    all
}

/// Every dispatch of dense attention over a head split across bindings, in recording order
/// (one per (query chunk, key chunk) pair and key part), with its depth.
pub fn dense_split_depths(plan: &DenseSplitPlan) -> Vec<DispatchDepth> {
    plan.pairs
        .iter()
        .map(|pair| {
            let d = pair.dispatch;
            let depth = dense_attention(&d, (pair.keys.1 - pair.keys.0) as u64);
            DispatchDepth {
                dispatch: d,
                invocations: invocations(&d),
                serial_rows: depth.serial_rows,
                rows: depth.rows,
            }
        })
        .collect()
}

/// `backward_delta` of a dense backward over `rows` rows: each invocation reads its dO and O.
pub fn dense_delta(d: &Dispatch, rows: u64) -> DispatchDepth {
    DispatchDepth {
        dispatch: *d,
        invocations: invocations(d),
        serial_rows: 2,
        rows: 2 * rows,
    }
}

/// Every dispatch of the dense backward of `plan` in recording order (D, dK/dV once per query
/// chunk, dQ once per key chunk, at the default keys per dispatch), with its depth.
pub fn dense_backward_depths(plan: &DenseBackwardPlan) -> Vec<DispatchDepth> {
    let shape = plan.forward.shape;
    let step = |d: &Dispatch, walked: usize, per: u64| {
        let depth = dense_backward(d, walked as u64, per);
        DispatchDepth {
            dispatch: *d,
            invocations: invocations(d),
            serial_rows: depth.serial_rows,
            rows: depth.rows,
        }
    };
    let group = shape.group();
    std::iter::once(dense_delta(&plan.delta, shape.rows() as u64))
        .chain(
            plan.query_chunks(plan.queries_per_dispatch())
                .into_iter()
                .map(|(lo, hi)| step(&plan.dkv, group * (hi - lo), 3)),
        )
        .chain(
            plan.key_chunks(plan.keys_per_dispatch())
                .into_iter()
                .map(|(lo, hi)| step(&plan.dq, hi - lo, 2)),
        )
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::geometry::Grid;
    use crate::plan::KernelLimits;
    use crate::shape::Shape;

    fn backward(n: usize, cfg: &FmaConfig) -> Vec<DispatchDepth> {
        // Learned weights are (d, p, w_l) per level: d = 4 keeps 2^22 tokens' small (the
        // chains do not depend on d).
        let d = match &cfg.downsample {
            Downsample::Learned(_) => 4,
            Downsample::Average => 64,
        };
        let shape = Shape::new(1, 1, n, d);
        let plan = BackwardPlan::new(shape, cfg, &KernelLimits::discrete_gpu()).unwrap();
        let mut all = forward_depths(&plan.forward, cfg);
        all.extend(backward_depths(&plan, cfg));
        all
    }

    /// The longest chain of each pass over its dispatches.
    fn deepest(all: &[DispatchDepth], pass: Pass) -> u64 {
        all.iter()
            .filter(|d| d.dispatch.pass == pass)
            .map(|d| d.serial_rows)
            .max()
            .unwrap_or(0)
    }

    /// The most keys any query sees, query by query from the [`Geometry`]'s key lists (the CPU
    /// reference's): fine keys plus coarse rows over every level (none with coarse queries).
    fn brute_widest(g: &dyn crate::geometry::Geometry, coarse_queries: bool) -> u64 {
        let levels = if coarse_queries { 0 } else { g.num_levels() };
        (0..g.tokens())
            .map(|i| {
                let fine: usize = g.fine_keys(i).iter().map(|r| r.len()).sum();
                let far: usize = (1..=levels).map(|l| g.coarse_rows(i, l).len()).sum();
                (fine + far) as u64
            })
            .max()
            .unwrap_or(0)
    }

    #[test]
    fn the_widest_gather_list_is_the_geometrys() {
        // Full windows (the geometry leaves out empty rows, the GPU's far list does not).
        use crate::geometry::{Grid, GridGeometry, Line};
        let limits = KernelLimits::lavapipe();
        for (n, m, p) in [
            (4096, 16, 2),
            (1024, 8, 4),
            (512, 64, 2),
            (2048, 4, 1),
            (64, 64, 1),
        ] {
            for causal in [false, true] {
                for queries in [Queries::Fine, Queries::Coarse] {
                    if causal && queries == Queries::Coarse {
                        continue;
                    }
                    let cfg = FmaConfig::new(m, p).causal(causal).queries(queries);
                    let plan = FmaPlan::new(Shape::new(1, 1, n, 8), &cfg, &limits).unwrap();
                    let model = DepthModel::new(&plan, &cfg);
                    let g = Line::from_levels(plan.levels.clone(), causal);
                    let coarse = queries == Queries::Coarse;
                    assert_eq!(
                        model.widest_gather,
                        brute_widest(&g, coarse),
                        "n {n} m {m} p {p} causal {causal} {queries:?}"
                    );
                    assert!(model.widest_gather <= model.near() + model.far());
                }
            }
        }
        for (h, w, r, p) in [(64, 64, 8, 2), (128, 32, 4, 1), (96, 96, 8, 4)] {
            let grid = Grid::new(h, w);
            let cfg = FmaConfig::new(r, p).grid(Some(grid));
            let plan = FmaPlan::new(Shape::new(1, 1, h * w, 8), &cfg, &limits).unwrap();
            let model = DepthModel::new(&plan, &cfg);
            let g = GridGeometry::new(grid, r, p);
            assert_eq!(
                model.widest_gather,
                brute_widest(&g, false),
                "{grid} r {r} p {p}"
            );
        }
    }

    #[test]
    fn the_fused_pass_walks_the_gather_list_of_algorithm_md() {
        // n = 4096, m = 64, p = 2 (algorithm.md §11): at most 218 keys per query (bound
        // 3m + 3pL = 222: the top level's 4 windows give none 3 far windows), each a K and a V
        // row, after the query's own.
        let cfg = FmaConfig::new(64, 2);
        let plan =
            FmaPlan::new(Shape::new(1, 1, 4096, 64), &cfg, &KernelLimits::lavapipe()).unwrap();
        let model = DepthModel::new(&plan, &cfg);
        assert_eq!(model.near() + model.far(), 222);
        assert_eq!(model.widest_gather, 218);
        let att = fine_attention(&model, &plan.attention);
        assert_eq!(att.serial_rows, 1 + 2 * 218);
        // Causal: 2 blocks and 2 windows per level.
        let causal = FmaConfig::new(64, 2).causal(true);
        let model = DepthModel::new(&plan, &causal);
        assert_eq!(model.near() + model.far(), 128 + 2 * 2 * 5);
        // Average pooling: level 1 reads w_1 / p = 32 tokens per row, the others 2 rows.
        let model = DepthModel::new(&plan, &cfg);
        assert_eq!(downsample(&model, 0).serial_rows, 32);
        assert_eq!(downsample(&model, 4).serial_rows, 2);
        // Over a level, K and V: 2 heads x 128 rows x 32 tokens = every token twice.
        assert_eq!(downsample(&model, 0).rows, 2 * 4096);
    }

    #[test]
    fn the_coarse_backward_walks_chunks_and_a_tree() {
        // n = 65536, m = 64, p = 2: the top level (w = 16384) has 3 w = 49152 readers per
        // row, 192 chunks of 256; the tree adds 16, then 12.
        let cfg = FmaConfig::new(64, 2);
        let all = backward(65536, &cfg);
        let top = all
            .iter()
            .rfind(|d| d.dispatch.pass == Pass::BackwardDkvCoarse)
            .unwrap();
        assert_eq!(top.dispatch.args, [192, DKV_COARSE_CHUNK]);
        // p = 2 rows (one subgroup walk of 4 rows), each q and dO of 256 readers.
        assert_eq!(top.serial_rows, 2 * 2 + 2 * 256);
        let rounds: Vec<u64> = all
            .iter()
            .filter(|d| d.dispatch.pass == Pass::BackwardDkvCombine)
            .filter(|d| d.dispatch.level == top.dispatch.level)
            .map(|d| d.serial_rows)
            .collect();
        assert_eq!(rounds, vec![2 * 16, 2 * 12]);
    }

    /// Issue 27's bound: every pass's chain at n = 2^22 is at most its chain at 2^16 plus
    /// O(p log n) (here 8 p log2 n), and at most 8 (3m + 4pL) + 1024; Learned mode's
    /// `downsample` included (its w_l taps in chunks of `POOL_TAPS`).
    #[test]
    fn no_chain_grows_with_n() {
        let (m, p) = (64usize, 2usize);
        let learned = |n: usize| {
            let w = crate::weights::LearnedWeights::box_init_for(4, m, p, n);
            FmaConfig::new(m, p).downsample(Downsample::Learned(w))
        };
        let learned_coarse = |n: usize| learned(n).queries(Queries::Coarse);
        let configs: [&dyn Fn(usize) -> FmaConfig; 5] = [
            &|_| FmaConfig::new(m, p),
            &|_| FmaConfig::new(m, p).causal(true),
            &|_| FmaConfig::new(m, p).queries(Queries::Coarse),
            &learned,
            &learned_coarse,
        ];
        for config in configs {
            let base = backward(1 << 16, &config(1 << 16));
            for log_n in 16..=22 {
                let n = 1usize << log_n;
                let cfg = &config(n);
                let all = backward(n, cfg);
                let levels = crate::levels::Levels::new(n, m, p).count();
                let bound = (8 * (3 * m + 4 * p * levels) + 1024) as u64;
                for d in &all {
                    let pass = d.dispatch.pass;
                    assert!(
                        d.serial_rows <= bound,
                        "n = {n}: {} reads {} rows in a row (bound {bound})",
                        pass.name(),
                        d.serial_rows
                    );
                    let grown = (8 * p * log_n) as u64;
                    assert!(
                        d.serial_rows <= deepest(&base, pass) + grown,
                        "n = {n}: {} reads {} rows in a row, {} at n = 65536",
                        pass.name(),
                        d.serial_rows,
                        deepest(&base, pass)
                    );
                }
            }
        }
    }

    #[test]
    fn no_chain_grows_with_n_in_2d() {
        // Cells 8 x 8, p = 2, square grids of 2^16 and 2^22 tokens; Average and Learned.
        let at = |side: usize, learned: bool| {
            let grid = Grid::new(side, side);
            let mut cfg = FmaConfig::new(8, 2).grid(Some(grid));
            if learned {
                let w = crate::weights::LearnedWeights::box_init_grid_for(4, 8, 2, grid);
                cfg = cfg.downsample(Downsample::Learned(w));
            }
            let d = if learned { 4 } else { 16 };
            let shape = Shape::new(1, 1, side * side, d);
            let plan = BackwardPlan::new(shape, &cfg, &KernelLimits::discrete_gpu()).unwrap();
            let mut all = forward_depths(&plan.forward, &cfg);
            all.extend(backward_depths(&plan, &cfg));
            (all, plan.forward.levels.count())
        };
        for learned in [false, true] {
            let ((small, _), (large, levels)) = (at(256, learned), at(2048, learned));
            let bound = (8 * (3 * 8 + 4 * 2 * levels) + 1024) as u64;
            for d in &large {
                let pass = d.dispatch.pass;
                assert!(
                    d.serial_rows <= deepest(&small, pass) + 8 * 2 * 22,
                    "{}: {} rows in a row at 2^22, {} at 2^16",
                    pass.name(),
                    d.serial_rows,
                    deepest(&small, pass)
                );
                // The 2D near field is 9 cells of r^2 = 64 tokens (576 keys, 2 rows each).
                assert!(
                    d.serial_rows <= bound.max(2 * 9 * 64 + 2 + 2 * 27 * 2 * levels as u64),
                    "{}: {} rows in a row at 2^22",
                    pass.name(),
                    d.serial_rows
                );
            }
        }
    }

    #[test]
    fn the_pass_that_reads_most_runs_on_many_invocations() {
        let n = 1usize << 20;
        for cfg in [
            FmaConfig::new(64, 2),
            FmaConfig::new(64, 2).causal(true),
            FmaConfig::new(64, 2).queries(Queries::Coarse),
        ] {
            let all = backward(n, &cfg);
            let most = all.iter().max_by_key(|d| d.rows).unwrap();
            let invocations = most.dispatch.workgroups as u64 * most.invocations as u64;
            assert!(
                invocations >= (n / 64) as u64,
                "{cfg:?}: {} reads {} rows on {invocations} invocations",
                most.dispatch.pass.name(),
                most.rows
            );
        }
    }

    #[test]
    fn the_tiled_dense_kernel_counts_its_lanes() {
        use crate::plan::DenseKernel;
        let shape = Shape::new(1, 2, 4096, 64);
        let limits = KernelLimits::discrete_gpu();
        let plan = DensePlan::with_kernel(shape, &limits, DenseKernel::Tiled).unwrap();
        assert_eq!(plan.attention.pass, Pass::DenseTiled);
        let all = dense_depths(&plan);
        assert_eq!(all[0].invocations, tiled_threads(plan.attention.spec.wg));
        assert!(all[0].invocations > plan.attention.spec.wg);
    }

    #[test]
    fn dense_attention_chains_are_its_key_chunks() {
        let plan = DensePlan::new(Shape::new(1, 1, 10000, 64), &KernelLimits::lavapipe()).unwrap();
        let all = dense_depths(&plan);
        let keys = plan.keys_per_dispatch() as u64;
        assert_eq!(all.len(), 10000usize.div_ceil(keys as usize));
        assert_eq!(all[0].serial_rows, 1 + 2 * keys);
    }
}
