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

use std::ops::Range;

use super::backward::{dkv_level_steps, partial_group_windows, BackwardPlan};
use crate::error::Result;
use crate::plan::{Dispatch, KernelLimits};

/// One group of a level's coarse rows in a split head's backward.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DkvRowGroup {
    /// Level index (l - 1).
    pub level: usize,
    /// Its rows of the level (whole windows: row a p + j is sub-window j of window a).
    pub rows: Range<usize>,
    /// dK~, dV~ of its rows over one chunk's readers: every chunk runs it, in chunk order.
    pub dkv_coarse: Dispatch,
    /// The rounds that add its rows' reader chunks' partial sums (none for one chunk).
    pub combine: Vec<Dispatch>,
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
            // Every chunk runs every group's coarse pass; the group's rounds follow.
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
            assert_eq!(count(Pass::BackwardDkvCoarse), plan.chunks.len() * groups);
            assert_eq!(count(Pass::BackwardDkvCombine), rounds, "{label}");
        }
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
