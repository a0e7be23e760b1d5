//! The backward of a variable-length batch (`crate::Sequences`): the backward passes of a batch
//! of equal sequences, sized by the sequence table's totals (every sequence its own FMA, no
//! per-sequence dispatch), and for a padded batch a last pass that zeros the gradients' padding
//! rows.

use super::backward::{BackwardPlan, Work, BACKWARD_WG};
use super::dispatch::dispatch;
use super::forward::FmaPlan;
use super::limits::KernelLimits;
use super::pass::{Pass, SoftmaxFlags, Specialization};
use crate::config::FmaConfig;
use crate::error::Result;
use crate::sequences::{SeqLayout, Sequences};
use crate::storage::Storage;

impl BackwardPlan {
    /// Plans the backward of FMA of the variable-length batch `seqs` with `heads` query heads,
    /// `kv_heads` K/V heads and head dimension `d` (the forward of
    /// [`FmaPlan::for_sequences`]); the tensors must fit one binding each (a larger batch is a
    /// typed error: differentiate it in several calls).
    pub fn for_sequences(
        seqs: &Sequences,
        heads: usize,
        kv_heads: usize,
        d: usize,
        cfg: &FmaConfig,
        limits: &KernelLimits,
    ) -> Result<Self> {
        let forward = FmaPlan::for_sequences(seqs, heads, kv_heads, d, cfg, limits)?;
        let table = forward
            .sequences
            .as_ref()
            .expect("a variable-length plan has a sequence table");
        let kvh = kv_heads as u64;
        let p = forward.levels.p as u64;
        let work = Work {
            fine_tiles: kvh * table.tiles,
            level_windows: table
                .level_rows
                .iter()
                .map(|&rows| kvh * rows as u64 / p)
                .collect(),
            kv_elements: kvh * (seqs.total() * d) as u64,
            stats_rows: forward.shape.rows() as u64,
            group_partials: false,
        };
        let shape = forward.shape;
        // The table's copy follows the larger of the stats (2 per row) and dK~.
        let table_at = (2 * shape.rows()).max(forward.workspace.coarse_kv_bytes as usize / 4);
        let words = table.words.len();
        let mut plan = Self::build(forward, cfg, limits, work)?;
        plan.table_at = table_at;
        // The reader chunks' partial sums after the table's copy.
        plan.partials_at = plan.partials_at.max(table_at + words);
        limits.check_binding(
            "the backward's stats or dK~ with the sequence table",
            (plan.partials_at
                + plan
                    .partial_elements
                    .max(plan.forward.workspace.pool_partials_kv as usize)) as u64
                * 4,
            "differentiate fewer sequences or heads per call",
        )?;
        if seqs.layout != SeqLayout::Packed {
            let spec = Specialization {
                wg: BACKWARD_WG.min(limits.max_workgroup),
                bk: 1,
                d4: 1,
                grid: false,
                softmax: SoftmaxFlags::PLAIN,
                storage: Storage::F32,
            };
            let rows = shape.rows() as u64;
            plan.pad = Some(dispatch(
                Pass::PadGradients,
                None,
                rows.div_ceil(spec.wg as u64),
                spec,
                limits,
            )?);
        }
        Ok(plan)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shape::Shape;

    #[test]
    fn a_pack_is_differentiated_over_its_tokens() {
        // Two sequences of 64 + 100 tokens against one of 164: the same fine blocks of m = 16
        // up to the partial ones (4 + 7 against 11), and each sequence's own windows.
        let cfg = FmaConfig::new(16, 2);
        let seqs = Sequences::packed(vec![64, 100]).unwrap();
        let plan =
            BackwardPlan::for_sequences(&seqs, 4, 2, 16, &cfg, &KernelLimits::lavapipe()).unwrap();
        let one = BackwardPlan::new(
            Shape::new(1, 4, 164, 16).with_kv_heads(2),
            &cfg,
            &KernelLimits::lavapipe(),
        )
        .unwrap();
        assert_eq!(plan.dkv_fine.workgroups, one.dkv_fine.workgroups);
        assert_eq!(plan.dq.workgroups, plan.forward.attention.workgroups);
        // Level 1 (windows of m = 16): 4 + 7 windows per K/V head; level 2 (32): 2 + 4.
        assert_eq!(plan.dkv_coarse[0].workgroups, 2 * 11);
        assert_eq!(plan.dkv_coarse[1].workgroups, 2 * 6);
        assert!(plan.pad.is_none());
        let padded = Sequences::padded(100, vec![64, 100]).unwrap();
        let plan = BackwardPlan::for_sequences(&padded, 4, 2, 16, &cfg, &KernelLimits::lavapipe())
            .unwrap();
        assert_eq!(
            plan.pad.unwrap().workgroups,
            (2 * 4 * 100usize).div_ceil(64) as u32
        );
        assert_eq!(plan.dispatches().last().unwrap().pass, Pass::PadGradients);
    }
}
