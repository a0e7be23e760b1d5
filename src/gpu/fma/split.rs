//! The executor of a [`SplitPlan`]: FMA of tensors too large for one storage binding, one head
//! at a time, each chunk of the head's sequence in bindings of its own ([`SplitPlan`] says how
//! the sequence is cut and why the result is the unsplit one to the bit).
//!
//! Inputs come from host slices (uploaded chunk by chunk) or from the caller's buffers (copied
//! chunk by chunk, so those may exceed a binding as long as the adapter allows the buffer).

use crate::error::{FmaError, Result};
use crate::gpu::engine::pipelines::poisoned;
use crate::gpu::engine::record::{record_steps, Pipes, Resources, Selects};
use crate::gpu::engine::split_io::{
    check_copy_usage, check_split_storage, copy_rows_out, per_head, SplitIo,
};
use crate::gpu::engine::tensors::Output;
use crate::gpu::engine::tensors::{HostBuffers, Staged};
use crate::plan::{Chunk, Dispatch, SplitPlan};
use crate::shape::Shape;

use super::workspace::{Buffers, Uniforms};
use super::FmaAttention;

/// One chunk's bindings: rows `row_base..row_base + rows` of one head's Q, K, V, O and LSE,
/// and its own parameter block with the selectors of its two step lists.
struct ChunkBuffers {
    t: HostBuffers,
    /// Step 1 (its downsample levels) with its selectors.
    pool: Uniforms,
    /// Step 3 (its attention and, coarse queries, its merge): the same parameters.
    attend: Selects,
}

impl FmaAttention {
    /// FMA of `shape` through a [`SplitPlan`]: per head, one submit; host outputs are read back
    /// head by head (an empty [`Output`] for [`SplitIo::Device`]).
    pub(super) async fn forward_split(&self, io: SplitIo<'_>, shape: Shape) -> Result<Output> {
        shape.check_self_attention()?;
        if let SplitIo::Device(t) = &io {
            check_copy_usage(t)?;
        }
        check_split_storage(shape, self.storage)?;
        if !self.cfg.variants.is_plain() {
            // A split head's chunks (and the head-at-a-time copies of resident tensors over a
            // binding) are not planned with the softmax variants (yet): their parameter
            // blocks are one head's of the head's own plan.
            return Err(FmaError::LimitExceeded {
                what: format!(
                    "{shape} with a softmax variant (softcap, sinks, window), run a head at a \
                     time through copies"
                ),
                requested: shape.elements() as u64 * 4,
                max: self.limits.binding_bytes(),
                unit: "bytes in one storage binding",
                advice: "the variants run on heads that fit one storage binding, from host \
                         tensors (in runs of heads) or resident tensors that fit one binding: \
                         pass host tensors, fewer heads or shorter sequences per call"
                    .into(),
            });
        }
        let plan = SplitPlan::with_kernel(
            shape.seq,
            shape.head_dim,
            &self.cfg,
            &self.limits,
            self.fine_kernel(),
        )?
        .with_storage(self.storage);
        if let Some(coarse) = &plan.coarse {
            return self.forward_split_coarse(io, shape, &plan, coarse).await;
        }
        let pipes = Pipes::new(&self.ctx, &plan.head.steps()).await?;
        let shared = plan.shared_steps();
        let shared_selects = Selects::new(&self.ctx, &shared)?;
        per_head(
            &self.ctx,
            io,
            shape,
            "the FMA forward of a split head",
            |h| self.split_head(&plan, &pipes, &shared, &shared_selects, io, (shape, h)),
        )
        .await
    }

    /// Records and submits head `h`: inputs in, the three steps of [`SplitPlan`], outputs
    /// out. Returns the host readbacks of its chunks (none for device outputs).
    fn split_head(
        &self,
        plan: &SplitPlan,
        pipes: &Pipes,
        shared: &[Dispatch],
        shared_selects: &Selects,
        io: SplitIo<'_>,
        (shape, h): (Shape, usize),
    ) -> Result<Vec<Staged>> {
        let device = &self.ctx.device;
        let (n, d) = (plan.head.shape.seq, plan.head.shape.head_dim);
        let head_uniforms = self.uniforms(&plan.head)?;
        let chunks = plan
            .chunks
            .iter()
            .map(|c| self.chunk_buffers(plan, c))
            .collect::<Result<Vec<_>>>()?;
        let mut enc =
            device.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("fma") });

        // Inputs: rows row_base..row_base + rows of head h (K, V: of its K/V head).
        for (c, b) in plan.chunks.iter().zip(&chunks) {
            let tokens = c.row_base..c.row_base + c.rows;
            let dst = [&b.t.q, &b.t.k, &b.t.v];
            let at = (shape, h, self.storage);
            io.fill(&self.ctx.queue, &mut enc, at, tokens, dst);
        }

        {
            let mut buffers = self.buffers.lock().map_err(poisoned)?;
            let mut cpass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
                label: Some("fma forward (split head)"),
                timestamp_writes: None,
            });
            // 1. The levels pooled from tokens, chunk by chunk: level 1 in Average mode (every
            //    level in Learned mode, which never has more than one chunk).
            for (c, b) in plan.chunks.iter().zip(&chunks) {
                let res = self.chunk_resources(&mut buffers, plan, &b.pool.params, &b.t);
                record_steps(
                    &self.ctx,
                    &mut cpass,
                    &c.downsample,
                    pipes,
                    Some(&b.pool.selects),
                    &res,
                )?;
            }
            // 2. Once per head: the levels pooled from coarse rows and the coarse attention.
            //    They read no token, so any chunk's tensors fill those bindings.
            {
                let first = &chunks
                    .first()
                    .ok_or_else(|| FmaError::Gpu {
                        stage: "recording a split head".into(),
                        message: "the plan has no chunk".into(),
                    })?
                    .t;
                let res = self.chunk_resources(&mut buffers, plan, &head_uniforms.params, first);
                record_steps(
                    &self.ctx,
                    &mut cpass,
                    shared,
                    pipes,
                    Some(shared_selects),
                    &res,
                )?;
            }
            // 3. Per chunk, the attention of its queries and (coarse queries) the merge.
            for (c, b) in plan.chunks.iter().zip(&chunks) {
                let res = self.chunk_resources(&mut buffers, plan, &b.pool.params, &b.t);
                let steps: Vec<Dispatch> = std::iter::once(c.attention).chain(c.merge).collect();
                record_steps(&self.ctx, &mut cpass, &steps, pipes, Some(&b.attend), &res)?;
            }
        }

        // Outputs: rows lo..hi of each chunk (the halo rows hold nothing).
        let mut staged = Vec::new();
        for (c, b) in plan.chunks.iter().zip(&chunks) {
            let skip = (c.lo - c.row_base) as u64;
            let rows = (c.hi - c.lo) as u64;
            match io {
                SplitIo::Host { want_lse, .. } => {
                    let part = Shape::new(1, 1, c.hi - c.lo, d);
                    let part = Staged::of(device, part, want_lse, self.storage);
                    part.record_from(&mut enc, &b.t.out, &b.t.lse, skip);
                    staged.push(part);
                }
                SplitIo::Device(t) => {
                    let at = ((h * n + c.lo) as u64, skip, rows);
                    copy_rows_out(&mut enc, (&b.t.out, &b.t.lse), &t, at, (d, self.storage));
                }
            }
        }
        self.ctx.queue.submit([enc.finish()]);
        Ok(staged)
    }

    /// Every role of a split forward's pass: the coarse buffers sized for the head, the
    /// parameter block `params` (the head's or a chunk's) and the chunk tensors `t`.
    fn chunk_resources<'a>(
        &'a self,
        buffers: &'a mut Buffers,
        plan: &SplitPlan,
        params: &'a wgpu::Buffer,
        t: &'a HostBuffers,
    ) -> Resources<'a> {
        buffers
            .coarse(&self.ctx, &plan.head, &self.limits, params, &self.weights)
            .tensors(&t.tensors(), &t.lse)
    }

    /// The bindings of chunk `c`, and its parameters: the head's, for rows
    /// `row_base..row_base + rows` and tokens `lo..hi`, with the chunk's attention grid.
    fn chunk_buffers(&self, plan: &SplitPlan, c: &Chunk) -> Result<ChunkBuffers> {
        let mut params = self.params(&plan.head);
        params.row_base = c.row_base as u32;
        params.chunk_lo = c.lo as u32;
        params.chunk_hi = c.hi as u32;
        params.total_workgroups = c.attention.workgroups;
        params.workgroups_x = c.attention.grid[0];
        let attend: Vec<Dispatch> = std::iter::once(c.attention).chain(c.merge).collect();
        Ok(ChunkBuffers {
            t: HostBuffers::new(
                &self.ctx.device,
                Shape::new(1, 1, c.rows, plan.head.shape.head_dim),
                self.storage,
            ),
            pool: Uniforms::new(&self.ctx, &params, &c.downsample)?,
            attend: Selects::new(&self.ctx, &attend)?,
        })
    }
}
