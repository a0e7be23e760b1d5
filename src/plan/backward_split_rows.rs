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
            let per = if k > 1 { fit.max(1) as usize } else { lv.windows };
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
