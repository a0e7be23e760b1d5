//! The plan of the dense backward (FlashAttention-2's structure): D = rowsum(dO * O) next to
//! the LSE (`backward_delta`), dK and dV with one workgroup per key tile of a K/V head walking
//! the queries of its group (`dense_backward_dkv`), dQ with one workgroup per query tile
//! walking the keys (`dense_backward_dq`). Long walks run in chunks, one dispatch each
//! ([`DenseBackwardPlan::query_chunks`], [`DenseBackwardPlan::key_chunks`]): llvmpipe's loop
//! limit, as the forward's [`DensePlan::key_chunks`].

use super::dense::{DensePlan, LOOP_BUDGET, UNROLLED_D4};
use super::dispatch::{dispatch, Dispatch, MAX_KEY_TILE, MIN_KEY_TILE};
use super::limits::{KernelLimits, BINDING_BYTES};
use super::pass::{Pass, SoftmaxFlags, Specialization};
use super::DENSE_KEY_TILES_PER_DISPATCH;
use crate::error::{FmaError, Result};
use crate::sequences::{SeqLayout, Sequences};
use crate::shape::Shape;
use crate::storage::Storage;

/// Invocations per workgroup of the dense backward's passes: keys of a dK/dV tile, query rows
/// of a dQ tile (as the forward's query tile) and rows of the D pass.
pub const DENSE_BACKWARD_WG: u32 = 64;

/// The plan of one dense backward.
#[derive(Clone, Debug)]
pub struct DenseBackwardPlan {
    /// The forward it differentiates (shape, query tiles, a variable-length batch's table).
    pub forward: DensePlan,
    /// D_i = rowsum(dO_i * O_i) and a copy of LSE_i per row, into the stats.
    pub delta: Dispatch,
    /// dK, dV: one workgroup per (K/V head, key tile of WG keys); queries staged BK at a time.
    pub dkv: Dispatch,
    /// dQ: one workgroup per (query head, query tile of WG rows); keys staged BK at a time.
    pub dq: Dispatch,
    /// Key tiles of WG keys per K/V head: ceil(seq_kv / WG).
    pub key_tiles: u32,
    /// Query tiles of WG rows per query head: ceil(seq / WG).
    pub query_tiles: u32,
    /// Bytes of the stats (LSE, D per row): (bh, n, 2) f32.
    pub stats_bytes: u64,
    /// A padded variable-length batch: dQ, dK, dV = 0 on its padding rows, last.
    pub pad: Option<Dispatch>,
}

impl DenseBackwardPlan {
    /// The plan with its forward, dQ and dK/dV passes specialised for the softmax variants
    /// `flags` (`shared/variants.wgsl`; dispatches and sizes do not change).
    pub fn with_softmax(mut self, flags: SoftmaxFlags) -> Self {
        self.forward.attention.spec.softmax = flags;
        self.dq.spec.softmax = flags;
        self.dkv.spec.softmax = flags;
        self
    }

    /// The plan with every pass composed for `storage` (issue 29): Q, K, V, O, dO and the
    /// gradients as that type; dispatches and sizes do not change.
    pub fn with_storage(mut self, storage: Storage) -> Self {
        self.forward = self.forward.with_storage(storage);
        for d in [&mut self.delta, &mut self.dkv, &mut self.dq]
            .into_iter()
            .chain(self.pad.iter_mut())
        {
            d.spec.storage = storage;
        }
        self
    }

    /// Plans the backward of dense attention of `shape` under `limits`.
    pub fn new(shape: Shape, limits: &KernelLimits) -> Result<Self> {
        Self::build(DensePlan::new(shape, limits)?, limits)
    }

    /// Plans the backward of exact attention of the variable-length batch `seqs` (every
    /// sequence attends to itself; `heads` query heads, `kv_heads` K/V heads of width `d`):
    /// its passes run over the sequence table's tiles (`DensePlan::for_sequences`), a padded
    /// batch ends with `pad_gradients`.
    pub fn for_sequences(
        seqs: &Sequences,
        heads: usize,
        kv_heads: usize,
        d: usize,
        limits: &KernelLimits,
    ) -> Result<Self> {
        if seqs.is_cross() {
            // The dK/dV pass takes its key tiles from the table's query tiles.
            return Err(FmaError::InvalidConfig {
                what: "key lengths",
                value: "of their own per sequence, in a dense backward".into(),
                allowed: "each sequence's keys are its queries (Sequences::packed or padded): \
                          the dense backward of per-sequence key lengths is not implemented yet"
                    .into(),
            });
        }
        let forward = DensePlan::for_sequences(seqs, heads, kv_heads, d, limits)?;
        let shape = forward.shape;
        let table_tiles = forward.sequences.as_ref().map_or(0, |t| t.tiles);
        let mut plan = Self::build(forward, limits)?;
        // The table's tiles are the forward's query tiles of WG rows: the same WG here, so
        // each sequence's key tiles (its own keys) are its query tiles.
        debug_assert_eq!(plan.dq.spec.wg, plan.forward.attention.spec.wg);
        plan.dq = dispatch(
            Pass::DenseBackwardDq,
            None,
            heads as u64 * table_tiles,
            plan.dq.spec,
            limits,
        )?;
        plan.dkv = dispatch(
            Pass::DenseBackwardDkv,
            None,
            kv_heads as u64 * table_tiles,
            plan.dkv.spec,
            limits,
        )?;
        if seqs.layout != SeqLayout::Packed {
            let spec = plan.delta.spec;
            plan.pad = Some(dispatch(
                Pass::PadGradients,
                None,
                (shape.rows() as u64).div_ceil(spec.wg as u64),
                spec,
                limits,
            )?);
        }
        Ok(plan)
    }

    /// The plan of `forward`'s backward: a batch of equal sequences' sizes (a variable-length
    /// batch's dispatches are resized by [`DenseBackwardPlan::for_sequences`]).
    fn build(forward: DensePlan, limits: &KernelLimits) -> Result<Self> {
        let shape = forward.shape;
        let stats_bytes = shape.rows() as u64 * 8;
        if stats_bytes > limits.binding_bytes() {
            return Err(FmaError::LimitExceeded {
                what: "the LSE and D of every row of the dense backward".into(),
                requested: stats_bytes,
                max: limits.binding_bytes(),
                unit: BINDING_BYTES,
                advice: "differentiate fewer heads per backward call".into(),
            });
        }
        let wg = DENSE_BACKWARD_WG.min(limits.max_workgroup);
        let d4 = shape.head_dim.div_ceil(4) as u32;
        let delta = dispatch(
            Pass::BackwardDelta,
            None,
            (shape.rows() as u64).div_ceil(wg as u64),
            Specialization {
                wg,
                bk: 1,
                d4: 1,
                grid: false,
                softmax: SoftmaxFlags::PLAIN,
                storage: Storage::F32,
            },
            limits,
        )?;
        // dQ stages key tiles as the forward does (K and V rows and a bias per key).
        let dq_spec = Specialization {
            wg,
            ..forward.attention.spec
        };
        // dK/dV stages query tiles: q and dO rows plus the LSE and D per query.
        let dkv_spec = Specialization {
            bk: query_tile(shape.head_dim, 2 * d4 * 16 + 8, limits)?,
            ..dq_spec
        };
        // A variable-length batch's shape is its tensors' (padded rows count): its tiles come
        // from the table, these only size the plain dispatches.
        let query_tiles = (shape.seq as u32).div_ceil(wg);
        let key_tiles = (shape.seq_kv as u32).div_ceil(wg);
        let dkv = dispatch(
            Pass::DenseBackwardDkv,
            None,
            shape.kv_batch_heads() as u64 * key_tiles as u64,
            dkv_spec,
            limits,
        )?;
        let dq = dispatch(
            Pass::DenseBackwardDq,
            None,
            shape.batch_heads() as u64 * query_tiles as u64,
            dq_spec,
            limits,
        )?;
        Ok(Self {
            forward,
            delta,
            dkv,
            dq,
            key_tiles,
            query_tiles,
            stats_bytes,
            pad: None,
        })
    }

    /// Rows one dispatch of `spec` may walk per invocation: [`DENSE_KEY_TILES_PER_DISPATCH`]
    /// tiles, and above d = 128 at most `LOOP_BUDGET / (2 D4 + 8)` rows (as the forward's
    /// [`DensePlan::keys_per_dispatch`]).
    fn rows_per_dispatch(spec: Specialization) -> usize {
        let tiles = DENSE_KEY_TILES_PER_DISPATCH * spec.bk as usize;
        let d4 = spec.d4 as usize;
        if d4 > UNROLLED_D4 {
            tiles.min(LOOP_BUDGET / (2 * d4 + 8))
        } else {
            tiles
        }
    }

    /// Keys a dQ dispatch walks per query row by default.
    pub fn keys_per_dispatch(&self) -> usize {
        Self::rows_per_dispatch(self.dq.spec)
    }

    /// Queries a dK/dV dispatch walks per key by default, over all the query heads of a K/V
    /// head's group together (each walks its chunk of queries).
    pub fn queries_per_dispatch(&self) -> usize {
        Self::rows_per_dispatch(self.dkv.spec)
    }

    /// The key ranges `lo..hi` of the dQ dispatches, in order: chunks of at most `max_keys`
    /// keys in whole key tiles (at least one), as [`DensePlan::key_chunks`].
    pub fn key_chunks(&self, max_keys: usize) -> Vec<(usize, usize)> {
        let bk = self.dq.spec.bk as usize;
        let n_kv = self
            .forward
            .sequences
            .as_ref()
            .map_or(self.forward.shape.seq_kv, |t| t.max_kv_len);
        chunks(n_kv, bk, max_keys)
    }

    /// The query ranges `lo..hi` (of each query head) of the dK/dV dispatches, in order: a
    /// dispatch walks its range in every query head of the group, so a range holds at most
    /// `max_queries / group` queries, in whole query tiles (at least one).
    pub fn query_chunks(&self, max_queries: usize) -> Vec<(usize, usize)> {
        let bk = self.dkv.spec.bk as usize;
        let per_head = max_queries / self.forward.shape.group();
        chunks(self.longest(self.forward.shape.seq), bk, per_head)
    }

    /// `len` queries, or a variable-length batch's longest sequence (shorter sequences finish
    /// early).
    fn longest(&self, len: usize) -> usize {
        self.forward.sequences.as_ref().map_or(len, |t| t.max_len)
    }
}

/// Rows [0, len) in chunks of at most `max` rows rounded down to whole tiles of `tile` (at
/// least one tile), each starting at a multiple of `tile`; one chunk when they fit (also for
/// len = 0: one dispatch that writes zeros).
pub(super) fn chunks(len: usize, tile: usize, max: usize) -> Vec<(usize, usize)> {
    if len <= max {
        return vec![(0, len)];
    }
    let chunk = (max / tile).max(1) * tile;
    (0..len)
        .step_by(chunk)
        .map(|lo| (lo, (lo + chunk).min(len)))
        .collect()
}

/// Query rows per staged tile of the dK/dV pass: as many (<= MAX_KEY_TILE) as fit workgroup
/// memory at `bytes_per_row`.
fn query_tile(head_dim: usize, bytes_per_row: u32, limits: &KernelLimits) -> Result<u32> {
    let bk = (limits.workgroup_storage / bytes_per_row).min(MAX_KEY_TILE);
    if bk < MIN_KEY_TILE {
        return Err(FmaError::LimitExceeded {
            what: format!("a tile of {MIN_KEY_TILE} queries of head_dim {head_dim}"),
            requested: (MIN_KEY_TILE * bytes_per_row) as u64,
            max: limits.workgroup_storage as u64,
            unit: "bytes of workgroup memory",
            advice: "use a smaller head_dim on this adapter".into(),
        });
    }
    Ok(bk)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dispatches_cover_every_tile_of_every_head() {
        let limits = KernelLimits::lavapipe();
        let shape = Shape::cross(2, 6, 97, 130, 16).with_kv_heads(2);
        let plan = DenseBackwardPlan::new(shape, &limits).unwrap();
        let wg = DENSE_BACKWARD_WG as usize;
        assert_eq!(plan.query_tiles as usize, 97usize.div_ceil(wg));
        assert_eq!(plan.key_tiles as usize, 130usize.div_ceil(wg));
        assert_eq!(plan.dq.workgroups as usize, 12 * 2);
        assert_eq!(plan.dkv.workgroups as usize, 4 * 3);
        assert_eq!(plan.delta.workgroups as usize, (12 * 97usize).div_ceil(wg));
        assert_eq!(plan.stats_bytes, 12 * 97 * 8);
    }

    #[test]
    fn chunks_are_whole_tiles_in_order_and_shared_by_the_group() {
        let limits = KernelLimits::lavapipe();
        let shape = Shape::cross(1, 8, 1000, 700, 16).with_kv_heads(2);
        let plan = DenseBackwardPlan::new(shape, &limits).unwrap();
        let (bq, bk) = (plan.dkv.spec.bk as usize, plan.dq.spec.bk as usize);
        assert_eq!(plan.key_chunks(usize::MAX), vec![(0, 700)]);
        assert_eq!(plan.query_chunks(usize::MAX), vec![(0, 1000)]);
        // A group of 4 query heads: 400 walked queries are 100 per head, in whole tiles.
        let q = plan.query_chunks(400);
        let per = 100 / bq * bq;
        assert_eq!(q[0], (0, per));
        assert_eq!(q.last().unwrap().1, 1000);
        let k = plan.key_chunks(100);
        assert_eq!(k[0], (0, 100 / bk * bk));
        assert_eq!(k.last().unwrap().1, 700);
        for c in [q, k] {
            for w in c.windows(2) {
                assert_eq!(w[0].1, w[1].0);
            }
        }
        // Fewer than a tile per head: one tile per chunk.
        assert_eq!(plan.query_chunks(1)[1], (bq, 2 * bq));
        // The default keeps a dispatch at the forward's budget.
        assert_eq!(
            plan.queries_per_dispatch(),
            DENSE_KEY_TILES_PER_DISPATCH * bq
        );
        let wide = DenseBackwardPlan::new(Shape::new(1, 1, 10, 256), &limits).unwrap();
        assert_eq!(wide.keys_per_dispatch(), 240);
    }

    #[test]
    fn a_variable_length_batch_runs_over_its_tiles_and_pads_a_padded_one() {
        let limits = KernelLimits::lavapipe();
        let packed = Sequences::packed(vec![10, 0, 130, 64]).unwrap();
        let plan = DenseBackwardPlan::for_sequences(&packed, 4, 2, 16, &limits).unwrap();
        // Tiles of 64: 1 + 0 + 3 + 1 per head.
        assert_eq!(plan.dq.workgroups, 4 * 5);
        assert_eq!(plan.dkv.workgroups, 2 * 5);
        assert!(plan.pad.is_none());
        assert_eq!(plan.key_chunks(usize::MAX), vec![(0, 130)]);
        let padded = Sequences::padded(130, vec![10, 130]).unwrap();
        let plan = DenseBackwardPlan::for_sequences(&padded, 2, 1, 16, &limits).unwrap();
        assert_eq!(plan.dq.workgroups, 2 * 4);
        let rows = 2 * 2 * 130u32;
        assert_eq!(
            plan.pad.unwrap().workgroups,
            rows.div_ceil(DENSE_BACKWARD_WG)
        );
        let cross = Sequences::packed_cross(vec![5, 3], vec![9, 3]).unwrap();
        assert!(DenseBackwardPlan::for_sequences(&cross, 2, 1, 16, &limits).is_err());
    }

    #[test]
    fn bad_shapes_are_typed_errors() {
        let limits = KernelLimits::lavapipe();
        assert!(DenseBackwardPlan::new(Shape::new(1, 1, 10, 257), &limits).is_err());
        assert!(DenseBackwardPlan::new(Shape::new(1, 3, 10, 8).with_kv_heads(2), &limits).is_err());
        // Stats over one binding.
        let tiny = limits.capped(1000);
        assert!(DenseBackwardPlan::new(Shape::new(1, 1, 200, 1), &tiny).is_err());
    }

    /// On a discrete GPU's limits the backward's passes run in parts at long contexts: 256
    /// tiles of BK = 32 rows per dispatch (d = 64 and 128), keys for dQ, queries over a K/V
    /// head's group for dK/dV. Each part adds to the previous one's sums, which f16 storage
    /// keeps in f32 (docs/perf.md, change 38).
    #[test]
    fn long_heads_run_in_several_parts_on_a_gpu() {
        let limits = KernelLimits::discrete_gpu();
        for (d, n, kv_heads, dq_parts, dkv_parts) in [
            (64, 16384, 8, 2, 2),
            (64, 16384, 2, 2, 8),
            (64, 65536, 8, 8, 8),
            (64, 65536, 2, 8, 32),
            (128, 16384, 8, 2, 2),
            (128, 65536, 2, 8, 32),
        ] {
            let shape = Shape::new(1, 8, n, d).with_kv_heads(kv_heads);
            let plan = DenseBackwardPlan::new(shape, &limits).unwrap();
            assert_eq!(plan.keys_per_dispatch(), 8192, "d {d}");
            assert_eq!(plan.queries_per_dispatch(), 8192, "d {d}");
            let keys = plan.key_chunks(plan.keys_per_dispatch()).len();
            let queries = plan.query_chunks(plan.queries_per_dispatch()).len();
            assert_eq!((keys, queries), (dq_parts, dkv_parts), "{shape}");
        }
    }
}
