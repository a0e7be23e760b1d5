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
use super::forward::{pool_level, FmaPlan, POOL_TAPS};
use super::limits::{KernelLimits, BINDING_BYTES};
use super::pass::Pass;
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

    /// Rows of partial sums a Learned pooling step in tap chunks writes after the compact
    /// rows (`params.partials_at`): its rows times its chunks; 0 for any other step.
    pub fn partial_rows(&self) -> usize {
        let own = self.layout.last().map_or(0, |s| s.rows);
        self.dispatches
            .iter()
            .filter(|d| d.pass == Pass::Downsample && d.args[0] > 1)
            .map(|d| own * d.args[0] as usize)
            .max()
            .unwrap_or(0)
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
    let (first, last) = ((lo / m) >> lvl, (hi.div_ceil(m) - 1) >> lvl);
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
    fn downsample(&self, lvl: usize, a: &Range<usize>) -> Result<Vec<Dispatch>> {
        let whole = self.plan.downsample[lvl];
        let (p, d) = (self.plan.levels.p, self.plan.shape.head_dim);
        // The head's chunks of learned taps (one in Average mode), so the rows get the bits
        // of an unsplit run: the same chunks, added by the same tree.
        let chunks = whole.args[0].max(1) as u64;
        let taps = (chunks > 1).then_some(chunks * POOL_TAPS as u64);
        let coarse_q = self.pooled().len() == 3;
        let pool = pool_level(
            lvl,
            (a.len() * p) as u64,
            (1, 1, coarse_q),
            d as u64,
            taps,
            whole.spec,
            self.limits,
        )?;
        Ok(std::iter::once(pool.downsample)
            .chain(pool.combine)
            .collect())
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
            dispatches: self.downsample(lvl, &a)?,
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
            dispatches: self.downsample(lvl, &a)?,
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
                // Each window's rows and, in tap chunks, its partial sums in the compact rows.
                let chunks = self.plan.downsample[lvl].args[0] as usize;
                let per_window = if chunks > 1 { p * (1 + chunks) } else { p };
                for a in Self::groups(lv.windows, (cap / per_window).max(1)) {
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
        match steps.iter().map(|s| s.rows() + s.partial_rows()).max() {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{FmaConfig, Queries};
    use crate::levels::{far_list, Levels};
    use crate::plan::SplitPlan;
    use crate::weights::LearnedWeights;
    use std::collections::HashSet;

    const SMALL: u64 = 16 << 10;

    fn limits(binding: u64) -> KernelLimits {
        KernelLimits::with_binding(binding)
    }

    /// (config, n, d) whose coarse rows exceed 16 KiB: tokens shared (1000 x 4) or split too
    /// (3000 x 4); fine and coarse queries, causal, Learned.
    fn cases() -> Vec<(FmaConfig, usize, usize)> {
        let learned = |d, m, p, n| Downsample::Learned(LearnedWeights::box_init_for(d, m, p, n));
        vec![
            (FmaConfig::new(2, 2), 1000, 4),
            (FmaConfig::new(2, 2).causal(true), 1000, 4),
            (FmaConfig::new(2, 2).queries(Queries::Coarse), 1000, 4),
            (FmaConfig::new(4, 2), 3000, 4),
            (FmaConfig::new(4, 2).causal(true), 3001, 4),
            (FmaConfig::new(4, 2).queries(Queries::Coarse), 3000, 4),
            (
                FmaConfig::new(1, 1).downsample(learned(4, 1, 1, 600)),
                600,
                4,
            ),
        ]
    }

    fn plan(cfg: &FmaConfig, n: usize, d: usize) -> SplitPlan {
        SplitPlan::new(n, d, cfg, &limits(SMALL)).unwrap()
    }

    /// Every row of `s`, as (level, row).
    fn rows(s: &Slice) -> impl Iterator<Item = (usize, usize)> + '_ {
        s.level_rows().map(move |r| (s.level, r))
    }

    /// Whether `copies` hold row `row` of level `level` of tensor `t`.
    fn holds(copies: &[(CoarseTensor, Slice)], t: CoarseTensor, level: usize, row: usize) -> bool {
        copies
            .iter()
            .any(|(ct, s)| *ct == t && s.level == level && s.level_rows().contains(&row))
    }

    #[test]
    fn the_coarse_rows_split_only_when_they_exceed_a_binding_and_small_heads_share_their_tokens() {
        // 1000 x 4: tokens 16 000 B fit 16 KiB; 998 windows x p = 2 coarse rows of 16 B do not.
        let p = plan(&FmaConfig::new(2, 2), 1000, 4);
        assert!(head_coarse_exceeds_binding(1000, 4, 2, 2, &limits(SMALL)));
        let coarse = p.coarse.as_ref().unwrap();
        assert!(p.shared_tokens && p.chunks.len() > 1);
        assert_eq!(coarse.capacity, 1024);
        assert_eq!(coarse.attend.len(), p.chunks.len());
        assert!(p.chunks.iter().all(|c| (c.row_base, c.rows) == (0, 1000)));
        assert!(p.chunks.iter().all(|c| c.downsample.is_empty()));
        assert!(p.shared_steps().is_empty() && p.token_levels == 0);
        let mut next = 0;
        for c in &p.chunks {
            assert_eq!(c.lo, next);
            next = c.hi;
        }
        assert_eq!(next, 1000);
        // p = 1 halves them (15 968 B): no coarse split, one chunk.
        let one = plan(&FmaConfig::new(2, 1), 1000, 4);
        assert!(one.coarse.is_none() && one.chunks.len() == 1);
        // Long heads keep their halo'd token bindings.
        let long = plan(&FmaConfig::new(4, 2), 3000, 4);
        assert!(!long.shared_tokens && long.coarse.is_some());
        assert!(long.chunks.iter().all(|c| c.rows * 16 <= SMALL as usize));
    }

    #[test]
    fn a_slices_row_offset_lands_the_shaders_indices_on_its_compact_rows() {
        for (first, at) in [
            (0, 0),
            (5, 0),
            (7, 300),
            (1 << 31, 12),
            (u32::MAX as usize, 0),
        ] {
            let s = Slice {
                level: 0,
                first,
                rows: 1,
                at,
            };
            assert_eq!(s.row_offset().wrapping_add(first as u32), at as u32);
            // A row index times d, as the shaders compute it, wraps onto the same element.
            let d = 12u32;
            let idx = s.row_offset().wrapping_add(first as u32).wrapping_mul(d) + 5;
            assert_eq!(idx as usize, at * 12 + 5);
        }
    }

    #[test]
    fn every_step_fits_its_compact_buffers_and_copies_only_its_layout() {
        for (cfg, n, d) in cases() {
            let p = plan(&cfg, n, d);
            let coarse = p.coarse.as_ref().unwrap_or_else(|| panic!("{cfg:?} {n}"));
            assert_eq!(coarse.capacity, SMALL as usize / (4 * d));
            for step in coarse.pool.iter().chain(&coarse.attend) {
                assert!(step.rows() <= coarse.capacity, "{cfg:?} {step:?}");
                let mut used = HashSet::new();
                let mut levels = HashSet::new();
                for s in &step.layout {
                    assert!(levels.insert(s.level), "a level twice in one layout");
                    for r in s.at..s.at + s.rows {
                        assert!(used.insert(r), "compact row {r} twice");
                    }
                }
                for (_, c) in step.load.iter().chain(&step.save) {
                    let home = step.layout.iter().find(|s| s.level == c.level).unwrap();
                    assert!(home.first <= c.first && c.first + c.rows <= home.first + home.rows);
                    assert_eq!(c.row_offset(), home.row_offset(), "moved inside its layout");
                }
                assert!(step.chunk < p.chunks.len());
                assert!(step.lo < step.hi && step.hi <= n);
            }
        }
    }

    #[test]
    fn pooling_saves_every_row_once_after_the_rows_it_reads() {
        use CoarseTensor::*;
        for (cfg, n, d) in cases() {
            let p = plan(&cfg, n, d);
            let coarse = p.coarse.as_ref().unwrap();
            let levels = &p.head.levels;
            let coarse_q = p.head.merge.is_some();
            let learned = matches!(cfg.downsample, Downsample::Learned(_));
            let mut saved = HashSet::new();
            for step in &coarse.pool {
                for (t, s) in &step.load {
                    for (l, r) in rows(s) {
                        assert!(
                            saved.contains(&(*t, l, r)),
                            "{cfg:?}: {t:?} {l} {r} unsaved"
                        );
                    }
                }
                for (t, s) in &step.save {
                    for (l, r) in rows(s) {
                        assert!(
                            saved.insert((*t, l, r)),
                            "{cfg:?}: {t:?} {l} {r} saved twice"
                        );
                        let (a, lv) = (r / levels.p, levels.levels[l]);
                        if matches!(t, K | V | Q) && l > 0 && !learned {
                            // Average pools from the children, windows 2a and 2a + 1.
                            let below = levels.levels[l - 1].windows;
                            for child in [2 * a, 2 * a + 1].into_iter().filter(|&c| c < below) {
                                for j in 0..levels.p {
                                    let row = child * levels.p + j;
                                    assert!(holds(&step.load, *t, l - 1, row), "{cfg:?}: child");
                                }
                            }
                        }
                        if *t == Out {
                            // Coarse attention reads the far list of its window.
                            for b in far_list(a, false, lv.windows) {
                                for j in 0..levels.p {
                                    assert!(holds(&step.load, K, l, b * levels.p + j));
                                    assert!(holds(&step.load, V, l, b * levels.p + j));
                                }
                            }
                            assert!(holds(&step.load, Q, l, r));
                        }
                    }
                }
            }
            let mut tensors = vec![K, V];
            if coarse_q {
                tensors.extend([Q, Out, Lse]);
            }
            for t in tensors {
                for (l, lv) in levels.levels.iter().enumerate() {
                    for r in 0..lv.rows(levels.p) {
                        assert!(
                            saved.contains(&(t, l, r)),
                            "{cfg:?}: {t:?} {l} {r} never saved"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn each_chunk_loads_every_row_its_queries_read() {
        use CoarseTensor::*;
        for (cfg, n, d) in cases() {
            let p = plan(&cfg, n, d);
            let coarse = p.coarse.as_ref().unwrap();
            let (levels, m) = (&p.head.levels, p.head.levels.m);
            for (c, step) in p.chunks.iter().zip(&coarse.attend) {
                assert_eq!((step.lo, step.hi), (c.lo, c.hi));
                assert_eq!(step.dispatches[0], c.attention);
                for i in c.lo..c.hi {
                    for (l, lv) in levels.levels.iter().enumerate() {
                        if p.head.merge.is_some() {
                            let sub = (i % lv.window) / (lv.window / levels.p);
                            let row = i / lv.window * levels.p + sub;
                            assert!(holds(&step.load, Out, l, row));
                            assert!(holds(&step.load, Lse, l, row));
                        } else {
                            for b in far_list(i / m * m / lv.window, cfg.causal, lv.windows) {
                                for j in 0..levels.p {
                                    assert!(holds(&step.load, K, l, b * levels.p + j));
                                    assert!(holds(&step.load, V, l, b * levels.p + j));
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn the_row_bound_holds_for_every_chunk_position() {
        for (n, m, p) in [(1000, 2, 2), (3001, 4, 2), (5000, 1, 1), (777, 3, 3)] {
            let levels = Levels::new(n, m, p);
            for k in [1, 2, 3, 7, 16, 40] {
                for coarse in [false, true] {
                    let bound = attend_rows_bound(&levels, k, coarse);
                    for lo in (0..n).step_by(m) {
                        let hi = (lo + k * m).min(n);
                        let rows: usize = (0..levels.count())
                            .map(|l| attend_windows(&levels, l, lo, hi, coarse).len() * p)
                            .sum();
                        assert!(rows <= bound, "n={n} m={m} k={k} lo={lo}");
                    }
                }
            }
            // The chunk is the largest within the bound.
            let k = blocks_per_chunk(&levels, 1000, 200, false, 4).unwrap();
            assert!(attend_rows_bound(&levels, k, false) <= 200);
            assert!(k == 1000 || attend_rows_bound(&levels, k + 1, false) > 200);
        }
    }

    #[test]
    fn a_binding_too_small_for_one_blocks_far_rows_is_a_typed_error() {
        // 100 000 tokens, m = 4, p = 4: 14 levels of up to 8 windows of 4 rows of 256 B each
        // (about 112 KiB) for one block, under a 64 KiB binding.
        let e = SplitPlan::new(100_000, 64, &FmaConfig::new(4, 4), &limits(64 << 10)).unwrap_err();
        match e {
            FmaError::LimitExceeded {
                max, unit, advice, ..
            } => {
                assert_eq!((max, unit), (64 << 10, BINDING_BYTES));
                assert!(advice.contains("smaller rank p"), "{advice}");
            }
            other => panic!("expected LimitExceeded, got {other:?}"),
        }
    }
}
