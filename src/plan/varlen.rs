//! Plans of a variable-length batch (`crate::Sequences`): the same passes as a batch of equal
//! sequences, with dispatches sized by the sequence table's totals instead of heads times one
//! sequence's work, so a pack of tens of thousands of short sequences, or one long sequence
//! beside short ones, costs its tokens and not its longest sequence times its count.

use super::dense::DensePlan;
use super::dense_tiled::DenseKernel;
use super::dispatch::{dispatch, Dispatch, MERGE_WG};
use super::fine_tiled::FmaKernel;
use super::forward::{pool_level, FmaPlan, Workspace};
use super::limits::KernelLimits;
use super::pass::{Pass, SoftmaxFlags, Specialization};
use super::sequences::SeqTable;
use crate::config::{FmaConfig, Queries};
use crate::error::{FmaError, Result};
use crate::sequences::{SeqLayout, Sequences};
use crate::shape::Shape;
use crate::storage::Storage;
use crate::variants::HeadSpan;

/// Checks that each tensor of the batch fits one storage binding (a variable-length batch is
/// not split across bindings).
fn check_batch(shape: Shape, limits: &KernelLimits) -> Result<()> {
    let advice = "split the batch into several calls of fewer sequences";
    limits.check_binding("a Q or O tensor", shape.elements() as u64 * 4, advice)?;
    limits.check_binding("a K or V tensor", shape.kv_elements() as u64 * 4, advice)
}

/// The shape of one sequence of `n` tokens with the batch's heads.
fn one(shape: Shape, n: usize) -> Shape {
    Shape::new(1, shape.heads, n.max(1), shape.head_dim).with_kv_heads(shape.kv_heads)
}

/// The padding fill of a padded batch: one invocation per row of O.
fn pad_dispatch(seqs: &Sequences, shape: Shape, limits: &KernelLimits) -> Result<Option<Dispatch>> {
    if seqs.layout == SeqLayout::Packed {
        return Ok(None);
    }
    let spec = Specialization {
        wg: MERGE_WG.min(limits.max_workgroup),
        bk: 1,
        d4: 1,
        grid: false,
        softmax: SoftmaxFlags::PLAIN,
        storage: Storage::F32,
    };
    let total = (shape.rows() as u64).div_ceil(spec.wg as u64);
    dispatch(Pass::PadRows, None, total, spec, limits).map(Some)
}

impl FmaPlan {
    /// Plans FMA of the variable-length batch `seqs` with `heads` query heads, `kv_heads` K/V
    /// heads and head dimension `d`: the levels, tiles and specialisations of its longest
    /// sequence, dispatches over every sequence's own work.
    pub fn for_sequences(
        seqs: &Sequences,
        heads: usize,
        kv_heads: usize,
        d: usize,
        cfg: &FmaConfig,
        limits: &KernelLimits,
    ) -> Result<Self> {
        Self::for_sequences_with(seqs, (heads, kv_heads, d), cfg, limits, FmaKernel::Rows)
    }

    /// [`FmaPlan::for_sequences`] (heads, K/V heads and head dimension as one tuple) with the
    /// fused fine-query pass of shape `kernel` ([`crate::plan::fine_kernel_spec`]).
    pub fn for_sequences_with(
        seqs: &Sequences,
        (heads, kv_heads, d): (usize, usize, usize),
        cfg: &FmaConfig,
        limits: &KernelLimits,
        kernel: FmaKernel,
    ) -> Result<Self> {
        if let Some(grid) = cfg.grid {
            return Err(FmaError::InvalidConfig {
                what: "grid",
                value: grid.to_string(),
                allowed: "none: a variable-length batch is a batch of 1D sequences (a 2D grid \
                          fixes the sequence length to H W)"
                    .into(),
            });
        }
        let shape = seqs.shape(heads, kv_heads, d);
        shape.validate()?;
        check_batch(shape, limits)?;
        let base = FmaPlan::without_tensor_bindings(
            one(shape, seqs.max_len()),
            cfg,
            limits,
            false,
            kernel,
        )?;
        let (m, tpb) = (base.levels.m, base.tiles_per_block);
        let table = SeqTable::new(seqs, heads, kv_heads, Some(&base.levels), |n| {
            n.div_ceil(m) as u64 * tpb as u64
        })?;
        let coarse_rows = table.coarse_rows();
        let coarse_bytes = (heads * coarse_rows * d) as u64 * 4;
        let coarse_kv_bytes = (kv_heads * coarse_rows * d) as u64 * 4;
        limits.check_binding(
            "the coarse keys of all levels",
            coarse_bytes,
            "use a larger block size m or a smaller rank p, or fewer sequences per call",
        )?;
        let h = heads as u64;
        let attention = dispatch(
            base.attention.pass,
            None,
            h * table.tiles,
            base.attention.spec,
            limits,
        )?;
        let coarse_q = cfg.queries == Queries::Coarse;
        // Learned taps clipped at the longest sequence, as the base plan's.
        let learned = matches!(cfg.downsample, crate::config::Downsample::Learned(_));
        let pools = base
            .downsample
            .iter()
            .zip(&base.levels.levels)
            .zip(&table.level_rows)
            .enumerate()
            .map(|(i, ((ds, lv), &rows))| {
                let taps = learned.then(|| lv.window.min(seqs.max_len()) as u64);
                pool_level(
                    i,
                    rows as u64,
                    (kv_heads as u64, heads as u64, coarse_q),
                    d as u64,
                    taps,
                    ds.spec,
                    limits,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        let pool_partials_kv = pools.iter().map(|l| l.kv_partials).max().unwrap_or(0);
        let pool_partials_q = pools.iter().map(|l| l.q_partials).max().unwrap_or(0);
        limits.check_binding(
            "the coarse keys with the downsampling's partial sums",
            coarse_kv_bytes + pool_partials_kv * 4,
            "use a larger block size m or a smaller rank p, or fewer sequences per call",
        )?;
        limits.check_binding(
            "the coarse queries with the downsampling's partial sums",
            coarse_bytes + pool_partials_q * 4,
            "use a larger block size m or a smaller rank p, or fewer sequences per call",
        )?;
        let downsample = pools.iter().map(|l| l.downsample).collect();
        let downsample_combine = pools.into_iter().map(|l| l.combine).collect();
        let coarse_attention = base
            .coarse_attention
            .iter()
            .zip(&table.level_rows)
            .map(|(ca, &rows)| {
                let total = (h * rows as u64).div_ceil(ca.spec.wg as u64);
                dispatch(Pass::CoarseAttention, ca.level, total, ca.spec, limits)
            })
            .collect::<Result<Vec<_>>>()?;
        let merge = base
            .merge
            .map(|mg| {
                let total = (h * seqs.total() as u64).div_ceil(mg.spec.wg as u64);
                dispatch(Pass::UpsampleMerge, None, total, mg.spec, limits)
            })
            .transpose()?;
        Ok(Self {
            shape,
            head_span: HeadSpan::whole(shape),
            queries: cfg.queries,
            levels: base.levels,
            grid: None,
            query_blocks: base.query_blocks,
            downsample,
            downsample_combine,
            coarse_attention,
            attention,
            merge,
            pad: pad_dispatch(seqs, shape, limits)?,
            tiles_per_block: tpb,
            workspace: Workspace {
                coarse_rows,
                coarse_bytes,
                coarse_kv_bytes,
                coarse_lse_bytes: if coarse_q {
                    (heads * coarse_rows) as u64 * 4
                } else {
                    0
                },
                lse_bytes: shape.rows() as u64 * 4,
                pool_partials_kv,
                pool_partials_q,
            },
            sequences: Some(table),
        })
    }
}

impl DensePlan {
    /// Plans exact attention of the variable-length batch `seqs`: every sequence attends to
    /// itself (causal or not), in query tiles of its own.
    pub fn for_sequences(
        seqs: &Sequences,
        heads: usize,
        kv_heads: usize,
        d: usize,
        limits: &KernelLimits,
    ) -> Result<Self> {
        Self::for_sequences_with(seqs, (heads, kv_heads, d), limits, DenseKernel::Rows)
    }

    /// [`DensePlan::for_sequences`] with the forward kernel `kernel` (its own query tile:
    /// the table counts tiles of its rows); `(heads, kv_heads, d)` as there.
    pub fn for_sequences_with(
        seqs: &Sequences,
        (heads, kv_heads, d): (usize, usize, usize),
        limits: &KernelLimits,
        kernel: DenseKernel,
    ) -> Result<Self> {
        let shape = seqs.shape(heads, kv_heads, d);
        shape.validate()?;
        check_batch(shape, limits)?;
        let base =
            DensePlan::without_tensor_bindings_for(one(shape, seqs.max_len()), limits, kernel)?;
        let wg = base.attention.spec.wg as usize;
        let table = SeqTable::new(seqs, heads, kv_heads, None, |n| n.div_ceil(wg) as u64)?;
        let attention = dispatch(
            base.attention.pass,
            None,
            heads as u64 * table.tiles,
            base.attention.spec,
            limits,
        )?;
        Ok(Self {
            shape,
            head_span: HeadSpan::whole(shape),
            attention,
            tiles: base.tiles,
            pad: pad_dispatch(seqs, shape, limits)?,
            sequences: Some(table),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pack_costs_its_tokens_not_its_longest_sequence() {
        // One sequence of 65536 tokens beside 10000 of 1..9.
        let mut lengths: Vec<usize> = (0..10000).map(|i| 1 + i % 9).collect();
        lengths.push(65536);
        let seqs = Sequences::packed(lengths).unwrap();
        let cfg = FmaConfig::new(64, 2);
        let plan =
            FmaPlan::for_sequences(&seqs, 2, 1, 64, &cfg, &KernelLimits::lavapipe()).unwrap();
        let long =
            FmaPlan::new(Shape::new(1, 2, 65536, 64), &cfg, &KernelLimits::lavapipe()).unwrap();
        // Each short sequence is one fine block (one tile); the long one its own tiles.
        assert_eq!(
            plan.attention.workgroups,
            long.attention.workgroups + 2 * 10000
        );
        assert!(plan.pad.is_none());
        let t = plan.sequences.as_ref().unwrap();
        assert_eq!(t.seqs, 10001);
        // Level 1 of a short sequence: one window of p rows.
        assert_eq!(t.level_rows[0], 10000 * 2 + 65536 / 64 * 2);
        assert_eq!(plan.workspace.coarse_rows, t.coarse_rows());
    }

    #[test]
    fn padded_batches_fill_their_padding_and_dense_follows_each_sequence() {
        let seqs = Sequences::padded(100, vec![100, 3, 0]).unwrap();
        let plan = FmaPlan::for_sequences(
            &seqs,
            2,
            2,
            16,
            &FmaConfig::new(16, 2),
            &KernelLimits::lavapipe(),
        )
        .unwrap();
        assert_eq!(plan.shape, Shape::new(3, 2, 100, 16));
        assert_eq!(
            plan.pad.unwrap().workgroups,
            (3 * 2 * 100usize).div_ceil(64) as u32
        );
        let dense = DensePlan::for_sequences(&seqs, 2, 1, 16, &KernelLimits::lavapipe()).unwrap();
        // ceil(100 / 64) + ceil(3 / 64) + 0 tiles per head.
        assert_eq!(dense.attention.workgroups, 2 * 3);
    }
}
