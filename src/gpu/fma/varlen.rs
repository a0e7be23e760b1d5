//! FMA of a variable-length batch (`crate::Sequences`, packed or padded): the forward's passes
//! with the sequence table bound, one submit, every sequence its own FMA.

use crate::error::Result;
use crate::gpu::engine::front::{check_host, run_host};
use crate::gpu::engine::record::Pipes;
use crate::gpu::engine::tensors::{GpuTensors, Output, Scopes};
use crate::plan::FmaPlan;
use crate::sequences::Sequences;
use crate::shape::Shape;

use super::FmaAttention;

impl FmaAttention {
    /// The plan of a variable-length batch of `shape` (the tensors' shape, as
    /// [`Sequences::shape`] gives it) with the sequences `seqs`.
    pub fn plan_sequences(&self, shape: Shape, seqs: &Sequences) -> Result<FmaPlan> {
        shape.validate()?;
        seqs.check(shape)?;
        FmaPlan::for_sequences(
            seqs,
            shape.heads,
            shape.kv_heads,
            shape.head_dim,
            &self.cfg,
            &self.limits,
        )
    }

    /// FMA of a variable-length batch of host tensors (async; works on the web). Packed
    /// ([`Sequences::packed`]): Q of shape `(1, heads, total, head_dim)`, K, V `(1, kv_heads,
    /// total, head_dim)`, the sequences one after another; padded ([`Sequences::padded`]):
    /// `(batch, heads, n, head_dim)` with one length per row. Every sequence is its own FMA (its
    /// own levels, windows and partial last window), no token attends across sequences, and
    /// the work is its tokens' (no padding to the longest). Returns O of Q's shape and, if
    /// `want_lse`, the LSE `(batch, heads, n)`; padding rows hold O = 0 and LSE = -inf.
    ///
    /// Each tensor must fit one storage binding ([`crate::FmaError::LimitExceeded`] says to
    /// split the batch otherwise). The backward of a variable-length batch is not implemented.
    pub async fn forward_varlen_async(
        &self,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        shape: Shape,
        seqs: &Sequences,
        want_lse: bool,
    ) -> Result<Output> {
        check_host(shape, q, k, v)?;
        let plan = self.plan_sequences(shape, seqs)?;
        let pipes = Pipes::new(&self.ctx, &plan.steps()).await?;
        run_host(
            &self.ctx,
            &self.host,
            self.limits.binding_bytes(),
            shape,
            (q, k, v),
            want_lse,
            "the FMA forward of a variable-length batch",
            |enc, t, lse| self.record(enc, &plan, &pipes, t, lse),
        )
        .await
    }

    /// Blocking [`FmaAttention::forward_varlen_async`] (native only).
    #[cfg(not(target_arch = "wasm32"))]
    pub fn forward_varlen(
        &self,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        shape: Shape,
        seqs: &Sequences,
        want_lse: bool,
    ) -> Result<Output> {
        pollster::block_on(self.forward_varlen_async(q, k, v, shape, seqs, want_lse))
    }

    /// [`FmaAttention::forward_varlen_async`] of tensors already on the GPU: O (and the LSE,
    /// when `t.lse` is given) stay there. Records and submits one command buffer.
    pub async fn forward_varlen_buffers_async(
        &self,
        t: GpuTensors<'_>,
        shape: Shape,
        seqs: &Sequences,
    ) -> Result<()> {
        t.check(shape)?;
        let plan = self.plan_sequences(shape, seqs)?;
        let pipes = Pipes::new(&self.ctx, &plan.steps()).await?;
        let scopes = Scopes::push(&self.ctx)?;
        let mut enc = self
            .ctx
            .device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                label: Some("fma varlen"),
            });
        let lse = t.lse_or_scratch(&self.ctx.device, shape);
        self.record(&mut enc, &plan, &pipes, t, &lse)?;
        self.ctx.queue.submit([enc.finish()]);
        scopes
            .pop(&self.ctx, "the FMA forward of a variable-length batch")
            .await
    }

    /// Blocking [`FmaAttention::forward_varlen_buffers_async`] (native only).
    #[cfg(not(target_arch = "wasm32"))]
    pub fn forward_varlen_buffers(
        &self,
        t: GpuTensors<'_>,
        shape: Shape,
        seqs: &Sequences,
    ) -> Result<()> {
        pollster::block_on(self.forward_varlen_buffers_async(t, shape, seqs))
    }
}
