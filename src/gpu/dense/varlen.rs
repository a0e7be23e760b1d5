//! Exact attention of a variable-length batch (`crate::Sequences`): every sequence attends to
//! itself, in query tiles of its own, one dispatch over all of them.

use crate::error::{FmaError, Result};
use crate::gpu::engine::buffers::{sequence_table, uniform};
use crate::gpu::engine::front::{check_host, run_host};
use crate::gpu::engine::params::to_uniform_bytes;
use crate::gpu::engine::record::Pipes;
use crate::gpu::engine::tensors::{GpuTensors, Output, Scopes};
use crate::gpu::engine::varlen_io::varlen_in_groups;
use crate::plan::{DensePlan, KernelLimits, SoftmaxFlags};
use crate::sequences::Sequences;
use crate::shape::Shape;

use super::DenseAttention;

impl DenseAttention {
    /// The plan of the variable-length batch `seqs`, specialised for this instance's
    /// softmax variants (checked against the heads).
    fn varlen_plan(
        &self,
        seqs: &Sequences,
        heads: usize,
        kv_heads: usize,
        d: usize,
        limits: &KernelLimits,
    ) -> Result<DensePlan> {
        self.variants.validate(heads, self.causal)?;
        Ok(
            DensePlan::for_sequences_with(seqs, (heads, kv_heads, d), limits, self.kernel)?
                .with_softmax(SoftmaxFlags::of(&self.variants))
                .with_storage(self.storage),
        )
    }

    /// Records `plan` (a variable-length batch's) into its own compute pass of `enc`: the
    /// attention once per key chunk of the longest sequence (`DenseAttention::key_chunks`:
    /// llvmpipe's loop limit), then the padding.
    fn record_varlen(
        &self,
        enc: &mut wgpu::CommandEncoder,
        plan: &DensePlan,
        pipes: &Pipes,
        t: &GpuTensors<'_>,
        lse: &wgpu::Buffer,
    ) -> Result<()> {
        let device = &self.ctx.device;
        let base = self.params(plan)?;
        let chunks = self.key_chunks(plan);
        let table = plan.sequences.as_ref().map(|t| sequence_table(device, t));
        let partial = self.partial_scratch(chunks.len(), plan.shape.elements());
        let mut cpass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
            label: Some("dense forward (variable lengths)"),
            timestamp_writes: None,
        });
        for (c, &(lo, hi)) in chunks.iter().enumerate() {
            let mut p = base;
            (p.key_lo, p.key_hi) = (lo as u32, hi as u32);
            // The keys the chunks cover (the longest sequence's): the f16 variant keeps the
            // partial O while key_hi < n_kv (a batch's problems read their n_kv from the table).
            if let Some(t) = &plan.sequences {
                p.n_kv = t.max_kv_len as u32;
            }
            let params = uniform(
                device,
                &self.ctx.queue,
                "dense varlen params",
                &to_uniform_bytes(&p)?,
            );
            // The padding pass (padded batches) once, after the last chunk.
            let steps = if c + 1 == chunks.len() {
                plan.steps()
            } else {
                vec![plan.attention]
            };
            let io = (t, lse, partial.as_ref());
            self.record_with(&mut cpass, &steps, pipes, &params, io, table.as_ref())?;
        }
        Ok(())
    }

    /// The plan of a forward of the variable-length batch `seqs` over one binding.
    pub(crate) fn plan_sequences(&self, shape: Shape, seqs: &Sequences) -> Result<DensePlan> {
        seqs.check(shape)?;
        DensePlan::for_sequences_with(
            seqs,
            (shape.heads, shape.kv_heads, shape.head_dim),
            &self.limits,
            self.kernel,
        )
    }

    /// Exact attention of a variable-length batch of host tensors (async): layouts and
    /// results as [`crate::gpu::FmaAttention::forward_varlen_async`] (padding rows: O = 0, LSE
    /// = -inf; causal per sequence). Tensors over one storage binding run in groups of
    /// sequences, a sequence too long alone split along itself.
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
        seqs.check(shape)?;
        let plan = match self.varlen_plan(
            seqs,
            shape.heads,
            shape.kv_heads,
            shape.head_dim,
            &self.limits,
        ) {
            Ok(plan) => plan,
            // Keys with lengths of their own are not regrouped (yet): the limit's error.
            Err(e @ FmaError::LimitExceeded { .. }) if seqs.is_cross() => return Err(e),
            // Groups of sequences that fit; a sequence too long alone split along itself.
            Err(FmaError::LimitExceeded { .. }) => {
                let (h, kvh, d) = (shape.heads, shape.kv_heads, shape.head_dim);
                let bytes_of = |lens: &[usize]| (h * lens.iter().sum::<usize>() * d) as u64 * 4;
                let cap = self.limits.binding_bytes();
                return varlen_in_groups((q, k, v), shape, seqs, want_lse, (cap, &bytes_of), |g| {
                    let one = Shape::new(1, h, g.layout.seqs.total(), d).with_kv_heads(kvh);
                    async move {
                        if g.layout.seqs.count() == 1 {
                            self.forward_async(&g.q, &g.k, &g.v, one, want_lse).await
                        } else {
                            let plan = self.varlen_plan(&g.layout.seqs, h, kvh, d, &self.limits)?;
                            self.run_varlen(&plan, (&g.q, &g.k, &g.v), want_lse).await
                        }
                    }
                })
                .await;
            }
            Err(e) => return Err(e),
        };
        self.run_varlen(&plan, (q, k, v), want_lse).await
    }

    /// One run of host tensors of a batch whose plan fits.
    async fn run_varlen(
        &self,
        plan: &DensePlan,
        (q, k, v): (&[f32], &[f32], &[f32]),
        want_lse: bool,
    ) -> Result<Output> {
        let pipes = Pipes::new(&self.ctx, &plan.steps()).await?;
        let shape = plan.shape;
        run_host(
            &self.ctx,
            &self.host,
            (self.limits.binding_bytes(), self.storage),
            shape,
            (q, k, v),
            want_lse,
            "the dense forward of a variable-length batch",
            |enc, t, lse| self.record_varlen(enc, plan, &pipes, &t, lse),
        )
        .await
    }

    /// [`DenseAttention::forward_varlen_async`] of tensors already on the GPU.
    pub async fn forward_varlen_buffers_async(
        &self,
        t: GpuTensors<'_>,
        shape: Shape,
        seqs: &Sequences,
    ) -> Result<()> {
        t.check_as(shape, self.storage)?;
        seqs.check(shape)?;
        let plan = self.varlen_plan(
            seqs,
            shape.heads,
            shape.kv_heads,
            shape.head_dim,
            &self.limits,
        )?;
        let pipes = Pipes::new(&self.ctx, &plan.steps()).await?;
        let scopes = Scopes::push(&self.ctx)?;
        let mut enc = self
            .ctx
            .device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                label: Some("dense varlen"),
            });
        let lse = t.lse_or_scratch(&self.ctx.device, shape);
        self.record_varlen(&mut enc, &plan, &pipes, &t, &lse)?;
        self.ctx.queue.submit([enc.finish()]);
        scopes
            .pop(&self.ctx, "the dense forward of a variable-length batch")
            .await
    }
}
