//! The executor of exact dense attention (the baseline every speed figure is compared with).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::error::Result;
use crate::gpu::io::{forward_host, GpuTensors, HostBuffers, Scopes, Staged};
use crate::gpu::params::{to_uniform_bytes, Params};
use crate::gpu::pipelines::poisoned;
use crate::gpu::readback::{storage, uniform};
use crate::gpu::shaders::Pass;
use crate::gpu::split::SplitIo;
use crate::gpu::{GpuContext, Output};
use crate::plan::{DensePlan, KernelLimits};
use crate::shape::Shape;

struct Workspace {
    params: wgpu::Buffer,
    host: Option<HostBuffers>,
}

/// Exact dense softmax attention `softmax(Q K^T / sqrt(d)) V` on the GPU, tiled with an
/// online softmax (no n x n matrix in memory). Causal:
///
/// ```text
///        keys ->
/// q  0 | x . . . |
///    1 | x x . . |      x = attended, . = masked
///    2 | x x x . |
///    3 | x x x x |
/// ```
pub struct DenseAttention {
    pub(super) ctx: GpuContext,
    pub(super) causal: bool,
    pub(super) limits: KernelLimits,
    workspaces: Mutex<HashMap<Shape, Arc<Mutex<Workspace>>>>,
}

impl DenseAttention {
    /// Prepares dense attention on `ctx`.
    pub fn new(ctx: &GpuContext, causal: bool) -> Result<Self> {
        ctx.check_alive()?;
        Ok(Self {
            ctx: ctx.clone(),
            causal,
            limits: KernelLimits::from_wgpu(&ctx.limits),
            workspaces: Mutex::new(HashMap::new()),
        })
    }

    /// Uses at most `bytes` per storage binding, below the device's own limit, as
    /// [`crate::gpu::FmaAttention::max_binding`]. Call before the first forward.
    pub fn max_binding(mut self, bytes: u64) -> Self {
        self.limits = self.limits.capped(bytes);
        self.workspaces = Mutex::new(HashMap::new());
        self
    }

    /// The plan a call with `shape` would execute.
    pub fn plan(&self, shape: Shape) -> Result<DensePlan> {
        DensePlan::new(shape, &self.limits)
    }

    /// The parameter block of `plan` (every query row against every key).
    pub(super) fn params(&self, plan: &DensePlan) -> Params {
        let s = plan.shape;
        Params {
            n: s.seq as u32,
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
            key_hi: s.seq as u32,
            ..Default::default()
        }
    }

    fn workspace(&self, plan: &DensePlan) -> Result<Arc<Mutex<Workspace>>> {
        let mut map = self.workspaces.lock().map_err(poisoned)?;
        if let Some(ws) = map.get(&plan.shape) {
            return Ok(ws.clone());
        }
        if map.len() >= 8 {
            map.clear();
        }
        let bytes = to_uniform_bytes(&self.params(plan))?;
        let params = uniform(&self.ctx.device, &self.ctx.queue, "dense params", &bytes);
        let ws = Arc::new(Mutex::new(Workspace { params, host: None }));
        map.insert(plan.shape, ws.clone());
        Ok(ws)
    }

    /// Group 0 of the dense pass (binding numbers as in `dense_attention.wgsl`).
    pub(super) fn bind_group(
        &self,
        params: &wgpu::Buffer,
        t: &GpuTensors<'_>,
        lse: &wgpu::Buffer,
    ) -> wgpu::BindGroup {
        let entries: Vec<_> = [
            (0, params),
            (1, t.q),
            (2, t.k),
            (3, t.v),
            (6, t.out),
            (7, lse),
        ]
        .into_iter()
        .map(|(binding, b)| wgpu::BindGroupEntry {
            binding,
            resource: b.as_entire_binding(),
        })
        .collect();
        self.ctx
            .device
            .create_bind_group(&wgpu::BindGroupDescriptor {
                label: Some("dense_attention"),
                layout: &self.ctx.kernels.layouts.dense,
                entries: &entries,
            })
    }

    fn record(
        &self,
        enc: &mut wgpu::CommandEncoder,
        plan: &DensePlan,
        params: &wgpu::Buffer,
        t: GpuTensors<'_>,
        lse: &wgpu::Buffer,
        pipeline: &wgpu::ComputePipeline,
    ) {
        let group = self.bind_group(params, &t, lse);
        let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
            label: Some("dense forward"),
            timestamp_writes: None,
        });
        pass.set_pipeline(pipeline);
        pass.set_bind_group(0, &group, &[]);
        let g = plan.attention.grid;
        pass.dispatch_workgroups(g[0], g[1], g[2]);
    }

    /// Dense attention of host tensors (async). Shapes as [`crate::gpu::FmaAttention::forward_async`].
    ///
    /// Tensors over one storage binding are processed in pieces with the unsplit result to the
    /// bit: runs of heads, or for a head over the limit, pairs of query and key chunks
    /// (`crate::plan_split_dense`).
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
        let pipeline = self
            .ctx
            .kernels
            .pipeline(&self.ctx.device, Pass::DenseAttention, plan.attention.spec)
            .await?;
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
                .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                    label: Some("dense"),
                });
            self.record(
                &mut enc,
                &plan,
                &ws.params,
                host.tensors(),
                &host.lse,
                &pipeline,
            );
            staged.record(&mut enc, &host.out, &host.lse);
            self.ctx.queue.submit([enc.finish()]);
            ws.host = Some(host);
        }
        scopes.pop(&self.ctx, "the dense forward").await?;
        staged.read(&self.ctx).await
    }

    /// Blocking [`DenseAttention::forward_async`] (native only).
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

    /// Dense attention of tensors already on the GPU; results stay there. Tensors over one
    /// storage binding are copied through bindings that fit, a head (or chunk) at a time: Q, K
    /// and V then need `COPY_SRC` usage and O and the LSE `COPY_DST`.
    pub async fn forward_buffers_async(&self, t: GpuTensors<'_>, shape: Shape) -> Result<()> {
        t.check(shape)?;
        if shape.elements() as u64 * 4 > self.limits.binding_bytes() {
            return self
                .forward_split(SplitIo::Device(t), shape)
                .await
                .map(|_| ());
        }
        let (plan, pipeline) = self.plan_and_pipeline(shape).await?;
        let ws = self.workspace(&plan)?;
        let scopes = Scopes::push(&self.ctx)?;
        {
            let ws = ws.lock().map_err(poisoned)?;
            let mut enc = self
                .ctx
                .device
                .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                    label: Some("dense"),
                });
            self.record_with_lse(&mut enc, &plan, &ws.params, t, &pipeline);
            self.ctx.queue.submit([enc.finish()]);
        }
        scopes.pop(&self.ctx, "the dense forward").await
    }

    /// Blocking [`DenseAttention::forward_buffers_async`] (native only).
    #[cfg(not(target_arch = "wasm32"))]
    pub fn forward_buffers(&self, t: GpuTensors<'_>, shape: Shape) -> Result<()> {
        pollster::block_on(self.forward_buffers_async(t, shape))
    }

    /// Records dense attention of tensors already on the GPU into the caller's encoder without
    /// submitting (see [`crate::gpu::FmaAttention::encode`]: same checks first, validation
    /// errors of the recorded commands surface at the caller's submit). Native only (blocks on
    /// pipeline creation the first time); on the web use [`DenseAttention::encode_async`].
    #[cfg(not(target_arch = "wasm32"))]
    pub fn encode(
        &self,
        enc: &mut wgpu::CommandEncoder,
        t: GpuTensors<'_>,
        shape: Shape,
    ) -> Result<()> {
        pollster::block_on(self.encode_async(enc, t, shape))
    }

    /// [`DenseAttention::encode`], async (works on the web too).
    pub async fn encode_async(
        &self,
        enc: &mut wgpu::CommandEncoder,
        t: GpuTensors<'_>,
        shape: Shape,
    ) -> Result<()> {
        t.check(shape)?;
        let (plan, pipeline) = self.plan_and_pipeline(shape).await?;
        let ws = self.workspace(&plan)?;
        let ws = ws.lock().map_err(poisoned)?;
        self.record_with_lse(enc, &plan, &ws.params, t, &pipeline);
        Ok(())
    }

    /// The plan of `shape` and its (cached) pipeline.
    async fn plan_and_pipeline(&self, shape: Shape) -> Result<(DensePlan, wgpu::ComputePipeline)> {
        let plan = self.plan(shape)?;
        let pipeline = self
            .ctx
            .kernels
            .pipeline(&self.ctx.device, Pass::DenseAttention, plan.attention.spec)
            .await?;
        Ok((plan, pipeline))
    }

    /// [`DenseAttention::record`] with a scratch LSE buffer when the caller wants none (wgpu
    /// keeps it alive while a recorded command uses it).
    fn record_with_lse(
        &self,
        enc: &mut wgpu::CommandEncoder,
        plan: &DensePlan,
        params: &wgpu::Buffer,
        t: GpuTensors<'_>,
        pipeline: &wgpu::ComputePipeline,
    ) {
        let scratch;
        let lse = match t.lse {
            Some(l) => l,
            None => {
                scratch = storage(
                    &self.ctx.device,
                    "lse (unused)",
                    plan.shape.rows() as u64 * 4,
                    wgpu::BufferUsages::empty(),
                );
                &scratch
            }
        };
        self.record(enc, plan, params, t, lse, pipeline);
    }
}
