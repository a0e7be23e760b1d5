//! The decoder (algorithm.md §10): a multi-level KV cache on the GPU and steps of C tokens
//! per sequence at O(m + p L) keys per token ([`Decoder`]). Its layout comes from
//! [`DecodeLayout`] (`plan/decode.rs`); the cache's buffers live in `state.rs`, one record of
//! the decoding passes in `record.rs`, and the host-tensor calls (prefill, steps) in `host.rs`.
//! The prefill's outputs come from the causal forward of the FMA and dense executors, which this
//! folder uses as any caller would; nothing below imports it.

mod host;
mod record;
mod state;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::config::{DecodeConfig, Downsample, FmaConfig};
use crate::error::{FmaError, Result};
use crate::gpu::dense::DenseAttention;
use crate::gpu::engine::cache::ShapeCache;
use crate::gpu::engine::context::GpuContext;
use crate::gpu::engine::params::check_variants;
use crate::gpu::engine::record::Pipes;
use crate::gpu::engine::storage_types::check_device_storage;
use crate::gpu::engine::weights::WeightBuffers;
use crate::gpu::fma::FmaAttention;
use crate::plan::{DecodeLayout, DecodeTuning, KernelLimits};
use crate::storage::Storage;

pub use host::{EncodeStep, StepIo, StepTensors};
use record::{RecordKey, Uniforms};
use state::State;

/// Which attention a step runs over the cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DecodeMode {
    /// FMA: the near ring and every level's far list, O(m + p L) keys per query.
    Fma,
    /// Exact dense attention over the history, split over its length (flash-decoding); needs
    /// [`DecodeConfig::history`].
    Dense,
}

/// What a decoder has made on the GPU so far ([`Decoder::objects_made`]): a step that finds
/// everything it needs made (the same shapes, buffers, pages and split as an earlier step)
/// makes nothing, so these stay put across steady-state steps.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ObjectsMade {
    /// Buffers: the cache's, history pages, the dense partials, the host path's step tensors
    /// and readback staging, and each record shape's parameter block and level selectors
    /// (written once, when made).
    pub buffers: u64,
    /// Bind groups (kept per record shape and remade only when a bound buffer changes:
    /// [`EncodeStep`] tensors that are other buffers than the last step's, a new history page).
    pub bind_groups: u64,
}

/// Incremental causal decoding for a batch of sequences (algorithm.md §10).
///
/// Tensors of a step: Q of shape (batch, heads, C, head_dim), K, V of (batch, kv_heads, C,
/// head_dim) ([`DecodeConfig::kv_heads`]: grouped-query attention keeps only the K/V heads in
/// the cache, query head h reading K/V head h / (heads / kv_heads)), with 1 <= C <=
/// `max_chunk`, C new tokens for every sequence, each appended at its own length; O of Q's
/// shape and the LSE (batch, heads, C). The output of the token at position i equals row i of
/// the causal FMA forward of its sequence (up to float summation order), and the dense mode's
/// row i that of exact causal attention.
///
/// The cache lives on the GPU and is never recomputed: a coarse window's keys and values are
/// pooled once, as its tokens arrive; the FMA state per (sequence, head) has a fixed size
/// ([`DecodeLayout::fma_bytes`]); the history (when kept) grows by pages that are never
/// copied. Sequences' lengths are tracked on the GPU too, so steps recorded into one encoder
/// each see their own positions. Safe to share between threads (calls are serialised).
///
/// Softmax variants ([`DecodeConfig::variants`], docs/variants.md): softcap and sinks (of
/// shape (heads,)) in both modes and in the prefill, as the causal forward runs them. A
/// sliding window (L, 0) keeps only a ring of the last L + `max_chunk` keys and values per
/// sequence and K/V head, no coarse level and no history, so the cache's memory
/// ([`Decoder::allocated_bytes`]) does not grow with the context; both modes then run exact
/// windowed attention over the ring, equal to the causal forward with the window. Typed
/// errors: R > 0, sinks not of shape (heads,) or beyond 128 heads, and in FMA mode a window
/// wider than the block (L > m with m < max_len: FMA's window is its near field, as in the
/// forward).
///
/// f16 storage ([`DecodeConfig::storage`], issue 29; needs `SHADER_F16`): the ring, the
/// history pages and the step tensors hold f16 elements (2 bytes), so Q, K, V of a step on the
/// GPU ([`StepTensors`]) are f16 buffers and O is written as f16; host tensors are rounded on
/// upload and O comes back widened to f32. The coarse slots, the dense decode's partials, the
/// LSE and every sum stay f32, so a step computes what the f32 decoder computes on the
/// rounded inputs (the prefill runs the f16 causal forward).
///
/// A step is recorded into few dispatches and makes nothing it made before (docs/perf.md,
/// change 30): on a GPU an FMA step is one pass (`decode_step`: the attention beside the cache
/// upkeep) with Average pooling and at most m + 1 tokens, else (and on a CPU adapter) two; a dense step is the upkeep, one
/// pass per history page and the merge; the parameter blocks, bind groups and the host path's
/// tensors and readback are kept across steps ([`Decoder::objects_made`]).
pub struct Decoder {
    ctx: GpuContext,
    cfg: DecodeConfig,
    limits: KernelLimits,
    layout: DecodeLayout,
    weights: WeightBuffers,
    fma: FmaAttention,
    dense: DenseAttention,
    uniforms: ShapeCache<RecordKey, Uniforms>,
    pipes: Mutex<Option<Arc<Pipes>>>,
    state: Mutex<State>,
    /// Parameter blocks' and level selectors' buffers made (the state counts its own).
    uniform_buffers: AtomicU64,
    /// Bind groups made.
    bind_groups: AtomicU64,
}

impl Decoder {
    /// An empty cache for `cfg` on `ctx`: checks the configuration and the learned weights
    /// (every level a sequence of `max_len` tokens uses), lays the cache out under the
    /// adapter's limits and allocates its fixed part.
    pub fn new(ctx: &GpuContext, cfg: DecodeConfig) -> Result<Self> {
        let tuning = DecodeTuning::for_device(ctx.info.device_type);
        Self::with_limits(ctx, cfg, KernelLimits::from_wgpu(&ctx.limits), tuning)
    }

    /// [`Decoder::new`] using at most `bytes` per storage binding (below the device's own
    /// limit): the cache is then bound in more, smaller groups and pages, with the same bits.
    pub fn with_max_binding(ctx: &GpuContext, cfg: DecodeConfig, bytes: u64) -> Result<Self> {
        let tuning = DecodeTuning::for_device(ctx.info.device_type);
        let limits = KernelLimits::from_wgpu(&ctx.limits).capped(bytes);
        Self::with_limits(ctx, cfg, limits, tuning)
    }

    /// [`Decoder::new`] tuned as `tuning` says instead of as its adapter's kind is
    /// ([`DecodeTuning::for_device`]: the dense decode's segments, one-pass FMA steps), using
    /// at most `max_binding` bytes per storage binding where given: for tests and benchmarks
    /// of a GPU's recording on any adapter. The segments change the dense decode's summation
    /// order only; one-pass and two-pass FMA steps give the same bits.
    pub fn with_tuning(
        ctx: &GpuContext,
        cfg: DecodeConfig,
        tuning: DecodeTuning,
        max_binding: Option<u64>,
    ) -> Result<Self> {
        let limits = KernelLimits::from_wgpu(&ctx.limits);
        let limits = max_binding.map_or(limits, |b| limits.capped(b));
        Self::with_limits(ctx, cfg, limits, tuning)
    }

    fn with_limits(
        ctx: &GpuContext,
        mut cfg: DecodeConfig,
        limits: KernelLimits,
        tuning: DecodeTuning,
    ) -> Result<Self> {
        ctx.check_alive()?;
        check_device_storage(ctx, cfg.storage)?;
        cfg.fma = cfg
            .fma
            .clone()
            .causal(true)
            .queries(crate::config::Queries::Fine);
        let layout = DecodeLayout::with_tuning(&cfg, &limits, tuning)?;
        // The history is filled by buffer copies, whose offsets and sizes are whole 4-byte
        // words: with f16 rows of an odd width a token would start mid-word.
        if cfg.storage == Storage::F16 && layout.page_tokens > 0 && cfg.head_dim % 2 == 1 {
            return Err(FmaError::InvalidConfig {
                what: "head_dim of an f16 decoding cache with history",
                value: cfg.head_dim.to_string(),
                allowed: "an even head_dim (or DecodeConfig::history(false), a window, or \
                          f32 storage)"
                    .into(),
            });
        }
        layout.check_weights(&cfg.fma.downsample)?;
        cfg.fma.validate_values()?;
        check_variants(&cfg.variants)?;
        // The prefill's forwards run the decoder's variants (FMA's window rule is checked when
        // the FMA mode is used: `DecodeConfig::check_fma_window`).
        let fma_cfg: FmaConfig = cfg.fma.clone().variants(cfg.variants.clone());
        let weights = WeightBuffers::new(ctx, &fma_cfg, &limits)?;
        let fma = FmaAttention::new(ctx, fma_cfg)?
            .max_binding(limits.max_binding)
            .with_storage(cfg.storage)?;
        let dense = DenseAttention::new(ctx, true)?
            .with_variants(cfg.variants.clone())
            .max_binding(limits.max_binding)
            .with_storage(cfg.storage)?;
        let state = State::new(ctx, &layout)?;
        Ok(Self {
            ctx: ctx.clone(),
            cfg,
            limits,
            layout,
            weights,
            fma,
            dense,
            uniforms: ShapeCache::default(),
            pipes: Mutex::new(None),
            state: Mutex::new(state),
            uniform_buffers: AtomicU64::new(0),
            bind_groups: AtomicU64::new(0),
        })
    }

    /// What this decoder has made on the GPU so far (not counting the prefill's forwards,
    /// which are the executors' own): a diagnostic, which steady-state steps leave unchanged.
    pub fn objects_made(&self) -> Result<ObjectsMade> {
        let st = self.lock()?;
        Ok(ObjectsMade {
            buffers: st.buffers_made + self.uniform_buffers.load(Ordering::Relaxed),
            bind_groups: self.bind_groups.load(Ordering::Relaxed),
        })
    }

    /// Builds the decoding passes' pipelines now rather than in the first step (for timing,
    /// or to pay the compilation before a latency-sensitive loop). Async: works on the web.
    pub async fn prepare_async(&self) -> Result<()> {
        self.pipes().await.map(|_| ())
    }

    /// Blocking [`Decoder::prepare_async`] (native only).
    #[cfg(not(target_arch = "wasm32"))]
    pub fn prepare(&self) -> Result<()> {
        pollster::block_on(self.prepare_async())
    }

    /// The configuration.
    pub fn config(&self) -> &DecodeConfig {
        &self.cfg
    }

    /// The cache's layout (ring, slots, groups, pages).
    pub fn layout(&self) -> &DecodeLayout {
        &self.layout
    }

    /// Tokens each sequence holds, (batch).
    pub fn lens(&self) -> Result<Vec<usize>> {
        Ok(self.lock()?.lens.clone())
    }

    /// Bytes the cache takes on the GPU now: the FMA state (fixed) and the history pages.
    pub fn bytes(&self) -> Result<(u64, u64)> {
        let st = self.lock()?;
        Ok((self.layout.fma_bytes(), st.history_bytes()))
    }

    /// Bytes of every GPU buffer the decoder holds now, as allocated (the ring, the coarse
    /// slots, the lengths, the history pages, the dense decode's partials and the host path's
    /// step tensors; not the pipelines, the parameter blocks or the prefill's forwards). With
    /// a window it depends on the window, the batch, the heads and the step size, never on
    /// how long the sequences are (the memory of a sliding-window decoder stays flat).
    pub fn allocated_bytes(&self) -> Result<u64> {
        Ok(self.lock()?.allocated_bytes())
    }

    /// Empties sequence `b` (it starts again at position 0); the other sequences are not
    /// touched. It is written through the queue, so it takes effect at the next submit, before
    /// that submit's commands: submit steps recorded with `EncodeStep` before resetting.
    pub fn reset(&self, b: usize) -> Result<()> {
        if b >= self.cfg.batch {
            return Err(FmaError::ShapeMismatch {
                what: "sequence index".into(),
                expected: format!("< {} (the batch)", self.cfg.batch),
                got: b.to_string(),
            });
        }
        self.lock()?.write_len(&self.ctx.queue, b, 0);
        Ok(())
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, State>> {
        self.state
            .lock()
            .map_err(crate::gpu::engine::pipelines::poisoned)
    }

    /// Whether the coarse rows are pooled with learned weights (else averaged).
    fn learned(&self) -> bool {
        matches!(self.cfg.fma.downsample, Downsample::Learned(_))
    }
}
