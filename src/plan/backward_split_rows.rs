//! The coarse dK~/dV~ of a split head's level in groups of rows (issue 27): the reader chunks'
//! partial sums of a level (its rows times their reader chunks, 27 cells' readers per row on a
//! 2D grid: about 27 n p / 256 rows) outgrow a binding long before the head's coarse rows do,
//! so [`super::BackwardSplitPlan`] runs each level of more than one reader chunk in groups of
//! whole windows whose partial sums fit one binding after dK~'s rows. Per group, in group
//! order: every chunk's `backward_dkv_coarse` over the group's rows (adding to the earlier
//! chunks' partial sums), then the combine rounds of the group's rows. The groups share the
//! partial sums' space (`params.partials_at`, the group's first row `params.dkv_row_lo`, its
//! rows `params.dkv_rows`).
//!
//! A row's sums are the same float operations in the same order whatever its group: the
//! grouped run is the ungrouped run's bits (a group is only where its partials sit).
//!
//! Each chunk's dispatch covers only what it can add to ([`DkvRowGroup::chunks`]): the first
//! chunk every row of the group (it writes every row's partial sums; later chunks add), a
//! later chunk the group's windows whose far-field readers may lie among its tokens
//! ([`reader_windows`]). A row a later chunk skips would have received a sum of no reader,
//! +0 (each workgroup's sums start at 0 and a reader outside the chunk adds nothing), and
//! x + 0 is x: the bits stay those of a dispatch over the whole group, which walked every
//! row's readers in every chunk only to skip them (perf.md change 33: 10x the pass's walk at
//! 10 chunks).

use std::ops::Range;

use super::backward::{dkv_level_steps, partial_group_windows, BackwardPlan};
use super::split::Chunk;
use crate::error::Result;
use crate::levels::Level;
use crate::plan::{Dispatch, KernelLimits};

/// One chunk's dispatch of a [`DkvRowGroup`]'s coarse dK~/dV~.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DkvChunkRows {
    /// Its rows of the level (whole windows, within the group's; `params.dkv_first`).
    pub rows: Range<usize>,
    /// The pass over those rows' windows (the group's `dkv_coarse` for the whole group).
    pub dkv_coarse: Dispatch,
}

/// One group of a level's coarse rows in a split head's backward.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DkvRowGroup {
    /// Level index (l - 1).
    pub level: usize,
    /// Its rows of the level (whole windows: row a p + j is sub-window j of window a).
    pub rows: Range<usize>,
    /// dK~, dV~ of its rows over one chunk's readers, every row of the group.
    pub dkv_coarse: Dispatch,
    /// Per chunk of the split head, in chunk order, its dispatch of the pass (module header):
    /// the first chunk's over every row ([`DkvRowGroup::dkv_coarse`]), a later chunk's over
    /// the group's windows whose readers may lie among its tokens; `None` where there are
    /// none. Empty until the split plan fills it (`restrict_to_chunks`).
    pub chunks: Vec<Option<DkvChunkRows>>,
    /// The rounds that add its rows' reader chunks' partial sums (none for one chunk).
    pub combine: Vec<Dispatch>,
}

/// The windows of level `lv` holding a coarse row that a query among tokens `lo..hi` (not
/// empty) may read: 1D, windows of w_l tokens, whose far lists reach 3 windows either way
/// (`levels::far_list`: offsets -3..=3); on a grid of width `grid_w`, cells of side s_l in
/// raster order, whose far cells reach 3 cell rows either way (`GridGeometry::far_cells`: rows
/// 2(A/2) - 2 ..= 2(A/2) + 3), so whole cell rows. A superset, clipped to the level.
pub fn reader_windows(lo: usize, hi: usize, lv: &Level, grid_w: Option<usize>) -> Range<usize> {
    debug_assert!(lo < hi);
    let (first, last, per_row) = match grid_w {
        None => (lo / lv.window, (hi - 1) / lv.window, 1),
        Some(w) => (
            lo / w / lv.window,
            (hi - 1) / w / lv.window,
            w.div_ceil(lv.window),
        ),
    };
    let start = (first.saturating_sub(3) * per_row).min(lv.windows);
    let end = ((last + 4) * per_row).min(lv.windows);
    start..end
}

/// Fills each group's [`DkvRowGroup::chunks`] for the split head's `chunks` (module header):
/// the first chunk the whole group, a later one the group's windows of [`reader_windows`] of
/// its tokens, each a dispatch of the group's pass over those windows alone.
pub(super) fn restrict_to_chunks(
    groups: &mut [Vec<DkvRowGroup>],
    head: &BackwardPlan,
    chunks: &[Chunk],
    limits: &KernelLimits,
) -> Result<()> {
    let p = head.forward.levels.p;
    let grid_w = head.forward.grid.map(|g| g.w);
    for g in groups.iter_mut().flatten() {
        let lv = &head.forward.levels.levels[g.level];
        let group = g.rows.start / p..g.rows.end / p;
        let k = g.dkv_coarse.args[0] as u64;
        let specs = (
            g.dkv_coarse.spec,
            g.combine.first().map_or(g.dkv_coarse.spec, |c| c.spec),
        );
        g.chunks = chunks
            .iter()
            .enumerate()
            .map(|(i, c)| {
                if i == 0 {
                    return Ok(Some(DkvChunkRows {
                        rows: g.rows.clone(),
                        dkv_coarse: g.dkv_coarse,
                    }));
                }
                let near = reader_windows(c.lo, c.hi, lv, grid_w);
                let (a, b) = (near.start.max(group.start), near.end.min(group.end));
                if a >= b {
                    return Ok(None);
                }
                let (dkv_coarse, _) = dkv_level_steps(
                    g.dkv_coarse.pass,
                    g.level,
                    (b - a) as u64,
                    (k, p as u64),
                    specs,
                    limits,
                )?;
                Ok(Some(DkvChunkRows {
                    rows: a * p..b * p,
                    dkv_coarse,
                }))
            })
            .collect::<Result<Vec<_>>>()?;
    }
    Ok(())
}

/// Per level of `head` (one head of fine queries, planned with `Work::group_partials`), its
/// groups of rows in order: one (the whole level, `head`'s own dispatches) for a level of one
/// reader chunk or whose partial sums fit, else groups of the most windows whose partial sums
/// fit one binding after dK~'s rows (at least one window: `head`'s binding check refuses a
/// head where not even that fits).
pub(super) fn dkv_row_groups(
    head: &BackwardPlan,
    limits: &KernelLimits,
) -> Result<Vec<Vec<DkvRowGroup>>> {
    let p = head.forward.levels.p;
    let d = head.forward.shape.head_dim as u64;
    head.dkv_coarse
        .iter()
        .zip(&head.dkv_combine)
        .zip(&head.forward.levels.levels)
        .enumerate()
        .map(|(level, ((step, rounds), lv))| {
            let k = step.args[0] as u64;
            let fit = partial_group_windows(head.partials_at as u64, k * p as u64, d, limits);
            let per = if k > 1 {
                fit.max(1) as usize
            } else {
                lv.windows
            };
            if per >= lv.windows {
                return Ok(vec![DkvRowGroup {
                    level,
                    rows: 0..lv.windows * p,
                    dkv_coarse: *step,
                    chunks: Vec::new(),
                    combine: rounds.clone(),
                }]);
            }
            let combine_spec = rounds.first().map_or(step.spec, |r| r.spec);
            (0..lv.windows)
                .step_by(per)
                .map(|a| {
                    let windows = per.min(lv.windows - a);
                    let specs = (step.spec, combine_spec);
                    let (dkv_coarse, combine) = dkv_level_steps(
                        step.pass,
                        level,
                        windows as u64,
                        (k, p as u64),
                        specs,
                        limits,
                    )?;
                    Ok(DkvRowGroup {
                        level,
                        rows: a * p..(a + windows) * p,
                        dkv_coarse,
                        chunks: Vec::new(),
                        combine,
                    })
                })
                .collect()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::FmaConfig;
    use crate::geometry::Grid;
    use crate::plan::{BackwardSplitPlan, Pass};

    /// Split heads whose partial sums of some level exceed the binding after dK~'s rows: 1D
    /// (n = 2000, m = 16, p = 2, d = 8, 16 KiB) both masks, and 2D grids (r = 4, p = 2, d = 4)
    /// of 40 x 40 under 8 KiB and 45 x 70 under 16 KiB (refused before: "partial sums").
    fn cases() -> Vec<(usize, usize, FmaConfig, u64)> {
        let line = |causal| FmaConfig {
            causal,
            ..FmaConfig::new(16, 2)
        };
        let grid = |h, w| FmaConfig::new(4, 2).grid(Some(Grid::new(h, w)));
        vec![
            (2000, 8, line(false), 16 << 10),
            (2000, 8, line(true), 16 << 10),
            (1600, 4, grid(40, 40), 8 << 10),
            (3150, 4, grid(45, 70), 16 << 10),
        ]
    }

    #[test]
    fn groups_cover_each_level_in_whole_windows_and_fit_one_binding() {
        for (n, d, cfg, cap) in cases() {
            let limits = KernelLimits::with_binding(cap);
            let label = format!(
                "n {n} d {d} grid {:?} causal {} cap {cap}",
                cfg.grid, cfg.causal
            );
            let plan = BackwardSplitPlan::new(n, d, &cfg, &limits).expect(&label);
            let head = &plan.head;
            let p = head.forward.levels.p;
            // The scratch (dK~'s rows, then one group's partial sums) fits the binding.
            assert!(
                ((head.partials_at + head.partial_elements) * 4) as u64 <= cap,
                "{label}"
            );
            assert_eq!(plan.dkv_groups.len(), head.dkv_coarse.len(), "{label}");
            let mut over = 0;
            for (l, groups) in plan.dkv_groups.iter().enumerate() {
                let lv = &head.forward.levels.levels[l];
                let whole = head.dkv_coarse[l];
                let k = whole.args[0] as usize;
                // Before: the level's partial sums whole after dK~'s rows.
                over += usize::from(
                    k > 1 && ((head.partials_at + lv.windows * p * k * d) * 4) as u64 > cap,
                );
                let mut next = 0;
                let mut workgroups = 0;
                for g in groups {
                    assert_eq!(g.level, l, "{label}");
                    assert_eq!(g.rows.start, next, "{label}: level {l} rows in order");
                    assert_eq!(g.rows.start % p, 0, "{label}: whole windows");
                    next = g.rows.end;
                    if k > 1 {
                        assert!(g.rows.len() * k * d <= head.partial_elements, "{label}");
                    }
                    assert_eq!(g.dkv_coarse.args, whole.args, "{label}");
                    assert_eq!(g.dkv_coarse.spec, whole.spec, "{label}");
                    // The rounds of the level's tree (same chunks, strides), over its rows.
                    let strides = |r: &[Dispatch]| r.iter().map(|c| c.args).collect::<Vec<_>>();
                    assert_eq!(
                        strides(&g.combine),
                        strides(&head.dkv_combine[l]),
                        "{label}"
                    );
                    workgroups += g.dkv_coarse.workgroups;
                }
                assert_eq!(next, lv.windows * p, "{label}: level {l} covered");
                // Every (window, rows, reader chunk) workgroup of the level once.
                assert_eq!(workgroups, whole.workgroups, "{label}: level {l}");
                if groups.len() == 1 {
                    assert_eq!(groups[0].dkv_coarse, whole, "{label}");
                    assert_eq!(groups[0].combine, head.dkv_combine[l], "{label}");
                }
            }
            assert!(
                over > 0,
                "{label}: no level's partial sums exceeded the binding"
            );
            // Each group's coarse pass runs in the chunks that may add to it (the first in
            // all); the group's rounds follow.
            let passes = plan.passes();
            let count = |x: Pass| passes.iter().filter(|&&y| y == x).count();
            let groups: usize = plan.dkv_groups.iter().map(Vec::len).sum();
            let rounds: usize = plan
                .dkv_groups
                .iter()
                .flatten()
                .map(|g| g.combine.len())
                .sum();
            assert!(
                groups > head.dkv_coarse.len(),
                "{label}: no level in groups"
            );
            let runs: usize = plan
                .dkv_groups
                .iter()
                .flatten()
                .map(|g| g.chunks.iter().flatten().count())
                .sum();
            assert!(
                runs >= groups && runs <= plan.chunks.len() * groups,
                "{label}"
            );
            assert_eq!(count(Pass::BackwardDkvCoarse), runs, "{label}");
            assert_eq!(count(Pass::BackwardDkvCombine), rounds, "{label}");
        }
    }

    /// Each chunk's dispatch of a group covers every row of the group that a query among its
    /// tokens reads (the reference's geometry, query by query: `Geometry::coarse_rows`), the
    /// first chunk the whole group, in whole windows, and the dispatch is sized for its rows;
    /// and some later chunk skips rows (else the restriction saves nothing). Cases: those
    /// above, the 1D head both masks, and a 120 x 80 grid in several chunks.
    #[test]
    fn each_chunk_covers_the_rows_its_queries_read() {
        use crate::geometry::{effective_cell, Geometry, GridGeometry, Line};
        let mut all = cases();
        all.push((
            9600,
            4,
            FmaConfig::new(4, 2).grid(Some(Grid::new(120, 80))),
            32 << 10,
        ));
        let mut skipped = 0;
        for (n, d, cfg, cap) in all {
            let limits = KernelLimits::with_binding(cap);
            let plan = BackwardSplitPlan::new(n, d, &cfg, &limits).unwrap();
            let label = format!("n {n} grid {:?} causal {}", cfg.grid, cfg.causal);
            let geometry: Box<dyn Geometry> = match cfg.grid {
                None => Box::new(Line::new(n, cfg.block, cfg.rank, cfg.causal)),
                Some(g) => {
                    let (r, p) = effective_cell(g, cfg.block, cfg.rank);
                    Box::new(GridGeometry::new(g, r, p))
                }
            };
            let p = plan.head.forward.levels.p;
            for g in plan.dkv_groups.iter().flatten() {
                assert_eq!(g.chunks.len(), plan.split.chunks.len(), "{label}");
                let first = g.chunks[0].as_ref().expect("the first chunk runs");
                assert_eq!(first.rows, g.rows, "{label}");
                for (c, run) in plan.split.chunks.iter().zip(&g.chunks).skip(1) {
                    let rows = run.as_ref().map_or(0..0, |r| r.rows.clone());
                    if let Some(r) = run {
                        assert!(r.rows.start % p == 0 && r.rows.end % p == 0, "{label}");
                        assert!(
                            g.rows.start <= r.rows.start && r.rows.end <= g.rows.end,
                            "{label}"
                        );
                        // Its workgroups: the group's per window, for its windows.
                        let per_window = g.dkv_coarse.workgroups / (g.rows.len() / p) as u32;
                        assert_eq!(
                            r.dkv_coarse.workgroups,
                            per_window * (r.rows.len() / p) as u32,
                            "{label}"
                        );
                    }
                    skipped += g.rows.len() - rows.len();
                    for t in c.lo..c.hi {
                        for row in geometry.coarse_rows(t, g.level + 1) {
                            assert!(
                                !g.rows.contains(&row) || rows.contains(&row),
                                "{label}: level {} row {row} read by token {t}, chunk {}..{} \
                                 covers {rows:?}",
                                g.level + 1,
                                c.lo,
                                c.hi
                            );
                        }
                    }
                }
            }
        }
        assert!(skipped > 0, "no chunk skipped a row");
    }

    #[test]
    fn partial_sums_that_fit_keep_whole_levels() {
        // 3001 tokens of width 8 under 32 KiB: every level's partial sums fit after dK~'s.
        let limits = KernelLimits::with_binding(32 << 10);
        let plan = BackwardSplitPlan::new(3001, 8, &FmaConfig::new(16, 2), &limits).unwrap();
        assert!(plan.split.chunks.len() > 1);
        for (l, groups) in plan.dkv_groups.iter().enumerate() {
            assert_eq!(groups.len(), 1);
            assert_eq!(groups[0].dkv_coarse, plan.head.dkv_coarse[l]);
            assert_eq!(groups[0].combine, plan.head.dkv_combine[l]);
        }
    }

    #[test]
    fn a_binding_without_room_for_one_window_is_a_typed_error() {
        // A 97 x 1 grid under 4 KiB: dK~'s rows and one window's partial sums exceed it.
        let cfg = FmaConfig::new(4, 1).grid(Some(Grid::new(97, 1)));
        let e = BackwardSplitPlan::new(97, 8, &cfg, &KernelLimits::with_binding(4 << 10));
        assert!(
            matches!(&e, Err(crate::error::FmaError::LimitExceeded { what, advice, .. })
                if what.contains("partial sums") && advice.contains("one group")),
            "{e:?}"
        );
    }
}
