//! The executor of exact dense attention (the baseline every speed figure is compared with):
//! one dispatch of a [`DensePlan`], or a head over one storage binding in (query chunk, key
//! chunk) pairs (`split.rs`); its backward (`backward.rs`; host tensors over one binding in runs
//! of heads, `backward_runs.rs`).

mod backward;
mod backward_groups;
mod backward_runs;
mod backward_split;
mod coop;
mod split;
mod varlen;

pub use backward::DenseSaved;

use std::sync::{Arc, Mutex};

use crate::error::{FmaError, Result};
use crate::gpu::engine::buffers::uniform;
use crate::gpu::engine::cache::{Growing, ShapeCache};
use crate::gpu::engine::context::GpuContext;
use crate::gpu::engine::front::{forward_host, run_host};
use crate::gpu::engine::params::{check_variants, to_uniform_bytes, Params};
use crate::gpu::engine::passes::{desc, Role};
use crate::gpu::engine::record::{record_steps, Pipes, Resources, Selects};
use crate::gpu::engine::split_io::SplitIo;
use crate::gpu::engine::storage_types::check_device_storage;
use crate::gpu::engine::tensors::Output;
use crate::gpu::engine::tensors::{GpuTensors, HostPool, Scopes};
use crate::plan::{head_exceeds_binding, DenseKernel, DensePlan, KernelLimits, SoftmaxFlags};
use crate::shape::Shape;
use crate::storage::Storage;
use crate::variants::HeadSpan;
use crate::variants::Variants;

/// The uniforms of one shape: a parameter block per key chunk (the dense pass has no level
/// selector).
struct Uniforms {
    params: Vec<wgpu::Buffer>,
}

/// Exact dense softmax attention `softmax(Q K^T / sqrt(d)) V` on the GPU, tiled with an
/// online softmax (no n x n matrix in memory). Q: (batch, heads, seq, head_dim), K and V:
/// (batch, heads, seq_kv, head_dim) ([`Shape::cross`]; `seq_kv = seq` for self-attention).
/// Causal, with the queries aligned to the last keys (bottom-right, as FlashAttention: query i
/// sits at key position i + seq_kv - seq, as when new tokens attend to a cache; with
/// seq_kv < seq the first seq - seq_kv queries see no key and get O = 0, LSE = -inf):
///
/// ```text
///        keys ->                          keys ->
/// q  0 | x . . . |                 q  0 | x x x . . |
///    1 | x x . . |  seq = seq_kv      1 | x x x x . |  seq = 3, seq_kv = 5
///    2 | x x x . |                    2 | x x x x x |
///    3 | x x x x |                   x = attended, . = masked
/// ```
pub struct DenseAttention {
    ctx: GpuContext,
    causal: bool,
    /// Softmax variants (softcap, sinks, sliding window), checked per call against the shape.
    variants: Variants,
    limits: KernelLimits,
    /// The forward kernel's shape ([`DenseKernel::for_device`] of the adapter, or
    /// [`DenseAttention::kernel`]); the backward's passes do not depend on it.
    kernel: DenseKernel,
    /// Keys per dispatch (`None`: [`DensePlan::keys_per_dispatch`]).
    max_keys: Option<usize>,
    uniforms: ShapeCache<(Shape, HeadSpan), Uniforms>,
    host: Mutex<HostPool>,
    /// Tells a [`DenseSaved`] of this instance from another's.
    id: u64,
    /// The backward's parameter blocks per shape (`backward.rs`).
    backward_uniforms: ShapeCache<(Shape, HeadSpan), backward::BackwardUniforms>,
    /// The backward's LSE and D per row, (bh, n, 2), grown by capacity.
    stats: Mutex<Growing>,
    /// The element type of Q, K, V and O (issue 29).
    storage: Storage,
    /// The forward on cooperative matrices, where the context negotiated them (`coop.rs`).
    coop: coop::CoopPipelines,
}

/// The next [`DenseAttention`] id.
static NEXT_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

impl DenseAttention {
    /// Prepares dense attention on `ctx`.
    pub fn new(ctx: &GpuContext, causal: bool) -> Result<Self> {
        ctx.check_alive()?;
        Ok(Self {
            ctx: ctx.clone(),
            causal,
            variants: Variants::default(),
            limits: KernelLimits::from_wgpu(&ctx.limits),
            kernel: DenseKernel::for_device(ctx.info.device_type),
            max_keys: None,
            uniforms: ShapeCache::default(),
            host: Mutex::new(HostPool::default()),
            id: NEXT_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            backward_uniforms: ShapeCache::default(),
            stats: Mutex::new(Growing::new(
                "dense lse and delta",
                wgpu::BufferUsages::empty(),
            )),
            storage: Storage::F32,
            coop: coop::CoopPipelines::default(),
        })
    }

    /// Stores Q, K, V and O as `storage`, as [`crate::gpu::FmaAttention::with_storage`].
    pub fn with_storage(mut self, storage: Storage) -> Result<Self> {
        check_device_storage(&self.ctx, storage)?;
        self.storage = storage;
        Ok(self)
    }

    /// Runs the softmax variants `variants` (issue 30: softcap, sinks, sliding window),
    /// checked against each call's shape ([`Variants::validate`]). Call before the first
    /// forward.
    pub fn with_variants(mut self, variants: Variants) -> Self {
        self.variants = variants;
        self.uniforms = ShapeCache::default();
        self.backward_uniforms = ShapeCache::default();
        self
    }

    /// Uses at most `bytes` per storage binding, below the device's own limit, as
    /// [`crate::gpu::FmaAttention::max_binding`]. Call before the first forward.
    pub fn max_binding(mut self, bytes: u64) -> Self {
        self.limits = self.limits.capped(bytes);
        self.host = Mutex::new(HostPool::default());
        self
    }

    /// Runs the forward with the kernel of shape `kernel` instead of the adapter's choice
    /// ([`DenseKernel::for_device`]: the rows kernel on a CPU adapter such as lavapipe, the
    /// tiled one on a GPU): the tests run the tiled kernel on lavapipe with it, and a
    /// benchmark compares the two on one device. The results agree within f32 rounding (the
    /// sums are taken in another order); each is deterministic. Call before the first forward.
    pub fn kernel(mut self, kernel: DenseKernel) -> Self {
        self.kernel = kernel;
        self.uniforms = ShapeCache::default();
        self.host = Mutex::new(HostPool::default());
        self
    }

    /// Attends at most `keys` keys per query row in one dispatch (rounded down to whole key
    /// tiles), longer key ranges in chunks (the default,
    /// [`crate::plan::DENSE_KEY_TILES_PER_DISPATCH`] tiles, keeps llvmpipe's loop limit; see
    /// [`DensePlan::key_chunks`]). Smaller values exercise the chunking on small problems
    /// (tests) or measure its cost. The backward walks at most as many keys (dQ) and queries
    /// (dK, dV, over a K/V head's group) per dispatch. Call before the first forward.
    pub fn keys_per_dispatch(mut self, keys: usize) -> Self {
        self.max_keys = Some(keys);
        self.uniforms = ShapeCache::default();
        self.backward_uniforms = ShapeCache::default();
        self
    }

    /// The key ranges of `plan`'s attention dispatches, in order.
    fn key_chunks(&self, plan: &DensePlan) -> Vec<(usize, usize)> {
        plan.key_chunks(self.max_keys.unwrap_or_else(|| plan.keys_per_dispatch()))
    }

    /// The plan a call with `shape` would execute.
    pub fn plan(&self, shape: Shape) -> Result<DensePlan> {
        self.plan_in(shape, HeadSpan::whole(shape))
    }

    /// The plan of `shape` as the heads `span` of the caller's problem (a run of heads: the
    /// variants are checked against the caller's heads, and each problem reads its head's
    /// sink).
    pub(super) fn plan_in(&self, shape: Shape, span: HeadSpan) -> Result<DensePlan> {
        self.variants.validate(span.heads, self.causal)?;
        Ok(DensePlan::with_kernel(shape, &self.limits, self.kernel)?
            .with_softmax(SoftmaxFlags::of(&self.variants))
            .with_storage(self.storage)
            .in_span(span))
    }

    /// Refuses the softmax variants on `full` run a head at a time through copies
    /// (`split.rs`: a head split across storage bindings, or resident tensors over one): its
    /// (query chunk, key chunk) pairs merge partial rows, and neither the window's band nor
    /// the sink's one term per row (nor the head's sink) is planned across those pairs.
    fn check_unsplit(&self, full: Shape) -> Result<()> {
        if self.variants.is_plain() {
            return Ok(());
        }
        Err(FmaError::LimitExceeded {
            what: format!(
                "{full} with the softmax variants (softcap, sinks, window), run a head at a \
                 time through copies"
            ),
            requested: full.elements().max(full.kv_elements()) as u64 * 4,
            max: self.limits.binding_bytes(),
            unit: "bytes in one storage binding",
            advice: "the variants run on heads that fit one storage binding, from host \
                     tensors (in runs of heads) or resident tensors that fit one binding: pass \
                     host tensors, fewer heads or shorter sequences per call"
                .into(),
        })
    }

    /// The parameter block of `plan` (every query row against every key), with the variants.
    fn params(&self, plan: &DensePlan) -> Result<Params> {
        check_variants(&self.variants)?;
        let mut p = self.plain_params(plan);
        p.set_variants(&self.variants, plan.head_span.heads, plan.head_span.first);
        Ok(p)
    }

    fn plain_params(&self, plan: &DensePlan) -> Params {
        let s = plan.shape;
        Params {
            n: s.seq as u32,
            n_kv: s.seq_kv as u32,
            d: s.head_dim as u32,
            m: plan.attention.spec.wg,
            p: 1,
            causal: self.causal as u32,
            batch_heads: s.batch_heads() as u32,
            tiles_per_block: plan.tiles,
            total_workgroups: plan.attention.workgroups,
            workgroups_x: plan.attention.grid[0],
            scale: 1.0 / (s.head_dim as f32).sqrt(),
            chunk_hi: s.seq as u32,
            key_hi: s.seq_kv as u32,
            kv_group: s.group() as u32,
            seqs: plan.sequences.as_ref().map_or(0, |t| t.seqs as u32),
            heads: s.heads as u32,
            q_head_stride: plan
                .sequences
                .as_ref()
                .map_or(0, |t| t.q_head_stride as u32),
            kv_head_stride: plan
                .sequences
                .as_ref()
                .map_or(0, |t| t.kv_head_stride as u32),
            ..Default::default()
        }
    }

    fn uniforms(&self, plan: &DensePlan) -> Result<Arc<Uniforms>> {
        self.uniforms.get_or_make((plan.shape, plan.head_span), || {
            let base = self.params(plan)?;
            let params = self
                .key_chunks(plan)
                .into_iter()
                .map(|(lo, hi)| {
                    let mut p = base;
                    (p.key_lo, p.key_hi) = (lo as u32, hi as u32);
                    let bytes = to_uniform_bytes(&p)?;
                    Ok(uniform(
                        &self.ctx.device,
                        &self.ctx.queue,
                        "dense params",
                        &bytes,
                    ))
                })
                .collect::<Result<_>>()?;
            Ok(Uniforms { params })
        })
    }

    /// Records `steps` (the plan's dispatch, or a split head's pairs) with `params`.
    fn record(
        &self,
        cpass: &mut wgpu::ComputePass<'_>,
        steps: &[crate::plan::Dispatch],
        pipes: &Pipes,
        params: &wgpu::Buffer,
        t: &GpuTensors<'_>,
        lse: &wgpu::Buffer,
    ) -> Result<()> {
        self.record_with(cpass, steps, pipes, params, (t, lse), None)
    }

    /// [`DenseAttention::record`] with a variable-length batch's sequence table, when given.
    fn record_with(
        &self,
        cpass: &mut wgpu::ComputePass<'_>,
        steps: &[crate::plan::Dispatch],
        pipes: &Pipes,
        params: &wgpu::Buffer,
        (t, lse): (&GpuTensors<'_>, &wgpu::Buffer),
        table: Option<&wgpu::Buffer>,
    ) -> Result<()> {
        let mut res = Resources::default()
            .with(Role::Params, params)
            .tensors(t, lse);
        if let Some(table) = table {
            res = res.with(Role::SeqTable, table);
        }
        // Pad rows select no level: one selector for the whole list.
        let selects = steps
            .iter()
            .any(|d| desc(d.pass).level_select)
            .then(|| Selects::new(&self.ctx, steps))
            .transpose()?;
        record_steps(&self.ctx, cpass, steps, pipes, selects.as_ref(), &res)
    }

    /// The forward of `plan` on cooperative matrices, where the context has them and the
    /// kernel covers the plan (`coop.rs`).
    async fn coop_run(&self, plan: &DensePlan) -> Result<Option<coop::CoopRun>> {
        let plain = self.variants.is_plain();
        let base = self.plain_params(plan);
        self.coop.run(&self.ctx, plan, plain, base).await
    }

    /// Records `plan`'s dispatches, one per key chunk in order, into a compute pass of `enc`
    /// (or its one dispatch on cooperative matrices, `coop`).
    #[allow(clippy::too_many_arguments)]
    fn record_plan(
        &self,
        enc: &mut wgpu::CommandEncoder,
        plan: &DensePlan,
        pipes: &Pipes,
        uniforms: &Uniforms,
        t: &GpuTensors<'_>,
        lse: &wgpu::Buffer,
        coop: Option<&coop::CoopRun>,
    ) -> Result<()> {
        if let Some(run) = coop {
            return run.record(&self.ctx, enc, t, lse);
        }
        let mut cpass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
            label: Some("dense forward"),
            timestamp_writes: None,
        });
        for params in &uniforms.params {
            self.record(&mut cpass, &[plan.attention], pipes, params, t, lse)?;
        }
        Ok(())
    }

    /// Dense attention of host tensors (async). Shapes as [`crate::gpu::FmaAttention::forward_async`].
    ///
    /// Tensors over one storage binding are processed in pieces: runs of heads (the unsplit
    /// result to the bit), or for a head over the limit, pairs of query and key chunks
    /// (`crate::plan::DenseSplitPlan`; a later key chunk merges into the rows' partial results,
    /// so the result equals the unsplit one within rounding).
    pub async fn forward_async(
        &self,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        shape: Shape,
        want_lse: bool,
    ) -> Result<Output> {
        // A head over one storage binding is cut into chunks of queries and keys; tensors
        // over a binding whose heads fit are processed a run of heads at a time.
        forward_host(
            shape,
            q,
            k,
            v,
            want_lse,
            head_exceeds_binding(shape, &self.limits),
            // A run's variants are checked against the caller's heads (the sinks' length).
            |s| self.plan_in(s, HeadSpan::whole(shape)).map(|_| ()),
            |q, k, v, s, span| self.forward_whole(q, k, v, (s, span), want_lse),
            |io| self.forward_split(io, shape),
        )
        .await
    }

    /// Whether a forward of `shape` splits a head along its sequence ([`DenseSplitPlan`]).
    ///
    /// [`DenseSplitPlan`]: crate::plan::DenseSplitPlan
    pub(crate) fn splits_head(&self, shape: Shape) -> bool {
        head_exceeds_binding(shape, &self.limits)
    }

    /// One forward of host tensors whose every buffer fits the adapter's limits.
    async fn forward_whole(
        &self,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        (shape, span): (Shape, HeadSpan),
        want_lse: bool,
    ) -> Result<Output> {
        let plan = self.plan_in(shape, span)?;
        let pipes = Pipes::new(&self.ctx, [&plan.attention]).await?;
        let uniforms = self.uniforms(&plan)?;
        let coop = self.coop_run(&plan).await?;
        run_host(
            &self.ctx,
            &self.host,
            (self.limits.binding_bytes(), self.storage),
            shape,
            (q, k, v),
            want_lse,
            "the dense forward",
            |enc, t, lse| self.record_plan(enc, &plan, &pipes, &uniforms, &t, lse, coop.as_ref()),
        )
        .await
    }

    /// Dense attention of tensors already on the GPU; results stay there. Tensors over one
    /// storage binding are copied through bindings that fit, a head (or chunk) at a time: Q, K
    /// and V then need `COPY_SRC` usage and O and the LSE `COPY_DST`.
    pub async fn forward_buffers_async(&self, t: GpuTensors<'_>, shape: Shape) -> Result<()> {
        self.forward_buffers_in(t, shape, HeadSpan::whole(shape))
            .await
    }

    /// [`DenseAttention::forward_buffers_async`] of `shape` as the heads `span` of the
    /// caller's problem (a training run of heads, `backward_runs.rs`).
    pub(super) async fn forward_buffers_in(
        &self,
        t: GpuTensors<'_>,
        shape: Shape,
        span: HeadSpan,
    ) -> Result<()> {
        t.check_as(shape, self.storage)?;
        if shape.elements() as u64 * 4 > self.limits.binding_bytes() {
            return self
                .forward_split(SplitIo::Device(t), shape)
                .await
                .map(|_| ());
        }
        let scopes = Scopes::push(&self.ctx)?;
        let mut enc = self
            .ctx
            .device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                label: Some("dense"),
            });
        self.encode_in(&mut enc, t, shape, span).await?;
        self.ctx.queue.submit([enc.finish()]);
        scopes.pop(&self.ctx, "the dense forward").await
    }

    /// [`DenseAttention::encode`], async (works on the web too).
    pub async fn encode_async(
        &self,
        enc: &mut wgpu::CommandEncoder,
        t: GpuTensors<'_>,
        shape: Shape,
    ) -> Result<()> {
        self.encode_in(enc, t, shape, HeadSpan::whole(shape)).await
    }

    /// [`DenseAttention::encode_async`] of `shape` as the heads `span` of the caller's problem.
    async fn encode_in(
        &self,
        enc: &mut wgpu::CommandEncoder,
        t: GpuTensors<'_>,
        shape: Shape,
        span: HeadSpan,
    ) -> Result<()> {
        t.check_as(shape, self.storage)?;
        let plan = self.plan_in(shape, span)?;
        let pipes = Pipes::new(&self.ctx, [&plan.attention]).await?;
        let uniforms = self.uniforms(&plan)?;
        let lse = t.lse_or_scratch(&self.ctx.device, plan.shape);
        let coop = self.coop_run(&plan).await?;
        self.record_plan(enc, &plan, &pipes, &uniforms, &t, &lse, coop.as_ref())
    }
}
