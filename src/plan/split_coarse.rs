//! Splitting one head's coarse rows across storage bindings: the part of a [`super::SplitPlan`]
//! for a head whose coarse K~, V~ of all levels do not fit one binding (about 2 n p / m rows,
//! so a long head, or a small block size m). Pure arithmetic, unit-tested without a GPU;
//! `gpu/fma/split.rs` executes it.
//!
//! The full rows of each level and coarse tensor live in copy-only *stores* (never bound). Each
//! step binds *compact* buffers of at most one binding each ([`CoarseSplit::capacity`] rows)
//! holding only the rows it reads and writes, as [`Slice`]s: rows `first..first + rows` of one
//! level at compact row `at`. Every coarse index in the shaders is
//! `(row_offset + row) * d + c` in wrapping u32 arithmetic (batch_heads = 1 in a split head), so
//! a step whose parameters carry `row_offset = at - first (mod 2^32)` for each level of its
//! layout ([`Slice::row_offset`]) reads and writes the compact slice with the unchanged shaders:
//!
//! ```text
//! store, level l   [ 0 ........ first ====== first+rows ........ windows_l p )
//!                                 |  copy  |
//! compact          [ slice of level l-1 | slice of level l ]   row_offset_l = at_l - first_l
//! ```
//!
//! Per head, in order (each step: copies in, its dispatches, copies out):
//!
//! 1. pooling, level by level: level 1 (Average) per sequence chunk, from its tokens; levels
//!    l >= 2 (Average) in groups of windows, each loading the level l-1 rows of its windows'
//!    children; Learned mode (whose head fits one binding) every level in groups of windows,
//!    from the tokens; each step saves the rows it pooled;
//! 2. coarse queries: per level, the coarse attention in groups of windows, loading the keys
//!    and values of the group's far lists (windows a-3 ..= a+3) and saving the partial results;
//! 3. per sequence chunk: its attention (and merge), loading each level's rows its far lists
//!    read (fine queries), or the partial results of its tokens' windows (coarse queries).
//!
//! The passes do the same float operations in the same order as unsplit, on the same bits
//! (copies are exact), so the result is the unsplit result to the bit.

use std::ops::Range;

use super::dispatch::dispatch;
use super::forward::FmaPlan;
use super::limits::{KernelLimits, BINDING_BYTES};
use super::Dispatch;
use crate::config::Downsample;
use crate::error::{FmaError, Result};
use crate::levels::Levels;

/// A coarse tensor of a split head: each has a store per level and one compact buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CoarseTensor {
    /// Coarse keys K~.
    K,
    /// Coarse values V~.
    V,
    /// Coarse queries Q~ (coarse queries only).
    Q,
    /// The coarse queries' partial outputs o~.
    Out,
    /// The coarse queries' partial LSEs (one float per row; the others d).
    Lse,
}

/// Rows `first..first + rows` of level index `level` (level l - 1), at row `at` of the compact
/// buffers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Slice {
    /// Level index (l - 1).
    pub level: usize,
    /// First row within the level (row a p + j is sub-window j of window a).
    pub first: usize,
    /// Rows.
    pub rows: usize,
    /// Row of the compact buffers that holds row `first`.
    pub at: usize,
}

impl Slice {
    /// The level's `row_offset` in a step's parameters: `at - first` mod 2^32, so that the
    /// shaders' `row_offset + row` is compact row `at + (row - first)` for every row of the
    /// slice (u32 arithmetic wraps in WGSL).
    pub fn row_offset(&self) -> u32 {
        (self.at as u32).wrapping_sub(self.first as u32)
    }

    /// The rows of the level it holds.
    pub fn level_rows(&self) -> Range<usize> {
        self.first..self.first + self.rows
    }

    /// The part of this slice holding level rows `rows` (within [`Slice::level_rows`]).
    fn part(&self, rows: Range<usize>) -> Slice {
        debug_assert!(self.first <= rows.start && rows.end <= self.first + self.rows);
        Slice {
            level: self.level,
            first: rows.start,
            rows: rows.len(),
            at: self.at + rows.start - self.first,
        }
    }
}

/// One step of a split head's coarse work: its copies in, its dispatches (one compute pass,
/// parameters of its own), its copies out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CoarseStep {
    /// The tokens its dispatches cover (`chunk_lo`, `chunk_hi`): a chunk's; for pooling and
    /// coarse attention `a_lo w_l .. min(a_hi w_l, n)`, the windows `a_lo..a_hi` of its level.
    pub lo: usize,
    /// One past its last token.
    pub hi: usize,
    /// The chunk whose token bindings it binds (index into `SplitPlan::chunks`).
    pub chunk: usize,
    /// Where each level it touches sits in the compact buffers (one slice per level at most,
    /// disjoint, within [`CoarseSplit::capacity`] rows).
    pub layout: Vec<Slice>,
    /// Copied from the stores into the compact buffers before its dispatches.
    pub load: Vec<(CoarseTensor, Slice)>,
    /// Copied from the compact buffers into the stores after them.
    pub save: Vec<(CoarseTensor, Slice)>,
    /// Its dispatches, in order.
    pub dispatches: Vec<Dispatch>,
}

impl CoarseStep {
    /// Compact rows its layout uses.
    pub fn rows(&self) -> usize {
        self.layout.iter().map(|s| s.at + s.rows).max().unwrap_or(0)
    }
}

/// The coarse part of a split head whose coarse rows exceed one binding (module docs).
#[derive(Clone, Debug)]
pub struct CoarseSplit {
    /// Rows of each compact buffer: one binding's worth of rows of d floats.
    pub capacity: usize,
    /// Steps 1 and 2 of the module documentation, in execution order.
    pub pool: Vec<CoarseStep>,
    /// Step 3: one per chunk, in chunk order.
    pub attend: Vec<CoarseStep>,
}

/// Whether the coarse rows of all levels of one head of `n` tokens of width `d` (block `m`, rank
/// `p` as configured) exceed one storage binding, so a forward must split them ([`CoarseSplit`]).
pub fn head_coarse_exceeds_binding(
    n: usize,
    d: usize,
    m: usize,
    p: usize,
    limits: &KernelLimits,
) -> bool {
    Levels::new(n, m, p).total_rows() as u64 * d as u64 * 4 > limits.binding_bytes()
}

/// Rows one binding holds for rows of `d` floats.
pub(crate) fn capacity(d: usize, limits: &KernelLimits) -> usize {
    (limits.binding_bytes() / (d as u64 * 4)).min(u32::MAX as u64) as usize
}

/// The windows at level index `lvl` whose rows a chunk of tokens `lo..hi` (lo a multiple of m)
/// reads in its attention: fine queries, every far list of its blocks (windows a-3 ..= a+3 of
/// each block's window a, the interval holding them); coarse queries, the windows of its tokens
/// (their partial results).
pub fn attend_windows(
    levels: &Levels,
    lvl: usize,
    lo: usize,
    hi: usize,
    coarse: bool,
) -> Range<usize> {
    let lv = &levels.levels[lvl];
    if coarse {
        return lo / lv.window..hi.div_ceil(lv.window);
    }
    let m = levels.m;
    let (first, last) = (lo / m >> lvl, (hi.div_ceil(m) - 1) >> lvl);
    first.saturating_sub(3)..(last + 4).min(lv.windows)
}

/// An upper bound of the compact rows the attention of any chunk of `k` fine blocks reads
/// (windows spanned by k blocks at level index l: at most ((k - 1) >> l) + 2, plus 3 on either
/// side with fine queries), monotone in k.
pub fn attend_rows_bound(levels: &Levels, k: usize, coarse: bool) -> usize {
    let halo = if coarse { 0 } else { 6 };
    levels
        .levels
        .iter()
        .enumerate()
        .map(|(l, lv)| lv.windows.min(((k - 1) >> l) + 2 + halo) * levels.p)
        .sum()
}

/// The largest number of fine blocks per chunk, at most `most`, whose attention reads fit
/// `capacity` rows ([`attend_rows_bound`]); a typed error when not even one block's do.
pub fn blocks_per_chunk(
    levels: &Levels,
    most: usize,
    capacity: usize,
    coarse: bool,
    d: usize,
) -> Result<usize> {
    let fits = |k: usize| attend_rows_bound(levels, k, coarse) <= capacity;
    if !fits(1) {
        let need = attend_rows_bound(levels, 1, coarse) as u64;
        return Err(FmaError::LimitExceeded {
            what: format!(
                "the coarse rows one fine block reads over its {} levels ({need} rows of \
                 head_dim {d}, up to 8 windows of p = {} rows per level)",
                levels.count(),
                levels.p
            ),
            requested: need * d as u64 * 4,
            max: capacity as u64 * d as u64 * 4,
            unit: BINDING_BYTES,
            advice: "use a smaller rank p or a larger block size m (fewer levels)".into(),
        });
    }
    let (mut lo, mut hi) = (1, most.max(1));
    while lo < hi {
        let mid = (lo + hi).div_ceil(2);
        if fits(mid) {
            lo = mid;
        } else {
            hi = mid - 1;
        }
    }
    Ok(lo)
}

/// Lays `ranges` (level index, level rows) out one after another from compact row 0.
fn layout(ranges: &[(usize, Range<usize>)]) -> Vec<Slice> {
    let mut at = 0;
    ranges
        .iter()
        .map(|(level, r)| {
            let s = Slice {
                level: *level,
                first: r.start,
                rows: r.len(),
                at,
            };
            at += r.len();
            s
        })
        .collect()
}

/// What the chunk-independent steps need to know of the head.
pub(crate) struct Head<'a> {
    pub plan: &'a FmaPlan,
    pub downsample: &'a Downsample,
    pub limits: &'a KernelLimits,
    pub capacity: usize,
}

impl Head<'_> {
    fn coarse(&self) -> bool {
        self.plan.merge.is_some()
    }

    /// The tensors the downsample pass pools: K, V (and Q).
    fn pooled(&self) -> Vec<CoarseTensor> {
        let mut t = vec![CoarseTensor::K, CoarseTensor::V];
        if self.coarse() {
            t.push(CoarseTensor::Q);
        }
        t
    }

    /// The downsample of level index `lvl` over windows `a`.
    fn downsample(&self, lvl: usize, a: &Range<usize>) -> Result<Dispatch> {
        let whole = self.plan.downsample[lvl];
        let (p, d) = (self.plan.levels.p, self.plan.shape.head_dim);
        let per_tensor = ((a.len() * p * d) as u64).div_ceil(whole.spec.wg as u64);
        let pooled = self.pooled().len() as u64;
        dispatch(
            whole.pass,
            Some(lvl as u32),
            pooled * per_tensor,
            whole.spec,
            self.limits,
        )
    }

    /// Tokens of windows `a` at level index `lvl`: the step's `lo..hi`.
    fn tokens(&self, lvl: usize, a: &Range<usize>) -> (usize, usize) {
        let w = self.plan.levels.levels[lvl].window;
        (a.start * w, (a.end * w).min(self.plan.shape.seq))
    }

    /// A step pooling windows `a` of level index `lvl` from the tokens of chunk `chunk`.
    pub fn pool_tokens(&self, lvl: usize, a: Range<usize>, chunk: usize) -> Result<CoarseStep> {
        let p = self.plan.levels.p;
        let layout = layout(&[(lvl, a.start * p..a.end * p)]);
        let (lo, hi) = self.tokens(lvl, &a);
        Ok(CoarseStep {
            lo,
            hi,
            chunk,
            save: self.pooled().into_iter().map(|t| (t, layout[0])).collect(),
            layout,
            load: Vec::new(),
            dispatches: vec![self.downsample(lvl, &a)?],
        })
    }

    /// A step pooling windows `a` of level index `lvl >= 1` from level `lvl - 1`'s rows
    /// (Average): loads the rows of their children, windows 2 a_lo .. 2 a_hi.
    fn pool_rows(&self, lvl: usize, a: Range<usize>) -> Result<CoarseStep> {
        let p = self.plan.levels.p;
        let below = self.plan.levels.levels[lvl - 1].windows;
        let children = 2 * a.start * p..(2 * a.end).min(below) * p;
        let layout = layout(&[(lvl - 1, children), (lvl, a.start * p..a.end * p)]);
        let (lo, hi) = self.tokens(lvl, &a);
        Ok(CoarseStep {
            lo,
            hi,
            chunk: 0,
            load: self.pooled().into_iter().map(|t| (t, layout[0])).collect(),
            save: self.pooled().into_iter().map(|t| (t, layout[1])).collect(),
            layout,
            dispatches: vec![self.downsample(lvl, &a)?],
        })
    }

    /// A step of coarse attention over the coarse queries of windows `a` at level index `lvl`:
    /// loads K~, V~ (and Q~) of windows a_lo - 3 .. a_hi + 3, saves o~ and lse~ of its own.
    fn attend_coarse(&self, lvl: usize, a: Range<usize>) -> Result<CoarseStep> {
        let p = self.plan.levels.p;
        let windows = self.plan.levels.levels[lvl].windows;
        let reach = a.start.saturating_sub(3)..(a.end + 3).min(windows);
        let layout = layout(&[(lvl, reach.start * p..reach.end * p)]);
        let own = layout[0].part(a.start * p..a.end * p);
        let whole = self.plan.coarse_attention[lvl];
        let total = ((a.len() * p) as u64).div_ceil(whole.spec.wg as u64);
        let (lo, hi) = self.tokens(lvl, &a);
        use CoarseTensor::*;
        Ok(CoarseStep {
            lo,
            hi,
            chunk: 0,
            load: [K, V, Q].into_iter().map(|t| (t, layout[0])).collect(),
            save: [Out, Lse].into_iter().map(|t| (t, own)).collect(),
            layout,
            dispatches: vec![dispatch(
                whole.pass,
                Some(lvl as u32),
                total,
                whole.spec,
                self.limits,
            )?],
        })
    }

    /// Windows `0..windows` in groups of at most `group` (>= 1).
    fn groups(windows: usize, group: usize) -> impl Iterator<Item = Range<usize>> {
        (0..windows)
            .step_by(group)
            .map(move |a| a..(a + group).min(windows))
    }

    /// Steps 1 and 2 of the module documentation after the token-pooled level 1 of Average
    /// mode (`first_level` 1; 0 in Learned mode, which pools every level from the tokens of
    /// the head's one binding, chunk 0).
    pub fn pool_steps(&self, first_level: usize) -> Result<Vec<CoarseStep>> {
        let (p, cap) = (self.plan.levels.p, self.capacity);
        let learned = matches!(self.downsample, Downsample::Learned(_));
        let mut steps = Vec::new();
        for (lvl, lv) in self.plan.levels.levels.iter().enumerate().skip(first_level) {
            if learned {
                for a in Self::groups(lv.windows, (cap / p).max(1)) {
                    steps.push(self.pool_tokens(lvl, a, 0)?);
                }
            } else {
                // G windows and their 2 G children.
                for a in Self::groups(lv.windows, (cap / (3 * p)).max(1)) {
                    steps.push(self.pool_rows(lvl, a)?);
                }
            }
        }
        if self.coarse() {
            for (lvl, lv) in self.plan.levels.levels.iter().enumerate() {
                let group = if lv.windows * p <= cap {
                    lv.windows
                } else {
                    (cap / p).saturating_sub(6).max(1)
                };
                for a in Self::groups(lv.windows, group) {
                    steps.push(self.attend_coarse(lvl, a)?);
                }
            }
        }
        Ok(steps)
    }

    /// Step 3 for chunk `chunk` of tokens `lo..hi` with its attention (and merge) dispatches.
    pub fn attend_step(
        &self,
        chunk: usize,
        lo: usize,
        hi: usize,
        dispatches: Vec<Dispatch>,
    ) -> CoarseStep {
        let (levels, p) = (&self.plan.levels, self.plan.levels.p);
        let coarse = self.coarse();
        let ranges: Vec<_> = (0..levels.count())
            .map(|lvl| {
                let a = attend_windows(levels, lvl, lo, hi, coarse);
                (lvl, a.start * p..a.end * p)
            })
            .collect();
        let layout = layout(&ranges);
        let tensors: &[CoarseTensor] = if coarse {
            &[CoarseTensor::Out, CoarseTensor::Lse]
        } else {
            &[CoarseTensor::K, CoarseTensor::V]
        };
        let load = layout
            .iter()
            .flat_map(|s| tensors.iter().map(move |&t| (t, *s)))
            .collect();
        CoarseStep {
            lo,
            hi,
            chunk,
            layout,
            load,
            save: Vec::new(),
            dispatches,
        }
    }

    /// Checks every step fits the compact buffers (a typed error, not a wrong binding).
    pub fn check(&self, steps: &[CoarseStep]) -> Result<()> {
        let d = self.plan.shape.head_dim as u64;
        match steps.iter().map(CoarseStep::rows).max() {
            Some(rows) if rows > self.capacity => Err(FmaError::LimitExceeded {
                what: format!("the coarse rows one step of a split head reads ({rows} rows)"),
                requested: rows as u64 * d * 4,
                max: self.capacity as u64 * d * 4,
                unit: BINDING_BYTES,
                advice: "use a smaller rank p or a larger block size m".into(),
            }),
            _ => Ok(()),
        }
    }
}
