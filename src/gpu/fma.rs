//! The executor of fine-query FMA: turns an [`FmaPlan`] into bind groups and dispatches, the
//! downsample pass of every level then the fused attention pass, in one command encoder.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::config::{Downsample, FmaConfig};
use crate::error::Result;
use crate::gpu::io::{GpuTensors, HostBuffers, Scopes, Staged};
use crate::gpu::params::{to_uniform_bytes, LevelInfo, LevelSelect, Params, MAX_LEVELS};
use crate::gpu::pipelines::poisoned;
use crate::gpu::readback::storage;
use crate::gpu::shaders::Pass;
use crate::gpu::{GpuContext, Output};
use crate::levels::window;
use crate::plan::{FmaPlan, KernelLimits};
use crate::shape::Shape;

/// Learned weights on the GPU: every level's (d, p, w_l) weights concatenated (`wk`, `wv`)
/// and every level's (d, p) biases concatenated (`bk`, `bv`). 16-byte dummies in Average mode.
pub(super) struct WeightBuffers {
    pub(super) wk: wgpu::Buffer,
    pub(super) wv: wgpu::Buffer,
    pub(super) bk: wgpu::Buffer,
    pub(super) bv: wgpu::Buffer,
}

impl WeightBuffers {
    fn new(ctx: &GpuContext, cfg: &FmaConfig, limits: &KernelLimits) -> Result<Self> {
        let concat = |f: &dyn Fn(&crate::weights::LevelWeights) -> &Vec<f32>| -> Vec<f32> {
            match &cfg.downsample {
                Downsample::Learned(w) => {
                    w.levels.iter().flat_map(|l| f(l).iter().copied()).collect()
                }
                Downsample::Average => Vec::new(),
            }
        };
        let upload = |label: &str, data: Vec<f32>| -> Result<wgpu::Buffer> {
            let bytes = data.len() as u64 * 4;
            if bytes > limits.max_binding.min(limits.max_buffer) {
                return Err(crate::FmaError::LimitExceeded {
                    what: format!("learned weights {label} in one storage binding"),
                    requested: bytes,
                    max: limits.max_binding.min(limits.max_buffer),
                });
            }
            let buf = storage(&ctx.device, label, bytes, wgpu::BufferUsages::COPY_DST);
            ctx.queue.write_buffer(&buf, 0, bytemuck::cast_slice(&data));
            Ok(buf)
        };
        Ok(Self {
            wk: upload("wk", concat(&|l| &l.wk))?,
            wv: upload("wv", concat(&|l| &l.wv))?,
            bk: upload("bk", concat(&|l| &l.bk))?,
            bv: upload("bv", concat(&|l| &l.bv))?,
        })
    }
}

/// Per-shape device state: parameters, the level selectors, the coarse K~ and V~ buffers.
struct Workspace {
    params: wgpu::Buffer,
    level_select: wgpu::Buffer,
    select_stride: u32,
    coarse_k: wgpu::Buffer,
    coarse_v: wgpu::Buffer,
    /// Buffers for host tensors, made on the first host call of this shape.
    host: Option<HostBuffers>,
}

/// Fine-query Fast Multipole Attention on the GPU (algorithm.md §3-6).
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
}

/// Shapes whose buffers are kept; beyond this the cache is cleared (a long-running caller
/// cycling through many shapes should not grow memory without bound).
const MAX_CACHED_SHAPES: usize = 8;

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
        })
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
            levels,
            ..Default::default()
        }
    }

    /// The cached workspace of `plan`'s shape, made (and its parameters written) on first use.
    fn workspace(&self, plan: &FmaPlan) -> Result<Arc<Mutex<Workspace>>> {
        let mut map = self.workspaces.lock().map_err(poisoned)?;
        if let Some(ws) = map.get(&plan.shape) {
            return Ok(ws.clone());
        }
        if map.len() >= MAX_CACHED_SHAPES {
            map.clear();
        }
        let device = &self.ctx.device;
        let params = to_uniform_bytes(&self.params(plan))?;
        let params_buf = device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("params"),
            size: params.len() as u64,
            usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        self.ctx.queue.write_buffer(&params_buf, 0, &params);
        // One LevelSelect per level at an offset aligned for dynamic uniform offsets.
        let stride = self.ctx.limits.min_uniform_buffer_offset_alignment.max(16);
        let mut select = vec![0u8; stride as usize * plan.downsample.len().max(1)];
        for (i, d) in plan.downsample.iter().enumerate() {
            let bytes = to_uniform_bytes(&LevelSelect {
                level: i as u32,
                workgroups_x: d.grid[0],
            })?;
            select[i * stride as usize..i * stride as usize + bytes.len()].copy_from_slice(&bytes);
        }
        let level_select = device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("level_select"),
            size: select.len() as u64,
            usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        self.ctx.queue.write_buffer(&level_select, 0, &select);
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
            host: None,
        }));
        map.insert(plan.shape, ws.clone());
        Ok(ws)
    }

    /// Records every dispatch of `plan` into `enc`.
    fn record(
        &self,
        enc: &mut wgpu::CommandEncoder,
        plan: &FmaPlan,
        ws: &Workspace,
        t: GpuTensors<'_>,
        lse: &wgpu::Buffer,
        pipes: &Pipes,
    ) {
        let device = &self.ctx.device;
        let layouts = &self.ctx.kernels.layouts;
        let bind = |layout: &wgpu::BindGroupLayout, label: &str, bufs: &[(u32, &wgpu::Buffer)]| {
            let entries: Vec<_> = bufs
                .iter()
                .map(|&(binding, b)| wgpu::BindGroupEntry {
                    binding,
                    resource: b.as_entire_binding(),
                })
                .collect();
            device.create_bind_group(&wgpu::BindGroupDescriptor {
                label: Some(label),
                layout,
                entries: &entries,
            })
        };
        let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
            label: Some("fma forward"),
            timestamp_writes: None,
        });
        if !plan.downsample.is_empty() {
            let w = &self.weights;
            let group = bind(
                &layouts.downsample,
                "downsample",
                &[
                    (0, &ws.params),
                    (1, t.k),
                    (2, t.v),
                    (3, &w.wk),
                    (4, &w.wv),
                    (5, &w.bk),
                    (6, &w.bv),
                    (7, &ws.coarse_k),
                    (8, &ws.coarse_v),
                ],
            );
            let select = device.create_bind_group(&wgpu::BindGroupDescriptor {
                label: Some("level_select"),
                layout: &layouts.level_select,
                entries: &[wgpu::BindGroupEntry {
                    binding: 0,
                    resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                        buffer: &ws.level_select,
                        offset: 0,
                        size: std::num::NonZeroU64::new(16),
                    }),
                }],
            });
            pass.set_pipeline(&pipes.downsample);
            pass.set_bind_group(0, &group, &[]);
            for (i, d) in plan.downsample.iter().enumerate() {
                pass.set_bind_group(1, &select, &[i as u32 * ws.select_stride]);
                pass.dispatch_workgroups(d.grid[0], d.grid[1], d.grid[2]);
            }
        }
        let group = bind(
            &layouts.fine,
            "fine_attention",
            &[
                (0, &ws.params),
                (1, t.q),
                (2, t.k),
                (3, t.v),
                (4, &ws.coarse_k),
                (5, &ws.coarse_v),
                (6, t.out),
                (7, lse),
            ],
        );
        pass.set_pipeline(&pipes.attention);
        pass.set_bind_group(0, &group, &[]);
        let g = plan.attention.grid;
        pass.dispatch_workgroups(g[0], g[1], g[2]);
    }

    async fn pipes(&self, plan: &FmaPlan) -> Result<Pipes> {
        let k = &self.ctx.kernels;
        let device = &self.ctx.device;
        let attention = k
            .pipeline(device, Pass::FineAttention, plan.attention.spec)
            .await?;
        let ds_spec = plan.downsample.first().map(|d| d.spec);
        let downsample = match ds_spec {
            Some(spec) => k.pipeline(device, Pass::Downsample, spec).await?,
            None => attention.clone(), // unused: no coarse level to downsample
        };
        Ok(Pipes {
            attention,
            downsample,
        })
    }

    /// FMA of host tensors (async; works on the web). Q, K, V: (batch, heads, seq, head_dim)
    /// row-major f32. Returns O of the same shape and, if `want_lse`, the LSE (batch, heads, seq).
    pub async fn forward_async(
        &self,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        shape: Shape,
        want_lse: bool,
    ) -> Result<Output> {
        shape.validate()?;
        shape.check_len("Q", q.len())?;
        shape.check_len("K", k.len())?;
        shape.check_len("V", v.len())?;
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
            self.record(&mut enc, &plan, &ws, host.tensors(), &host.lse, &pipes);
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
    pub async fn forward_buffers_async(&self, t: GpuTensors<'_>, shape: Shape) -> Result<()> {
        t.check(shape)?;
        let plan = self.plan(shape)?;
        let pipes = self.pipes(&plan).await?;
        let ws = self.workspace(&plan)?;
        let scopes = Scopes::push(&self.ctx)?;
        {
            let ws = ws.lock().map_err(poisoned)?;
            let scratch_lse;
            let lse = match t.lse {
                Some(l) => l,
                None => {
                    scratch_lse = storage(
                        &self.ctx.device,
                        "lse (unused)",
                        shape.rows() as u64 * 4,
                        wgpu::BufferUsages::empty(),
                    );
                    &scratch_lse
                }
            };
            let mut enc = self
                .ctx
                .device
                .create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("fma") });
            self.record(&mut enc, &plan, &ws, t, lse, &pipes);
            self.ctx.queue.submit([enc.finish()]);
        }
        scopes.pop(&self.ctx, "the FMA forward").await
    }

    /// Blocking [`FmaAttention::forward_buffers_async`] (native only).
    #[cfg(not(target_arch = "wasm32"))]
    pub fn forward_buffers(&self, t: GpuTensors<'_>, shape: Shape) -> Result<()> {
        pollster::block_on(self.forward_buffers_async(t, shape))
    }
}

struct Pipes {
    attention: wgpu::ComputePipeline,
    downsample: wgpu::ComputePipeline,
}
