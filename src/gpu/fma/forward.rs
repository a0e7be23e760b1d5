//! The FMA forward: host tensors (uploaded into buffers that grow by capacity), the caller's
//! buffers, or recording into the caller's encoder. Every path records the plan's steps
//! (`FmaPlan::steps`, level by level) through the engine's one record loop, into one encoder.

use crate::cross;
use crate::error::{FmaError, Result};
use crate::gpu::engine::buffers::sequence_table;
use crate::gpu::engine::front::{forward_host, run_host};
use crate::gpu::engine::passes::Role;
use crate::gpu::engine::pipelines::poisoned;
use crate::gpu::engine::record::{record_steps, Pipes};
use crate::gpu::engine::split_io::SplitIo;
use crate::gpu::engine::tensors::Output;
use crate::gpu::engine::tensors::{GpuTensors, Scopes};
use crate::plan::{fma_head_splits, FmaPlan, SplitPlan};
use crate::shape::Shape;
use crate::variants::HeadSpan;

use super::workspace::Uniforms;
use super::FmaAttention;

impl FmaAttention {
    /// FMA of host tensors (async; works on the web). Q, K, V: (batch, heads, seq, head_dim)
    /// row-major f32. Returns O of the same shape and, if `want_lse`, the LSE (batch, heads, seq).
    ///
    /// Tensors larger than the adapter's storage-binding limit are processed in pieces with
    /// the same result, to the bit, as one run: a run of heads at a time, or, when one head
    /// alone is over the limit (its tokens, or the coarse rows of all its levels), chunks of its
    /// sequence ([`crate::plan::SplitPlan`], its coarse rows through compact bindings when they
    /// exceed one: [`crate::plan::CoarseSplit`]). What must still fit one binding: the coarse
    /// rows one fine block reads and the learned weights (else
    /// [`crate::FmaError::LimitExceeded`]). A NaN or infinity in the inputs reaches exactly the
    /// rows whose softmax includes it, directly or through a coarse key, as in dense attention.
    ///
    /// K and V may be longer than Q (`shape.seq_kv > shape.seq`) with a causal, fine-query 1D
    /// configuration: the queries are then the last seq of the seq_kv positions (chunked
    /// prefill; [`crate::cross`]); other cross-length shapes are a typed error.
    pub async fn forward_async(
        &self,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        shape: Shape,
        want_lse: bool,
    ) -> Result<Output> {
        if !cross::check_fma_cross(shape, &self.cfg)? {
            return self.forward_self(q, k, v, shape, want_lse).await;
        }
        shape.validate()?;
        shape.check_len("Q", q.len())?;
        let full = cross::full_shape(shape);
        let out = self
            .forward_self(&cross::pad_rows(q, shape), k, v, full, want_lse)
            .await?;
        Ok(Output {
            o: cross::last_rows(&out.o, shape, shape.head_dim),
            lse: out.lse.map(|lse| cross::last_rows(&lse, shape, 1)),
        })
    }

    /// [`FmaAttention::forward_async`] of a self-attention shape.
    async fn forward_self(
        &self,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        shape: Shape,
        want_lse: bool,
    ) -> Result<Output> {
        forward_host(
            shape,
            q,
            k,
            v,
            want_lse,
            fma_head_splits(shape, &self.cfg, &self.limits),
            // A run's variants are checked against the caller's heads (the sinks' length).
            |s| self.plan_in(s, HeadSpan::whole(shape)).map(|_| ()),
            |q, k, v, s, span| self.forward_whole(q, k, v, (s, span), want_lse),
            |io| self.forward_split(io, shape),
        )
        .await
    }

    /// Checks, before any data exists, that [`FmaAttention::forward`] of `shape` fits this
    /// adapter: the shape, the configuration for it, and every limit its plan checks (of the
    /// whole tensors, a run of heads, or a head split across bindings, whichever the forward
    /// would take). Lets a caller fail before reading gigabytes of input.
    pub fn check(&self, shape: Shape) -> Result<()> {
        shape.validate()?;
        if cross::check_fma_cross(shape, &self.cfg)? {
            return self.check(cross::full_shape(shape));
        }
        if fma_head_splits(shape, &self.cfg, &self.limits) {
            return SplitPlan::with_kernel(
                shape.seq,
                shape.head_dim,
                &self.cfg,
                &self.limits,
                self.fine_kernel(),
            )
            .map(drop);
        }
        match self.plan(shape) {
            // A run of fewer heads at a time may fit (`forward_host`): one head must.
            Err(FmaError::LimitExceeded { .. }) if shape.batch_heads() > 1 => self
                .plan_in(shape.with_heads(1), HeadSpan::whole(shape))
                .map(drop),
            other => other.map(drop),
        }
    }

    /// Whether a forward of `shape` splits a head along its sequence ([`SplitPlan`]: one head's
    /// tokens or coarse rows over one binding).
    pub(crate) fn splits_head(&self, shape: Shape) -> bool {
        let full = match cross::check_fma_cross(shape, &self.cfg) {
            Ok(true) => cross::full_shape(shape),
            _ => shape,
        };
        let over = full.elements() as u64 * 4 > self.limits.binding_bytes();
        fma_head_splits(full, &self.cfg, &self.limits) || (over && full.batch_heads() == 1)
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
        let pipes = Pipes::new(&self.ctx, &plan.steps()).await?;
        run_host(
            &self.ctx,
            &self.host,
            (self.limits.binding_bytes(), self.storage),
            shape,
            (q, k, v),
            want_lse,
            "the FMA forward",
            |enc, t, lse| self.record(enc, &plan, &pipes, t, lse),
        )
        .await
    }

    /// FMA of tensors already on the GPU; O (and the LSE, when `t.lse` is given) stay there.
    /// Records and submits one command buffer and returns without waiting for the GPU.
    ///
    /// Tensors larger than one storage binding are copied through bindings that fit, a head
    /// (or a chunk of one head's sequence) at a time, one submit per head: Q, K and V then
    /// need `COPY_SRC` usage and O and the LSE `COPY_DST` (a typed error says so otherwise).
    pub async fn forward_buffers_async(&self, t: GpuTensors<'_>, shape: Shape) -> Result<()> {
        self.forward_buffers_in(t, shape, HeadSpan::whole(shape))
            .await
    }

    /// [`FmaAttention::forward_buffers_async`] of `shape` as the heads `span` of the caller's
    /// problem (a training run of heads, `backward_runs.rs`).
    pub(super) async fn forward_buffers_in(
        &self,
        t: GpuTensors<'_>,
        shape: Shape,
        span: HeadSpan,
    ) -> Result<()> {
        t.check_as(shape, self.storage)?;
        let over = shape.elements() as u64 * 4 > self.limits.binding_bytes();
        let splits = over || fma_head_splits(shape, &self.cfg, &self.limits);
        if splits {
            return self
                .forward_split(SplitIo::Device(t), shape)
                .await
                .map(|_| ());
        }
        let plan = self.plan_in(shape, span)?;
        let pipes = Pipes::new(&self.ctx, &plan.steps()).await?;
        let scopes = Scopes::push(&self.ctx)?;
        let mut enc = self
            .ctx
            .device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("fma") });
        self.record_with_lse(&mut enc, &plan, &pipes, t)?;
        self.ctx.queue.submit([enc.finish()]);
        scopes.pop(&self.ctx, "the FMA forward").await
    }

    /// [`FmaAttention::encode`], async (works on the web too).
    pub async fn encode_async(
        &self,
        enc: &mut wgpu::CommandEncoder,
        t: GpuTensors<'_>,
        shape: Shape,
    ) -> Result<()> {
        t.check_as(shape, self.storage)?;
        let plan = self.plan(shape)?;
        let pipes = Pipes::new(&self.ctx, &plan.steps()).await?;
        self.record_with_lse(enc, &plan, &pipes, t)
    }

    /// [`FmaAttention::record`] with the caller's LSE buffer, or a scratch one.
    fn record_with_lse(
        &self,
        enc: &mut wgpu::CommandEncoder,
        plan: &FmaPlan,
        pipes: &Pipes,
        t: GpuTensors<'_>,
    ) -> Result<()> {
        let lse = t.lse_or_scratch(&self.ctx.device, plan.shape);
        self.record(enc, plan, pipes, t, &lse)
    }

    /// Records every step of `plan` into `enc`, in the order of `plan.steps()`.
    pub(super) fn record(
        &self,
        enc: &mut wgpu::CommandEncoder,
        plan: &FmaPlan,
        pipes: &Pipes,
        t: GpuTensors<'_>,
        lse: &wgpu::Buffer,
    ) -> Result<()> {
        // A variable-length batch's uniforms depend on its lengths, not only on its shape:
        // made per call with its sequence table, not cached by shape.
        let uniforms = match &plan.sequences {
            Some(_) => {
                std::sync::Arc::new(Uniforms::new(&self.ctx, &self.params(plan), &plan.steps())?)
            }
            None => self.uniforms(plan)?,
        };
        let table = plan
            .sequences
            .as_ref()
            .map(|t| sequence_table(&self.ctx.device, t));
        let mut buffers = self.buffers.lock().map_err(poisoned)?;
        let mut res = buffers
            .coarse(
                &self.ctx,
                plan,
                &self.limits,
                &uniforms.params,
                &self.weights,
            )
            .tensors(&t, lse);
        if let Some(table) = &table {
            res = res.with(Role::SeqTable, table);
        }
        let mut cpass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
            label: Some("fma forward"),
            timestamp_writes: None,
        });
        record_steps(
            &self.ctx,
            &mut cpass,
            &plan.steps(),
            pipes,
            Some(&uniforms.selects),
            &res,
        )
    }
}
