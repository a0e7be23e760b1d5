//! Dense attention of a head longer than one storage binding: the head's queries and keys are
//! cut at the same boundaries into chunks that each fit a binding, and every (query chunk, key
//! chunk) pair is one dispatch, key chunks in order (a pair of more than
//! [`crate::plan::DENSE_KEY_TILES_PER_DISPATCH`] key tiles, several). A row's partial result
//! (O, LSE) over the keys so far waits in device memory between them and the next dispatch
//! resumes from it (`shaders/dense_attention.wgsl`). Chunks are multiples of the query tile
//! and of the key tile, so the tiles are those of an unsplit run. Causal: a query chunk needs
//! only the key chunks up to its own.
//!
//! ```text
//!              key chunk 0   1   2            causal: pairs (q, k) with k <= q
//! query chunk 0         x   x   x                     x . .
//!             1         x   x   x                     x x .
//!             2         x   x   x                     x x x
//! ```
//!
//! Pure arithmetic, unit-tested without a GPU; `gpu/dense/split.rs` executes it.

use super::limits::BINDING_BYTES;
use crate::error::{FmaError, Result};
use crate::plan::{dispatch, DenseKernel, DensePlan, Dispatch, KernelLimits};
use crate::shape::Shape;

/// One dispatch: the queries of one chunk against keys of one chunk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DensePair {
    /// Index of the query chunk in [`DenseSplitPlan::chunks`].
    pub query: usize,
    /// Index of the key chunk.
    pub key: usize,
    /// The keys `lo..hi` of the head this dispatch attends: the key chunk's, or a part of at
    /// most the plan's keys per dispatch ([`crate::plan::DensePlan::key_chunks`]).
    pub keys: (usize, usize),
    /// Query tiles of the query chunk, one workgroup each.
    pub tiles: u32,
    /// The dispatch.
    pub dispatch: Dispatch,
}

/// The plan of dense attention over one head in chunks (see the module documentation).
#[derive(Clone, Debug)]
pub struct DenseSplitPlan {
    /// The plan of one head, shape (1, 1, n, d), less the tensor-binding check.
    pub head: DensePlan,
    /// The chunks `lo..hi`, in order: the same boundaries for queries and keys.
    pub chunks: Vec<(usize, usize)>,
    /// The dispatches in execution order: per query chunk, its key chunks in order.
    pub pairs: Vec<DensePair>,
}

impl DenseSplitPlan {
    /// The plan with its dispatches composed for `storage` (issue 29), as
    /// [`DensePlan::with_storage`].
    pub fn with_storage(mut self, storage: crate::Storage) -> Self {
        self.head = self.head.with_storage(storage);
        for p in &mut self.pairs {
            p.dispatch.spec.storage = storage;
        }
        self
    }
    /// Plans a head of `n` tokens of width `d`, at most
    /// [`crate::plan::DensePlan::keys_per_dispatch`] keys per dispatch. A head that fits is
    /// one chunk.
    pub fn new(n: usize, d: usize, causal: bool, limits: &KernelLimits) -> Result<Self> {
        Self::with_max_keys(n, d, causal, limits, None)
    }

    /// [`DenseSplitPlan::new`] with at most `max_keys` keys per dispatch (`None`: the default).
    pub fn with_max_keys(
        n: usize,
        d: usize,
        causal: bool,
        limits: &KernelLimits,
        max_keys: Option<usize>,
    ) -> Result<Self> {
        Self::with_kernel(n, d, causal, limits, (max_keys, DenseKernel::Rows))
    }

    /// [`DenseSplitPlan::with_max_keys`] with the forward kernel `kernel` (chunks are whole
    /// tiles of its query block and key tile).
    pub fn with_kernel(
        n: usize,
        d: usize,
        causal: bool,
        limits: &KernelLimits,
        (max_keys, kernel): (Option<usize>, DenseKernel),
    ) -> Result<Self> {
        let head = DensePlan::without_tensor_bindings_for(Shape::new(1, 1, n, d), limits, kernel)?;
        let spec = head.attention.spec;
        let parts = head.key_chunks(max_keys.unwrap_or_else(|| head.keys_per_dispatch()));
        // Multiple of both tiles: query tiles of WG rows, key tiles of BK rows.
        let unit = lcm(spec.wg as usize, spec.bk as usize);
        let max_rows = (limits.binding_bytes() / (d as u64 * 4)) as usize;
        let chunk = if n <= max_rows {
            n
        } else if max_rows >= unit {
            max_rows / unit * unit
        } else {
            return Err(FmaError::LimitExceeded {
                what: format!(
                    "dense attention over a head split across bindings: one tile of {unit} rows \
                     of head_dim {d}"
                ),
                requested: (unit * d * 4) as u64,
                max: limits.binding_bytes(),
                unit: BINDING_BYTES,
                advice: "allow larger storage bindings (max_binding), or use a smaller head_dim"
                    .into(),
            });
        };
        let chunks: Vec<_> = (0..n)
            .step_by(chunk)
            .map(|lo| (lo, (lo + chunk).min(n)))
            .collect();
        let mut pairs = Vec::new();
        for (qi, &(lo, hi)) in chunks.iter().enumerate() {
            let tiles = (hi - lo).div_ceil(spec.wg as usize) as u32;
            let keys = if causal { qi + 1 } else { chunks.len() };
            for (ki, &(k_lo, k_hi)) in chunks.iter().enumerate().take(keys) {
                // The head's key parts that fall in this chunk (both start at multiples of BK).
                for &(lo, hi) in parts.iter().filter(|&&(lo, hi)| lo < k_hi && hi > k_lo) {
                    pairs.push(DensePair {
                        query: qi,
                        key: ki,
                        keys: (lo.max(k_lo), hi.min(k_hi)),
                        tiles,
                        dispatch: dispatch(head.attention.pass, None, tiles as u64, spec, limits)?,
                    });
                }
            }
        }
        Ok(Self {
            head,
            chunks,
            pairs,
        })
    }
}

fn lcm(a: usize, b: usize) -> usize {
    let gcd = |mut x: usize, mut y: usize| {
        while y != 0 {
            (x, y) = (y, x % y);
        }
        x
    };
    a / gcd(a, b) * b
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(binding: u64) -> KernelLimits {
        KernelLimits::with_binding(binding)
    }

    #[test]
    fn chunks_are_whole_tiles_and_pairs_follow_the_mask() {
        // 1000 x 16 under 16 KiB: 256 rows per binding, a multiple of 64 (WG) and 32 (BK).
        for causal in [false, true] {
            let plan = DenseSplitPlan::new(1000, 16, causal, &limits(16 << 10)).unwrap();
            assert_eq!(plan.chunks.len(), 4);
            assert!(plan.chunks.iter().all(|&(lo, _)| lo % 256 == 0));
            assert_eq!(plan.chunks.last().unwrap().1, 1000);
            let expect = if causal { 1 + 2 + 3 + 4 } else { 16 };
            assert_eq!(plan.pairs.len(), expect);
            // Per query chunk, its key chunks in order starting from 0, each whole.
            for w in plan.pairs.windows(2) {
                if w[0].query == w[1].query {
                    assert_eq!(w[1].key, w[0].key + 1);
                } else {
                    assert_eq!((w[1].query, w[1].key), (w[0].query + 1, 0));
                }
            }
            assert!(plan.pairs.iter().all(|p| p.keys == plan.chunks[p.key]));
            assert_eq!(
                plan.pairs.last().unwrap().tiles,
                (1000 - 768usize).div_ceil(64) as u32
            );
        }
    }

    #[test]
    fn key_chunks_over_the_dispatch_limit_run_in_parts_in_order() {
        // Chunks of 256 rows; at most 100 keys per dispatch: 96 (3 tiles of 32), in parts
        // 0..96, 96..192, 192..288 of the head, the last cut at the chunk boundary 256.
        let plan =
            DenseSplitPlan::with_max_keys(1000, 16, false, &limits(16 << 10), Some(100)).unwrap();
        let parts: Vec<_> = plan.pairs.iter().filter(|p| p.query == 0).collect();
        let mut next = 0;
        for p in &parts {
            let (lo, hi) = plan.chunks[p.key];
            assert_eq!(p.keys.0, next);
            assert!(lo <= p.keys.0 && p.keys.1 <= hi && p.keys.1 - p.keys.0 <= 96);
            next = p.keys.1;
        }
        assert_eq!(next, 1000);
        let first: Vec<_> = parts[..5].iter().map(|p| p.keys).collect();
        assert_eq!(
            first,
            [(0, 96), (96, 192), (192, 256), (256, 288), (288, 384)]
        );
    }

    #[test]
    fn head_dim_one_fills_the_binding_with_rows() {
        let plan = DenseSplitPlan::new(10_000, 1, false, &limits(16 << 10)).unwrap();
        assert_eq!(plan.chunks[0].1, 4096); // 16 KiB / 4 bytes, a multiple of 64
    }

    #[test]
    fn a_binding_below_one_tile_is_a_typed_error() {
        let e = DenseSplitPlan::new(100_000, 256, false, &limits(32 << 10)).unwrap_err();
        assert!(matches!(e, FmaError::LimitExceeded { .. }), "{e}");
    }
}
