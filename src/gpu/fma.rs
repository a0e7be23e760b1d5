//! The executor of FMA, fine or coarse queries: turns an [`FmaPlan`] into bind groups and
//! dispatches (`FmaPlan::steps`, level by level), in one command encoder and one submit.

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::config::{Downsample, FmaConfig, Queries};
use crate::error::Result;
use crate::gpu::backward::Scratch;
use crate::gpu::coarse::CoarseQueryBuffers;
use crate::gpu::io::{forward_host, GpuTensors, HostBuffers, Scopes, Staged};
use crate::gpu::params::{to_uniform_bytes, LevelInfo, LevelSelect, Params, MAX_LEVELS};
use crate::gpu::pipelines::poisoned;
use crate::gpu::readback::{storage, uniform};
use crate::gpu::shaders::Pass;
use crate::gpu::split::SplitIo;
use crate::gpu::{GpuContext, Output};
use crate::levels::window;
use crate::plan::{Dispatch, FmaPlan, KernelLimits};
use crate::shape::Shape;
use crate::weights::LevelWeights;

/// Learned weights on the GPU: `w` = [keys | values | queries], each kind every level's
/// (d, p, w_l) weights concatenated (`weight_stride` elements apart); `b` likewise with the
/// (d, p) biases. Queries only with coarse queries; 16-byte dummies in Average mode.
pub(super) struct WeightBuffers {
    pub(super) w: wgpu::Buffer,
    pub(super) b: wgpu::Buffer,
    pub(super) weight_stride: u32,
    pub(super) bias_stride: u32,
}

impl WeightBuffers {
    fn new(ctx: &GpuContext, cfg: &FmaConfig, limits: &KernelLimits) -> Result<Self> {
        type Pick = fn(&LevelWeights) -> &Vec<f32>;
        let (w_kinds, b_kinds): (Vec<Pick>, Vec<Pick>) = match cfg.queries {
            Queries::Fine => (vec![|l| &l.wk, |l| &l.wv], vec![|l| &l.bk, |l| &l.bv]),
            Queries::Coarse => (
                vec![|l| &l.wk, |l| &l.wv, |l| &l.wq],
                vec![|l| &l.bk, |l| &l.bv, |l| &l.bq],
            ),
        };
        let concat = |kinds: &[Pick]| -> (Vec<f32>, usize) {
            match &cfg.downsample {
                Downsample::Learned(w) => {
                    let stride = w.levels.iter().map(|l| kinds[0](l).len()).sum();
                    let all = kinds
                        .iter()
                        .flat_map(|f| w.levels.iter().flat_map(|l| f(l).iter().copied()))
                        .collect();
                    (all, stride)
                }
                Downsample::Average => (Vec::new(), 0),
            }
        };
        let upload = |label: &str, data: Vec<f32>| -> Result<wgpu::Buffer> {
            let bytes = data.len() as u64 * 4;
            let max = limits.max_binding.min(limits.max_buffer);
            if bytes > max {
                return Err(crate::FmaError::LimitExceeded {
                    what: format!("learned {label} in one storage binding"),
                    requested: bytes,
                    max,
                });
            }
            let buf = storage(&ctx.device, label, bytes, wgpu::BufferUsages::COPY_DST);
            ctx.queue.write_buffer(&buf, 0, bytemuck::cast_slice(&data));
            Ok(buf)
        };
        let (w, weight_stride) = concat(&w_kinds);
        let (b, bias_stride) = concat(&b_kinds);
        let stride = |x: usize| {
            u32::try_from(x).map_err(|_| crate::FmaError::LimitExceeded {
                what: "learned weights of one tensor kind (elements)".into(),
                requested: x as u64,
                max: u32::MAX as u64,
            })
        };
        Ok(Self {
            weight_stride: stride(weight_stride)?,
            bias_stride: stride(bias_stride)?,
            w: upload("weights", w)?,
            b: upload("biases", b)?,
        })
    }
}

/// Per-shape device state: parameters, one level selector per dispatch, the coarse K~ and V~
/// buffers and the coarse-query buffers.
pub(super) struct Workspace {
    pub(super) params: wgpu::Buffer,
    pub(super) level_select: wgpu::Buffer,
    pub(super) select_stride: u32,
    coarse_k: wgpu::Buffer,
    coarse_v: wgpu::Buffer,
    coarse_q: CoarseQueryBuffers,
    /// Buffers for host tensors, made on the first host call of this shape.
    host: Option<HostBuffers>,
}

/// Fast Multipole Attention on the GPU (algorithm.md §3-7), with fine queries (O(n log n),
/// causal or not) or coarse queries (O(n), bidirectional only) as `FmaConfig::queries` says.
///
/// Built once per configuration; pipelines and per-shape buffers are cached, so repeated calls
/// with the same shape allocate nothing. Safe to share between threads.
pub struct FmaAttention {
    pub(super) ctx: GpuContext,
    pub(super) cfg: FmaConfig,
    pub(super) limits: KernelLimits,
    pub(super) weights: WeightBuffers,
    /// Unique per instance: ties a [`crate::gpu::Saved`] forward to the instance that made it.
    pub(super) id: u64,
    workspaces: Mutex<HashMap<Shape, Arc<Mutex<Workspace>>>>,
    /// The backward's scratch buffers per shape (`gpu::backward`).
    pub(super) backward_cache: Mutex<HashMap<Shape, Arc<Scratch>>>,
}

/// Shapes whose buffers are kept; beyond this the cache is cleared (a long-running caller
/// cycling through many shapes should not grow memory without bound).
pub(super) const MAX_CACHED_SHAPES: usize = 8;

/// The next [`FmaAttention`] id.
static NEXT_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

impl FmaAttention {
    /// Prepares FMA with `cfg` on `ctx`: validates m and p and uploads learned weights once.
    /// Shape-dependent checks (head_dim, levels present in the weights, binding sizes) happen
    /// per call, before anything is recorded.
    pub fn new(ctx: &GpuContext, cfg: FmaConfig) -> Result<Self> {
        ctx.check_alive()?;
        let head_dim = match &cfg.downsample {
            Downsample::Learned(w) => w.head_dim,
            Downsample::Average => 1,
        };
        // Level coverage is checked per call (it depends on n); seq = 1 needs no levels.
        cfg.validate(head_dim, 1)?;
        cfg.validate_values()?;
        let limits = KernelLimits::from_wgpu(&ctx.limits);
        let weights = WeightBuffers::new(ctx, &cfg, &limits)?;
        Ok(Self {
            ctx: ctx.clone(),
            cfg,
            limits,
            weights,
            id: NEXT_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            workspaces: Mutex::new(HashMap::new()),
            backward_cache: Mutex::new(HashMap::new()),
        })
    }

    /// Uses at most `bytes` per storage binding, below the device's own limit (a larger value
    /// changes nothing): tensors over it take the split paths (`crate::plan_split`). For
    /// checking those paths on an adapter (`multipole-attn doctor` does), or for bounding the
    /// size of the library's single allocations. Call before the first forward.
    pub fn max_binding(mut self, bytes: u64) -> Self {
        self.limits = self.limits.capped(bytes);
        self.workspaces = Mutex::new(HashMap::new());
        self
    }

    /// The configuration.
    pub fn config(&self) -> &FmaConfig {
        &self.cfg
    }

    /// The plan a call with `shape` would execute (dispatches per level, buffer sizes).
    pub fn plan(&self, shape: Shape) -> Result<FmaPlan> {
        FmaPlan::new(shape, &self.cfg, &self.limits)
    }

    pub(super) fn params(&self, plan: &FmaPlan) -> Params {
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
            weight_offset += d * self.cfg.rank * window(self.cfg.block, lv.level);
        }
        Params {
            n: s.seq as u32,
            d: d as u32,
            m: self.cfg.block as u32,
            p: self.cfg.rank as u32,
            num_levels: plan.levels.count() as u32,
            causal: self.cfg.causal as u32,
            count_correction: self.cfg.count_correction as u32,
            learned: matches!(self.cfg.downsample, Downsample::Learned(_)) as u32,
            batch_heads: s.batch_heads() as u32,
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
            chunk_hi: s.seq as u32,
            levels,
            ..Default::default()
        }
    }

    /// The cached workspace of `plan`'s shape, made (and its parameters written) on first use.
    pub(super) fn workspace(&self, plan: &FmaPlan) -> Result<Arc<Mutex<Workspace>>> {
        let mut map = self.workspaces.lock().map_err(poisoned)?;
        if let Some(ws) = map.get(&plan.shape) {
            return Ok(ws.clone());
        }
        if map.len() >= MAX_CACHED_SHAPES {
            map.clear();
        }
        let device = &self.ctx.device;
        let params_buf = self.uniform("params", &to_uniform_bytes(&self.params(plan))?);
        let stride = self.select_stride();
        let level_select = self.uniform("level_select", &level_selects(&plan.steps(), stride)?);
        let ws = Arc::new(Mutex::new(Workspace {
            params: params_buf,
            level_select,
            select_stride: stride,
            coarse_k: storage(
                device,
                "coarse_k",
                plan.workspace.coarse_bytes,
                wgpu::BufferUsages::empty(),
            ),
            coarse_v: storage(
                device,
                "coarse_v",
                plan.workspace.coarse_bytes,
                wgpu::BufferUsages::empty(),
            ),
            coarse_q: CoarseQueryBuffers::new(device, plan),
            host: None,
        }));
        map.insert(plan.shape, ws.clone());
        Ok(ws)
    }

    /// A uniform buffer holding `bytes`.
    pub(super) fn uniform(&self, label: &str, bytes: &[u8]) -> wgpu::Buffer {
        uniform(&self.ctx.device, &self.ctx.queue, label, bytes)
    }

    /// Bytes between the level selectors of consecutive dispatches: the adapter's alignment
    /// of dynamic uniform offsets.
    pub(super) fn select_stride(&self) -> u32 {
        self.ctx.limits.min_uniform_buffer_offset_alignment.max(16)
    }

    /// Group 0 of `pass` for this forward (binding numbers as in the pass's WGSL file), with
    /// `params` as its parameter block (the workspace's, or a chunk's for a split head).
    pub(super) fn bind_group(
        &self,
        pass: Pass,
        params: &wgpu::Buffer,
        ws: &Workspace,
        t: &GpuTensors<'_>,
        lse: &wgpu::Buffer,
    ) -> wgpu::BindGroup {
        let layouts = &self.ctx.kernels.layouts;
        let (w, cq) = (&self.weights, &ws.coarse_q);
        let (layout, bufs): (_, Vec<(u32, &wgpu::Buffer)>) = match pass {
            Pass::Downsample => (
                &layouts.downsample,
                vec![
                    (0, params),
                    (1, t.k),
                    (2, t.v),
                    (3, t.q),
                    (4, &w.w),
                    (5, &w.b),
                    (6, &ws.coarse_k),
                    (7, &ws.coarse_v),
                    (8, &cq.q),
                ],
            ),
            Pass::CoarseAttention => (
                &layouts.coarse,
                vec![
                    (0, params),
                    (1, &cq.q),
                    (4, &ws.coarse_k),
                    (5, &ws.coarse_v),
                    (6, &cq.o),
                    (7, &cq.lse),
                ],
            ),
            Pass::UpsampleMerge => (
                &layouts.merge,
                vec![(0, params), (1, &cq.o), (2, &cq.lse), (6, t.out), (7, lse)],
            ),
            // FineAttention (the only other pass an FMA plan holds).
            _ => (
                &layouts.fine,
                vec![
                    (0, params),
                    (1, t.q),
                    (2, t.k),
                    (3, t.v),
                    (4, &ws.coarse_k),
                    (5, &ws.coarse_v),
                    (6, t.out),
                    (7, lse),
                ],
            ),
        };
        let entries: Vec<_> = bufs
            .iter()
            .map(|&(binding, b)| wgpu::BindGroupEntry {
                binding,
                resource: b.as_entire_binding(),
            })
            .collect();
        self.ctx
            .device
            .create_bind_group(&wgpu::BindGroupDescriptor {
                label: Some(pass.name()),
                layout,
                entries: &entries,
            })
    }

    /// Records every dispatch of `plan` into `enc`, in the order of `plan.steps()`; the
    /// per-level passes find their level and grid in the step's LevelSelect slot.
    fn record(
        &self,
        enc: &mut wgpu::CommandEncoder,
        plan: &FmaPlan,
        ws: &Workspace,
        t: GpuTensors<'_>,
        lse: &wgpu::Buffer,
        pipes: &Pipes,
    ) -> Result<()> {
        let select = self.select_group(&ws.level_select);
        let mut groups: HashMap<Pass, wgpu::BindGroup> = HashMap::new();
        let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
            label: Some("fma forward"),
            timestamp_writes: None,
        });
        for (k, step) in plan.steps().iter().enumerate() {
            let group = groups
                .entry(step.pass)
                .or_insert_with(|| self.bind_group(step.pass, &ws.params, ws, &t, lse));
            pass.set_pipeline(pipes.get(step.pass)?);
            pass.set_bind_group(0, &*group, &[]);
            if step.pass != Pass::FineAttention {
                pass.set_bind_group(1, &select, &[k as u32 * ws.select_stride]);
            }
            pass.dispatch_workgroups(step.grid[0], step.grid[1], step.grid[2]);
        }
        Ok(())
    }

    /// Group 1 of the per-level passes: one [`LevelSelect`] of `buf`, at a dynamic offset.
    pub(super) fn select_group(&self, buf: &wgpu::Buffer) -> wgpu::BindGroup {
        self.ctx
            .device
            .create_bind_group(&wgpu::BindGroupDescriptor {
                label: Some("level_select"),
                layout: &self.ctx.kernels.layouts.level_select,
                entries: &[wgpu::BindGroupEntry {
                    binding: 0,
                    resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                        buffer: buf,
                        offset: 0,
                        size: std::num::NonZeroU64::new(16),
                    }),
                }],
            })
    }

    pub(super) async fn pipes(&self, plan: &FmaPlan) -> Result<Pipes> {
        let mut pipes = Pipes(HashMap::new());
        for step in plan.steps() {
            if let Entry::Vacant(slot) = pipes.0.entry(step.pass) {
                let k = &self.ctx.kernels;
                slot.insert(k.pipeline(&self.ctx.device, step.pass, step.spec).await?);
            }
        }
        Ok(pipes)
    }

    /// FMA of host tensors (async; works on the web). Q, K, V: (batch, heads, seq, head_dim)
    /// row-major f32. Returns O of the same shape and, if `want_lse`, the LSE (batch, heads, seq).
    ///
    /// Tensors larger than the adapter's storage-binding limit are processed in pieces with
    /// the same result, to the bit, as one run: a run of heads at a time, or, when one head
    /// alone is over the limit, chunks of its sequence (`crate::plan_split`). What must still
    /// fit one binding: the coarse rows of one head and the learned weights (else
    /// [`crate::FmaError::LimitExceeded`]). A NaN or infinity in the inputs reaches exactly the
    /// rows whose softmax includes it, directly or through a coarse key, as in dense attention.
    pub async fn forward_async(
        &self,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        shape: Shape,
        want_lse: bool,
    ) -> Result<Output> {
        // A head over one storage binding is cut along its sequence; tensors over a binding
        // whose heads fit are processed a run of heads at a time.
        forward_host(
            shape,
            q,
            k,
            v,
            want_lse,
            &self.limits,
            |s| self.plan(s).map(|_| ()),
            |q, k, v, s| self.forward_whole(q, k, v, s, want_lse),
            |io| self.forward_split(io, shape),
        )
        .await
    }

    /// One forward of host tensors whose every buffer fits the adapter's limits.
    async fn forward_whole(
        &self,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        shape: Shape,
        want_lse: bool,
    ) -> Result<Output> {
        let plan = self.plan(shape)?;
        let pipes = self.pipes(&plan).await?;
        let ws = self.workspace(&plan)?;
        let staged = Staged::new(&self.ctx.device, shape, want_lse);
        let scopes = Scopes::push(&self.ctx)?;
        {
            let mut ws = ws.lock().map_err(poisoned)?;
            let host = ws
                .host
                .take()
                .unwrap_or_else(|| HostBuffers::new(&self.ctx.device, shape));
            host.upload(&self.ctx.queue, q, k, v);
            let mut enc = self
                .ctx
                .device
                .create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("fma") });
            self.record(&mut enc, &plan, &ws, host.tensors(), &host.lse, &pipes)?;
            staged.record(&mut enc, &host.out, &host.lse);
            self.ctx.queue.submit([enc.finish()]);
            ws.host = Some(host);
        }
        scopes.pop(&self.ctx, "the FMA forward").await?;
        staged.read(&self.ctx).await
    }

    /// Blocking [`FmaAttention::forward_async`] (native only).
    #[cfg(not(target_arch = "wasm32"))]
    pub fn forward(
        &self,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        shape: Shape,
        want_lse: bool,
    ) -> Result<Output> {
        pollster::block_on(self.forward_async(q, k, v, shape, want_lse))
    }

    /// FMA of tensors already on the GPU; O (and the LSE, when `t.lse` is given) stay there.
    /// Records and submits one command buffer and returns without waiting for the GPU.
    ///
    /// Tensors larger than one storage binding are copied through bindings that fit, a head
    /// (or a chunk of one head's sequence) at a time, one submit per head: Q, K and V then
    /// need `COPY_SRC` usage and O and the LSE `COPY_DST` (a typed error says so otherwise).
    pub async fn forward_buffers_async(&self, t: GpuTensors<'_>, shape: Shape) -> Result<()> {
        t.check(shape)?;
        if shape.elements() as u64 * 4 > self.limits.binding_bytes() {
            return self
                .forward_split(SplitIo::Device(t), shape)
                .await
                .map(|_| ());
        }
        let plan = self.plan(shape)?;
        let pipes = self.pipes(&plan).await?;
        let ws = self.workspace(&plan)?;
        let scopes = Scopes::push(&self.ctx)?;
        {
            let ws = ws.lock().map_err(poisoned)?;
            let mut enc = self
                .ctx
                .device
                .create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("fma") });
            self.record_with_lse(&mut enc, &plan, &ws, t, &pipes)?;
            self.ctx.queue.submit([enc.finish()]);
        }
        scopes.pop(&self.ctx, "the FMA forward").await
    }

    /// Blocking [`FmaAttention::forward_buffers_async`] (native only).
    #[cfg(not(target_arch = "wasm32"))]
    pub fn forward_buffers(&self, t: GpuTensors<'_>, shape: Shape) -> Result<()> {
        pollster::block_on(self.forward_buffers_async(t, shape))
    }

    /// Records the whole forward of tensors already on the GPU into the caller's encoder,
    /// without submitting: for callers that embed FMA in their own command stream (and for
    /// GPU timestamps around it). The checks of [`FmaAttention::forward_buffers`] (buffer
    /// usages and sizes, shape, configuration, limits) run first and return typed errors;
    /// a validation error of the recorded commands themselves surfaces at the caller's
    /// `encoder.finish()` or `queue.submit`, not here. O (and the LSE, when `t.lse` is given)
    /// are written when the caller's submit runs. Tensors must fit one storage binding each
    /// ([`crate::FmaError::LimitExceeded`] otherwise): the split paths of `forward_buffers`
    /// submit head by head. Blocking on pipeline creation the first time
    /// a shape is seen (native only; on the web use [`FmaAttention::encode_async`]).
    #[cfg(not(target_arch = "wasm32"))]
    pub fn encode(
        &self,
        enc: &mut wgpu::CommandEncoder,
        t: GpuTensors<'_>,
        shape: Shape,
    ) -> Result<()> {
        pollster::block_on(self.encode_async(enc, t, shape))
    }

    /// [`FmaAttention::encode`], async (works on the web too).
    pub async fn encode_async(
        &self,
        enc: &mut wgpu::CommandEncoder,
        t: GpuTensors<'_>,
        shape: Shape,
    ) -> Result<()> {
        t.check(shape)?;
        let plan = self.plan(shape)?;
        let pipes = self.pipes(&plan).await?;
        let ws = self.workspace(&plan)?;
        let ws = ws.lock().map_err(poisoned)?;
        self.record_with_lse(enc, &plan, &ws, t, &pipes)
    }

    /// [`FmaAttention::record`] with a scratch LSE buffer when the caller wants none. The
    /// scratch may be dropped before the commands run: wgpu keeps a buffer alive while a
    /// recorded command uses it.
    fn record_with_lse(
        &self,
        enc: &mut wgpu::CommandEncoder,
        plan: &FmaPlan,
        ws: &Workspace,
        t: GpuTensors<'_>,
        pipes: &Pipes,
    ) -> Result<()> {
        let scratch_lse;
        let lse = match t.lse {
            Some(l) => l,
            None => {
                scratch_lse = storage(
                    &self.ctx.device,
                    "lse (unused)",
                    plan.shape.rows() as u64 * 4,
                    wgpu::BufferUsages::empty(),
                );
                &scratch_lse
            }
        };
        self.record(enc, plan, ws, t, lse, pipes)
    }
}

/// One [`LevelSelect`] per dispatch of `steps` (its level and folded grid), `stride` bytes
/// apart so each can be bound at a dynamic offset.
pub(super) fn level_selects(steps: &[Dispatch], stride: u32) -> Result<Vec<u8>> {
    let stride = stride as usize;
    let mut select = vec![0u8; stride * steps.len().max(1)];
    for (i, d) in steps.iter().enumerate() {
        let bytes = to_uniform_bytes(&LevelSelect {
            level: d.level.unwrap_or(0),
            workgroups_x: d.grid[0],
        })?;
        select[i * stride..i * stride + bytes.len()].copy_from_slice(&bytes);
    }
    Ok(select)
}

/// The pipelines of one plan, by pass (every per-level dispatch of a pass shares one).
pub(super) struct Pipes(HashMap<Pass, wgpu::ComputePipeline>);

impl Pipes {
    pub(super) fn get(&self, pass: Pass) -> Result<&wgpu::ComputePipeline> {
        self.0.get(&pass).ok_or_else(|| crate::FmaError::Gpu {
            stage: "recording the FMA forward".into(),
            message: format!("no pipeline was built for the {} pass", pass.name()),
        })
    }
}
