//! The plan of exact dense attention: one dispatch over every (query tile, head) per chunk of
//! at most [`DENSE_KEY_TILES_PER_DISPATCH`] key tiles ([`DensePlan::key_chunks`]).

use super::dense_tiled::{dense_kernel_spec, DenseKernel};
use super::dispatch::{fold, Dispatch};
use super::forward::check_tensors;
use super::limits::KernelLimits;
use crate::error::{FmaError, Result};
use crate::shape::Shape;
use crate::variants::HeadSpan;

/// Key tiles one dense dispatch attends at most per query row; longer key ranges run as
/// several dispatches, key chunks in order, each resuming the rows' partial (O, LSE)
/// (`shaders/dense_attention.wgsl`). Why: llvmpipe (Mesa's software rasterizer, lavapipe and
/// GL) stops an invocation's loops after 65535 iterations in all (gallivm's loop limiter), and
/// the dense kernel spends 40 .. 120 of them per key tile at d <= 128: without chunks, 16
/// queries came back wrong from 819 .. 1639 tiles on, depending on d, BK and the variant
/// (docs/perf.md, change 9); 256 tiles stay 2x below the lowest tile count that ran right.
pub const DENSE_KEY_TILES_PER_DISPATCH: usize = 256;

/// Loop iterations a dense dispatch may spend per invocation on its key loops above
/// `UNROLLED_D4`: half of llvmpipe's 65535.
pub(super) const LOOP_BUDGET: usize = 32768;

/// The largest D4 (= ceil(d / 4)) whose per-key loops over the row llvmpipe unrolls itself.
/// Above it (d > 128) the plain variant's loops over a row's D4 vec4s stayed loops, about
/// 2 D4 + 8 iterations per key: at d = 256 wrong from 896 keys on, right at 448. The composer
/// now writes those loops out above it (`gpu::engine::shaders`, docs/perf.md, change 10).
pub const UNROLLED_D4: usize = 32;

/// The plan of one dense attention forward.
#[derive(Clone, Debug)]
pub struct DensePlan {
    /// The problem's shape.
    pub shape: Shape,
    /// The attention dispatch.
    pub attention: Dispatch,
    /// Query tiles of the sequence: ceil(n / WG).
    pub tiles: u32,
    /// A padded variable-length batch: the fill of its padding rows, after the attention.
    pub pad: Option<Dispatch>,
    /// A variable-length batch's sequence table (`None` for a batch of equal sequences).
    pub sequences: Option<super::sequences::SeqTable>,
    /// Which of the caller's query heads the problems are (a run of heads: its sinks'
    /// heads); [`HeadSpan::whole`] of `shape` unless [`DensePlan::in_span`] says otherwise.
    pub head_span: HeadSpan,
}

impl DensePlan {
    /// The plan with its attention pass specialised for the softmax variants `flags`
    /// (`shared/variants.wgsl`; dispatches and sizes do not change).
    pub fn with_softmax(mut self, flags: super::SoftmaxFlags) -> Self {
        self.attention.spec.softmax = flags;
        self
    }

    /// The plan with its passes composed for `storage` (issue 29; dispatches and sizes do not
    /// change: the binding checks count 4 bytes per element, which f16 tensors undercut).
    pub fn with_storage(mut self, storage: crate::Storage) -> Self {
        self.attention.spec.storage = storage;
        if let Some(pad) = &mut self.pad {
            pad.spec.storage = storage;
        }
        self
    }

    /// The plan of a run of the caller's heads: problem qh is the caller's head
    /// `(span.first + qh) mod span.heads` (its sink); nothing else changes.
    pub fn in_span(mut self, span: HeadSpan) -> Self {
        self.head_span = span;
        self
    }

    /// Every dispatch in execution order: the attention, then (padded batches) the padding.
    /// A key range of more than one chunk ([`DensePlan::key_chunks`]) repeats the attention
    /// dispatch once per chunk with that chunk's parameters.
    pub fn steps(&self) -> Vec<Dispatch> {
        std::iter::once(self.attention).chain(self.pad).collect()
    }

    /// Keys per dispatch by default: [`DENSE_KEY_TILES_PER_DISPATCH`] tiles of this plan's BK,
    /// and above d = 128 at most `LOOP_BUDGET / (2 D4 + 8)` keys (240 at d = 256).
    pub fn keys_per_dispatch(&self) -> usize {
        let spec = self.attention.spec;
        let tiles = DENSE_KEY_TILES_PER_DISPATCH * spec.bk as usize;
        let d4 = spec.d4 as usize;
        if d4 > UNROLLED_D4 {
            tiles.min(LOOP_BUDGET / (2 * d4 + 8))
        } else {
            tiles
        }
    }

    /// The key ranges `lo..hi` of the dispatches over `seq_kv` keys, in order: chunks of at most
    /// `max_keys` keys (rounded down to whole key tiles, at least one tile), each starting at a
    /// multiple of BK, so the tiles are those of one dispatch over every key. One chunk when
    /// the keys fit.
    pub fn key_chunks(&self, max_keys: usize) -> Vec<(usize, usize)> {
        // A variable-length batch: its longest sequence's keys (shorter ones finish early).
        let n_kv = self
            .sequences
            .as_ref()
            .map_or(self.shape.seq_kv, |t| t.max_kv_len);
        if n_kv <= max_keys {
            return vec![(0, n_kv)];
        }
        let bk = self.attention.spec.bk as usize;
        let chunk = (max_keys / bk).max(1) * bk;
        (0..n_kv)
            .step_by(chunk)
            .map(|lo| (lo, (lo + chunk).min(n_kv)))
            .collect()
    }
}

impl DensePlan {
    /// Plans dense attention for `shape` under `limits`, with the rows kernel.
    pub fn new(shape: Shape, limits: &KernelLimits) -> Result<Self> {
        Self::with_kernel(shape, limits, DenseKernel::Rows)
    }

    /// [`DensePlan::new`] with the forward kernel `kernel` (its tile sizes from `limits`:
    /// [`crate::plan::dense_kernel_spec`]).
    pub fn with_kernel(shape: Shape, limits: &KernelLimits, kernel: DenseKernel) -> Result<Self> {
        check_tensors(shape, limits)?;
        Self::without_tensor_bindings_for(shape, limits, kernel)
    }

    /// [`DensePlan::with_kernel`] less the check that each tensor fits one storage binding (the
    /// plan of a head that `crate::plan::SplitPlan` cuts into chunks). The query tile is the
    /// spec's `wg` rows for either kernel, so tiles, key chunks, split heads and sequence
    /// tables are counted the same way.
    pub(crate) fn without_tensor_bindings_for(
        shape: Shape,
        limits: &KernelLimits,
        kernel: DenseKernel,
    ) -> Result<Self> {
        shape.validate()?;
        let (pass, spec) = dense_kernel_spec(kernel, shape.head_dim, limits)?;
        let wg = spec.wg;
        let tiles = (shape.seq as u32).div_ceil(wg);
        let total = shape.batch_heads() as u64 * tiles as u64;
        let total = u32::try_from(total).map_err(|_| FmaError::LimitExceeded {
            what: "the dense dispatch".into(),
            requested: total,
            max: u32::MAX as u64,
            unit: "workgroups",
            advice: "process fewer heads per call, or shorter sequences".into(),
        })?;
        Ok(Self {
            shape,
            attention: Dispatch {
                pass,
                level: None,
                workgroups: total,
                grid: fold(total, limits.max_workgroups_per_dim)?,
                spec,
                args: [0, 0],
            },
            tiles,
            pad: None,
            sequences: None,
            head_span: HeadSpan::whole(shape),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_chunks_are_whole_tiles_in_order_and_cover_every_key() {
        let limits = KernelLimits::with_binding(128 << 20);
        let plan = DensePlan::new(Shape::cross(1, 2, 5, 1000, 16), &limits).unwrap();
        let bk = plan.attention.spec.bk as usize;
        assert_eq!(plan.key_chunks(usize::MAX), vec![(0, 1000)]);
        assert_eq!(plan.key_chunks(1000), vec![(0, 1000)]);
        // 100 keys round down to whole tiles.
        let chunks = plan.key_chunks(100);
        let per = 100 / bk * bk;
        assert_eq!(chunks.len(), 1000usize.div_ceil(per));
        assert_eq!(chunks[0], (0, per));
        assert_eq!(chunks.last().unwrap().1, 1000);
        for w in chunks.windows(2) {
            assert_eq!(w[0].1, w[1].0);
            assert_eq!(w[1].0 % bk, 0);
        }
        // Fewer keys than a tile asked for: one tile per chunk.
        assert_eq!(plan.key_chunks(1)[1], (bk, 2 * bk));
        assert_eq!(plan.keys_per_dispatch(), DENSE_KEY_TILES_PER_DISPATCH * bk);
        // Above d = 128 the loops over a row bound the keys: 32768 / (2 * 64 + 8) at d = 256.
        let wide = DensePlan::new(Shape::new(1, 1, 10, 256), &limits).unwrap();
        assert_eq!(wide.keys_per_dispatch(), 240);
    }

    /// On a GPU (the H200's limits) the tiled kernel's default key chunks are several
    /// dispatches at long contexts: 256 tiles of BK = 32 keys (d = 64) or 16 (d = 128). Each
    /// resumes the rows' partial O, which f16 storage keeps in f32 (docs/perf.md, change 37).
    #[test]
    fn long_heads_run_in_several_key_chunks_on_a_gpu() {
        let limits = KernelLimits::discrete_gpu();
        for (d, n, keys, chunks) in [
            (64, 16384, 8192, 2),
            (64, 65536, 8192, 8),
            (128, 16384, 4096, 4),
            (128, 65536, 4096, 16),
        ] {
            let plan = DensePlan::with_kernel(Shape::new(1, 1, n, d), &limits, DenseKernel::Tiled)
                .unwrap();
            assert_eq!(plan.keys_per_dispatch(), keys, "d {d}");
            let got = plan.key_chunks(plan.keys_per_dispatch()).len();
            assert_eq!(got, chunks, "d {d} n {n}");
        }
    }
}
