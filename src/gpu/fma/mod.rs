//! The FMA executor (algorithm.md §3-7): [`FmaAttention`] turns an [`FmaPlan`] into recorded
//! dispatches, one command encoder and one submit per forward (`forward.rs`), a head over one
//! storage binding chunk by chunk (`split.rs`; its coarse rows through compact bindings when
//! they exceed one, `split_coarse.rs`), a variable-length batch (`varlen.rs`, its training in
//! `varlen_train.rs`), and the fine-query backward (`backward.rs`).
//! Its device state: learned weights (`engine::weights`), per-shape uniforms and buffers that grow
//! by capacity (`workspace.rs`).

pub(crate) mod backward;
mod backward_groups;
mod backward_runs;
mod backward_split;
mod backward_split_coarse_q;
mod forward;
mod split;
mod split_coarse;
mod varlen;
mod varlen_train;
mod workspace;

use std::sync::Mutex;

use crate::config::{Downsample, FmaConfig, Queries};
use crate::error::Result;
use crate::gpu::engine::cache::ShapeCache;
use crate::gpu::engine::context::GpuContext;
use crate::gpu::engine::params::{check_variants, LevelInfo, Params, MAX_LEVELS};
use crate::gpu::engine::storage_types::check_device_storage;
use crate::gpu::engine::tensors::HostPool;
use crate::plan::{FmaKernel, FmaPlan, KernelLimits};
use crate::shape::Shape;
use crate::storage::Storage;
use crate::variants::HeadSpan;

use crate::gpu::engine::weights::WeightBuffers;
use backward::BackwardScratch;
use workspace::{Buffers, Uniforms};

/// Fast Multipole Attention on the GPU (algorithm.md §3-7), with fine queries (O(n log n),
/// causal or not) or coarse queries (O(n), bidirectional only) as `FmaConfig::queries` says.
///
/// Built once per configuration; pipelines are cached per device, uniforms per shape, and the
/// large buffers grow by capacity, so repeated calls allocate nothing once the largest shape
/// has been seen. Safe to share between threads.
pub struct FmaAttention {
    ctx: GpuContext,
    cfg: FmaConfig,
    limits: KernelLimits,
    weights: WeightBuffers,
    /// Unique per instance: ties a [`crate::gpu::Saved`] forward to the instance that made it.
    id: u64,
    /// The forward's uniforms per shape.
    uniforms: ShapeCache<(Shape, HeadSpan), Uniforms>,
    /// Coarse buffers of the forward, locked while a forward is recorded. Forwards recorded
    /// one after another may share them: each recording writes every coarse value it later
    /// reads, and the queue runs command buffers in submission order.
    buffers: Mutex<Buffers>,
    /// Buffers of host tensors (locked before `buffers`, never after).
    host: Mutex<HostPool>,
    /// The backward's uniforms per (shape, steps recorded: with or without the weight passes).
    backward_uniforms: ShapeCache<(Shape, HeadSpan, usize), Uniforms>,
    /// The backward's scratch buffers, locked from recording to submit; backwards share them
    /// as forwards share `buffers`.
    backward_scratch: Mutex<BackwardScratch>,
    /// The element type of Q, K, V and O (issue 29).
    storage: Storage,
    /// The fused fine-query pass's shape ([`FmaKernel::for_device`] of the adapter, or
    /// [`FmaAttention::kernel`]'s).
    kernel: FmaKernel,
}

impl FmaAttention {
    /// What [`FmaAttention::new`] checks before it uploads anything: a live device, m and p,
    /// the mask against coarse queries and grids, and the learned weights' shapes and values.
    pub(crate) fn check_config(ctx: &GpuContext, cfg: &FmaConfig) -> Result<()> {
        ctx.check_alive()?;
        let head_dim = match &cfg.downsample {
            Downsample::Learned(w) => w.head_dim,
            Downsample::Average => 1,
        };
        // Level coverage is checked per call (it depends on n); seq = 1 needs no levels (a
        // grid fixes the sequence: its H W tokens).
        cfg.validate(head_dim, cfg.grid.map_or(1, |g| g.tokens()))?;
        cfg.validate_values()
    }
}

/// The next [`FmaAttention`] id.
static NEXT_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

impl FmaAttention {
    /// Prepares FMA with `cfg` on `ctx`: validates m and p and uploads learned weights once.
    /// Shape-dependent checks (head_dim, levels present in the weights, binding sizes) happen
    /// per call, before anything is recorded.
    pub fn new(ctx: &GpuContext, cfg: FmaConfig) -> Result<Self> {
        Self::check_config(ctx, &cfg)?;
        let limits = KernelLimits::from_wgpu(&ctx.limits);
        let weights = WeightBuffers::new(ctx, &cfg, &limits)?;
        Ok(Self {
            ctx: ctx.clone(),
            cfg,
            limits,
            weights,
            id: NEXT_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            uniforms: ShapeCache::default(),
            buffers: Mutex::new(Buffers::default()),
            host: Mutex::new(HostPool::default()),
            backward_uniforms: ShapeCache::default(),
            backward_scratch: Mutex::new(BackwardScratch::default()),
            storage: Storage::F32,
            kernel: FmaKernel::for_device(ctx.info.device_type),
        })
    }

    /// Stores Q, K, V and O as `storage` ([`Storage`]: f16 needs `SHADER_F16` on the device,
    /// else [`crate::FmaError::MissingFeature`]). With f16, the caller's buffers hold f16
    /// elements, host tensors are rounded into f16 buffers of the executor's (every host
    /// path: whole, runs of heads, groups of sequences, a split head's chunks) and O and the
    /// gradients widened back. Call before the first forward.
    pub fn with_storage(mut self, storage: Storage) -> Result<Self> {
        check_device_storage(&self.ctx, storage)?;
        self.storage = storage;
        self.host = Mutex::new(HostPool::default());
        Ok(self)
    }

    /// Uses at most `bytes` per storage binding, below the device's own limit (a larger value
    /// changes nothing): tensors over it take the split paths ([`crate::plan::SplitPlan`]).
    /// For checking those paths on an adapter (`multipole-attn doctor` does), or for bounding
    /// the size of the library's single allocations. Call before the first forward.
    pub fn max_binding(mut self, bytes: u64) -> Self {
        self.limits = self.limits.capped(bytes);
        self.uniforms = ShapeCache::default();
        self.buffers = Mutex::new(Buffers::default());
        self.host = Mutex::new(HostPool::default());
        self.backward_uniforms = ShapeCache::default();
        self.backward_scratch = Mutex::new(BackwardScratch::default());
        self
    }

    /// Runs the forward's fused fine-query pass with the kernel of shape `kernel` instead of
    /// the adapter's choice ([`FmaKernel::for_device`]: the rows kernel on a CPU adapter such
    /// as lavapipe, the tiled one on a GPU): the tests run the tiled kernel on lavapipe with
    /// it, and a benchmark compares the two on one device. The results agree within f32
    /// rounding (the sums are taken in another order); each is deterministic. The training
    /// forward runs it too; the backward is the same either way. Call before the first forward.
    pub fn kernel(mut self, kernel: FmaKernel) -> Self {
        self.kernel = kernel;
        self.uniforms = ShapeCache::default();
        self
    }

    /// The kernel the forward's fused pass is planned with ([`FmaAttention::kernel`]'s; under
    /// f16 storage too: the tiled pass's loads and stores of Q, K, V and O are the composer's
    /// patterns, so it has an f16 variant).
    pub(super) fn fine_kernel(&self) -> FmaKernel {
        self.kernel
    }

    /// The plan a call with `shape` would execute (dispatches per level, buffer sizes).
    pub fn plan(&self, shape: Shape) -> Result<FmaPlan> {
        self.plan_in(shape, HeadSpan::whole(shape))
    }

    /// The plan of `shape` as the heads `span` of the caller's problem (a run of heads: the
    /// variants are checked against the caller's heads, and each problem reads its head's
    /// sink).
    pub(super) fn plan_in(&self, shape: Shape, span: HeadSpan) -> Result<FmaPlan> {
        self.check_variants(span.heads)?;
        Ok(
            FmaPlan::with_kernel(shape, &self.cfg, &self.limits, self.fine_kernel())?
                .with_storage(self.storage)
                .in_span(span),
        )
    }

    /// The softmax variants against the caller's `heads` query heads, and what the parameter
    /// block holds.
    fn check_variants(&self, heads: usize) -> Result<()> {
        self.cfg.variants.validate(heads, self.cfg.causal)?;
        check_variants(&self.cfg.variants)
    }

    /// The parameter block of `plan` (the whole sequence; a split head's chunks adjust it).
    fn params(&self, plan: &FmaPlan) -> Params {
        let s = plan.shape;
        let d = s.head_dim;
        let mut levels = [LevelInfo::default(); MAX_LEVELS];
        let mut weight_offset = 0usize;
        for (i, lv) in plan.levels.levels.iter().enumerate() {
            levels[i] = LevelInfo {
                window: lv.window as u32,
                windows: lv.windows as u32,
                row_offset: lv.row_offset as u32,
                weight_offset: weight_offset as u32,
            };
            // Kernel taps: w_l (2D: s_l^2, algorithm.md §9).
            let taps = if plan.grid.is_some() {
                lv.window * lv.window
            } else {
                lv.window
            };
            weight_offset += d * plan.levels.p * taps;
        }
        let mut params = Params {
            n: s.seq as u32,
            n_kv: s.seq_kv as u32,
            d: d as u32,
            // The index maps' m and p (n and 1 for m >= n, `levels::effective_block`).
            m: plan.levels.m as u32,
            p: plan.levels.p as u32,
            num_levels: plan.levels.count() as u32,
            causal: self.cfg.causal as u32,
            count_correction: self.cfg.count_correction as u32,
            learned: matches!(self.cfg.downsample, Downsample::Learned(_)) as u32,
            batch_heads: s.batch_heads() as u32,
            kv_group: s.group() as u32,
            coarse_rows: plan.workspace.coarse_rows as u32,
            tiles_per_block: plan.tiles_per_block,
            total_workgroups: plan.attention.workgroups,
            workgroups_x: plan.attention.grid[0],
            scale: 1.0 / (d as f32).sqrt(),
            coarse_queries: (plan.queries == Queries::Coarse) as u32,
            pooled: if plan.queries == Queries::Coarse {
                3
            } else {
                2
            },
            weight_stride: self.weights.weight_stride,
            bias_stride: self.weights.bias_stride,
            bias_base: self.weights.bias_base,
            chunk_hi: s.seq as u32,
            grid_w: plan.grid.map_or(0, |g| g.w as u32),
            // The downsample pass's tap-chunk partial sums follow the coarse rows (the
            // backward moves `partials_at` further, and sizes K~ and V~ to match).
            partials_at: (plan.workspace.coarse_kv_bytes / 4) as u32,
            q_partials_at: (plan.workspace.coarse_bytes / 4) as u32,
            levels,
            ..Default::default()
        };
        params.set_variants(
            &self.cfg.variants,
            plan.head_span.heads,
            plan.head_span.first,
        );
        if let Some(t) = &plan.sequences {
            // Every sequence's own work (shaders/shared/sequences.wgsl): the levels' rows
            // concatenated over the sequences of a head.
            for (info, offset) in params.levels.iter_mut().zip(t.level_offsets()) {
                info.row_offset = offset as u32;
            }
            params.coarse_rows = t.coarse_rows() as u32;
            params.seqs = t.seqs as u32;
            params.heads = s.heads as u32;
            params.q_head_stride = t.q_head_stride as u32;
            params.kv_head_stride = t.kv_head_stride as u32;
            params.n = plan.levels.n as u32;
            params.chunk_hi = plan.levels.n as u32;
        }
        params
    }

    /// The uniforms of `plan`'s shape (its parameters and the selectors of its steps).
    fn uniforms(&self, plan: &FmaPlan) -> Result<std::sync::Arc<Uniforms>> {
        self.uniforms.get_or_make((plan.shape, plan.head_span), || {
            Uniforms::new(&self.ctx, &self.params(plan), &plan.steps())
        })
    }
}
