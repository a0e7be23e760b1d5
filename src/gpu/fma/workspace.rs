//! The FMA executor's device state besides the caller's tensors: per shape, the uniforms (the
//! parameter block and the level selectors of the plan's steps); per executor, the buffers that
//! grow by capacity (coarse K~, V~ of every level; with coarse queries (algorithm.md §6) the
//! pooled queries Q~ and their partial results o~, lse~; the host tensors' buffers), so a new
//! shape reuses what a larger one allocated.

use crate::error::Result;
use crate::gpu::engine::buffers::uniform;
use crate::gpu::engine::cache::Growing;
use crate::gpu::engine::context::GpuContext;
use crate::gpu::engine::params::{to_uniform_bytes, Params};
use crate::gpu::engine::passes::Role;
use crate::gpu::engine::record::{Resources, Selects};
use crate::plan::{Dispatch, FmaPlan, KernelLimits};

use crate::gpu::engine::weights::WeightBuffers;

/// The uniforms of one shape: its parameter block and one level selector per step.
pub(crate) struct Uniforms {
    pub params: wgpu::Buffer,
    pub selects: Selects,
}

impl Uniforms {
    pub fn new(ctx: &GpuContext, params: &Params, steps: &[Dispatch]) -> Result<Self> {
        Ok(Self {
            params: uniform(
                &ctx.device,
                &ctx.queue,
                "params",
                &to_uniform_bytes(params)?,
            ),
            selects: Selects::new(ctx, steps)?,
        })
    }
}

/// Buffers of a forward that grow by capacity: coarse K~, V~ (bh, coarse_rows, d) and, with
/// coarse queries, Q~, o~ (the same) and lse~ (bh, coarse_rows); with fine queries the last
/// three are 16-byte placeholders (the downsample pass binds Q~ but pools only K and V).
pub(crate) struct Buffers {
    coarse_k: Growing,
    coarse_v: Growing,
    coarse_q: Growing,
    coarse_o: Growing,
    coarse_lse: Growing,
}

impl Default for Buffers {
    fn default() -> Self {
        let none = wgpu::BufferUsages::empty();
        Self {
            coarse_k: Growing::new("coarse_k", none),
            coarse_v: Growing::new("coarse_v", none),
            coarse_q: Growing::new("coarse_q", none),
            coarse_o: Growing::new("coarse partial o", none),
            coarse_lse: Growing::new("coarse partial lse", none),
        }
    }
}

impl Buffers {
    /// The coarse buffers sized for `plan`, with the uniform block `params` and the learned
    /// weights, as the roles every FMA forward pass binds besides Q, K, V, O and the LSE.
    pub fn coarse<'a>(
        &'a mut self,
        ctx: &GpuContext,
        plan: &FmaPlan,
        limits: &KernelLimits,
        params: &'a wgpu::Buffer,
        weights: &'a WeightBuffers,
    ) -> Resources<'a> {
        let (device, cap) = (&ctx.device, limits.binding_bytes());
        let ws = &plan.workspace;
        let (rows, lse) = if plan.merge.is_some() {
            (ws.coarse_q_buffer_bytes(), ws.coarse_lse_bytes)
        } else {
            (0, 0)
        };
        Resources::default()
            .with(Role::Params, params)
            .with(Role::Weights, &weights.w)
            .with(Role::Biases, &weights.b)
            .with(
                Role::CoarseK,
                self.coarse_k
                    .at_least(device, ws.coarse_kv_buffer_bytes(), cap),
            )
            .with(
                Role::CoarseV,
                self.coarse_v
                    .at_least(device, ws.coarse_kv_buffer_bytes(), cap),
            )
            .with(Role::CoarseQ, self.coarse_q.at_least(device, rows, cap))
            .with(
                Role::CoarseOut,
                self.coarse_o
                    .at_least(device, ws.coarse_bytes.min(rows), cap),
            )
            .with(Role::CoarseLse, self.coarse_lse.at_least(device, lse, cap))
    }
}
