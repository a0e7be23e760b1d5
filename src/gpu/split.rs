//! The executor of a [`SplitPlan`]: FMA of tensors too large for one storage binding, one head
//! at a time, each chunk of the head's sequence in bindings of its own (`crate::plan_split`
//! says how the sequence is cut and why the result is the unsplit one to the bit).
//!
//! Inputs come from host slices (uploaded chunk by chunk) or from the caller's buffers (copied
//! chunk by chunk, so those may exceed a binding as long as the adapter allows the buffer).

use std::ops::Range;

use crate::error::{FmaError, Result};
use crate::gpu::fma::{level_selects, FmaAttention, Pipes, Workspace};
use crate::gpu::io::{GpuTensors, HostBuffers, Scopes, Staged};
use crate::gpu::params::to_uniform_bytes;
use crate::gpu::pipelines::poisoned;
use crate::gpu::shaders::Pass;
use crate::gpu::{GpuContext, Output};
use crate::plan_split::{Chunk, SplitPlan};
use crate::shape::Shape;

/// Where a split forward's Q, K and V come from and where O and the LSE go.
#[derive(Clone, Copy)]
pub(super) enum SplitIo<'a> {
    /// Host tensors (batch, heads, seq, head_dim); O (and the LSE) are read back.
    Host {
        q: &'a [f32],
        k: &'a [f32],
        v: &'a [f32],
        want_lse: bool,
    },
    /// The caller's buffers: Q, K, V need `COPY_SRC`, O and the LSE `COPY_DST` besides
    /// `STORAGE`; O (and the LSE when given) are written there.
    Device(GpuTensors<'a>),
}

impl SplitIo<'_> {
    /// Puts elements `range` of Q, K and V into `dst`: written through the queue (before the
    /// next submit) from host slices, or copied in `enc` from the caller's buffers.
    pub(super) fn fill(
        &self,
        queue: &wgpu::Queue,
        enc: &mut wgpu::CommandEncoder,
        range: Range<usize>,
        dst: [&wgpu::Buffer; 3],
    ) {
        match self {
            SplitIo::Host { q, k, v, .. } => {
                for (src, dst) in [q, k, v].into_iter().zip(dst) {
                    queue.write_buffer(dst, 0, bytemuck::cast_slice(&src[range.clone()]));
                }
            }
            SplitIo::Device(t) => {
                let (at, bytes) = (range.start as u64 * 4, range.len() as u64 * 4);
                for (src, dst) in [t.q, t.k, t.v].into_iter().zip(dst) {
                    enc.copy_buffer_to_buffer(src, at, dst, 0, bytes);
                }
            }
        }
    }
}

/// Runs `head` for every head of `shape`, each inside error scopes (`head` records and
/// submits one head and returns its chunks' readbacks), and concatenates the host outputs
/// (an empty [`Output`] for [`SplitIo::Device`]).
pub(super) async fn per_head(
    ctx: &GpuContext,
    io: SplitIo<'_>,
    shape: Shape,
    stage: &str,
    mut head: impl FnMut(usize) -> Result<Vec<Staged>>,
) -> Result<Output> {
    let want_lse = matches!(io, SplitIo::Host { want_lse: true, .. });
    let mut o = Vec::new();
    let mut lse = Vec::new();
    for h in 0..shape.batch_heads() {
        let scopes = Scopes::push(ctx)?;
        let staged = head(h)?;
        scopes.pop(ctx, stage).await?;
        for part in staged {
            let part = part.read(ctx).await?;
            o.extend_from_slice(&part.o);
            lse.extend(part.lse.into_iter().flatten());
        }
    }
    Ok(Output {
        o,
        lse: want_lse.then_some(lse),
    })
}

/// One chunk's bindings: rows `row_base..row_base + rows` of one head's Q, K, V, O and LSE,
/// and its own parameter block and level selectors (its downsample levels, then its merge).
struct ChunkBuffers {
    t: HostBuffers,
    params: wgpu::Buffer,
    select: wgpu::Buffer,
}

/// Checks the caller's buffers allow the copies a split forward makes.
pub(super) fn check_copy_usage(t: &GpuTensors<'_>) -> Result<()> {
    let need = |name: &str, buf: &wgpu::Buffer, usage: wgpu::BufferUsages, flag: &str| {
        if buf.usage().contains(usage) {
            Ok(())
        } else {
            Err(FmaError::ShapeMismatch {
                what: format!("{name} buffer usage"),
                expected: format!(
                    "STORAGE | {flag}: tensors larger than one storage binding are copied in \
                     pieces"
                ),
                got: format!("{:?}", buf.usage()),
            })
        }
    };
    let (src, dst) = (wgpu::BufferUsages::COPY_SRC, wgpu::BufferUsages::COPY_DST);
    need("Q", t.q, src, "COPY_SRC")?;
    need("K", t.k, src, "COPY_SRC")?;
    need("V", t.v, src, "COPY_SRC")?;
    need("O", t.out, dst, "COPY_DST")?;
    t.lse.map_or(Ok(()), |l| need("LSE", l, dst, "COPY_DST"))
}

impl FmaAttention {
    /// FMA of `shape` through a [`SplitPlan`]: per head, one submit; host outputs are read back
    /// head by head (an empty [`Output`] for [`SplitIo::Device`]).
    pub(super) async fn forward_split(&self, io: SplitIo<'_>, shape: Shape) -> Result<Output> {
        if let SplitIo::Device(t) = &io {
            check_copy_usage(t)?;
        }
        let plan = SplitPlan::new(shape.seq, shape.head_dim, &self.cfg, &self.limits)?;
        let pipes = self.pipes(&plan.head).await?;
        let ws = self.workspace(&plan.head)?;
        per_head(
            &self.ctx,
            io,
            shape,
            "the FMA forward of a split head",
            |h| {
                let ws = ws.lock().map_err(poisoned)?;
                self.split_head(&plan, &ws, &pipes, io, h)
            },
        )
        .await
    }

    /// Records and submits head `h`: inputs in, the three steps of `crate::plan_split`,
    /// outputs out. Returns the host readbacks of its chunks (none for device outputs).
    fn split_head(
        &self,
        plan: &SplitPlan,
        ws: &Workspace,
        pipes: &Pipes,
        io: SplitIo<'_>,
        h: usize,
    ) -> Result<Vec<Staged>> {
        let device = &self.ctx.device;
        let (n, d) = (plan.head.shape.seq, plan.head.shape.head_dim);
        let chunks = plan
            .chunks
            .iter()
            .map(|c| self.chunk_buffers(plan, c))
            .collect::<Result<Vec<_>>>()?;
        let mut enc =
            device.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("fma") });

        // Inputs: rows row_base..row_base + rows of head h.
        for (c, b) in plan.chunks.iter().zip(&chunks) {
            let rows = (h * n + c.row_base) * d..(h * n + c.row_base + c.rows) * d;
            io.fill(&self.ctx.queue, &mut enc, rows, [&b.t.q, &b.t.k, &b.t.v]);
        }

        {
            let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
                label: Some("fma forward (split head)"),
                timestamp_writes: None,
            });
            let stride = ws.select_stride;
            // 1. The levels pooled from tokens, chunk by chunk: level 1 in Average mode (every
            //    level in Learned mode, which never has more than one chunk).
            for (c, b) in plan.chunks.iter().zip(&chunks) {
                if c.downsample.is_empty() {
                    continue;
                }
                let group =
                    self.bind_group(Pass::Downsample, &b.params, ws, &b.t.tensors(), &b.t.lse);
                let select = self.select_group(&b.select);
                pass.set_pipeline(pipes.get(Pass::Downsample)?);
                pass.set_bind_group(0, &group, &[]);
                for (i, step) in c.downsample.iter().enumerate() {
                    pass.set_bind_group(1, &select, &[i as u32 * stride]);
                    pass.dispatch_workgroups(step.grid[0], step.grid[1], step.grid[2]);
                }
            }
            // 2. Once per head: the levels pooled from coarse rows and the coarse attention.
            //    They read no token, so any chunk's tensors fill those bindings.
            let select = self.select_group(&ws.level_select);
            let first = &chunks[0];
            for (k, step) in plan.shared_steps() {
                let group =
                    self.bind_group(step.pass, &ws.params, ws, &first.t.tensors(), &first.t.lse);
                pass.set_pipeline(pipes.get(step.pass)?);
                pass.set_bind_group(0, &group, &[]);
                pass.set_bind_group(1, &select, &[k as u32 * stride]);
                pass.dispatch_workgroups(step.grid[0], step.grid[1], step.grid[2]);
            }
            // 3. Per chunk, the attention of its queries and (coarse queries) the merge.
            for (c, b) in plan.chunks.iter().zip(&chunks) {
                let t = b.t.tensors();
                let group = self.bind_group(Pass::FineAttention, &b.params, ws, &t, &b.t.lse);
                pass.set_pipeline(pipes.get(Pass::FineAttention)?);
                pass.set_bind_group(0, &group, &[]);
                let g = c.attention.grid;
                pass.dispatch_workgroups(g[0], g[1], g[2]);
                if let Some(merge) = c.merge {
                    let group = self.bind_group(Pass::UpsampleMerge, &b.params, ws, &t, &b.t.lse);
                    pass.set_pipeline(pipes.get(Pass::UpsampleMerge)?);
                    pass.set_bind_group(0, &group, &[]);
                    let slot = c.downsample.len() as u32 * stride;
                    pass.set_bind_group(1, &self.select_group(&b.select), &[slot]);
                    pass.dispatch_workgroups(merge.grid[0], merge.grid[1], merge.grid[2]);
                }
            }
        }

        // Outputs: rows lo..hi of each chunk (the halo rows hold nothing).
        let mut staged = Vec::new();
        for (c, b) in plan.chunks.iter().zip(&chunks) {
            let skip = (c.lo - c.row_base) as u64;
            let rows = (c.hi - c.lo) as u64;
            match io {
                SplitIo::Host { want_lse, .. } => {
                    let part = Staged::new(device, Shape::new(1, 1, c.hi - c.lo, d), want_lse);
                    part.record_from(&mut enc, &b.t.out, &b.t.lse, skip);
                    staged.push(part);
                }
                SplitIo::Device(t) => {
                    let first = (h * n + c.lo) as u64;
                    let row = d as u64 * 4;
                    enc.copy_buffer_to_buffer(&b.t.out, skip * row, t.out, first * row, rows * row);
                    if let Some(lse) = t.lse {
                        enc.copy_buffer_to_buffer(&b.t.lse, skip * 4, lse, first * 4, rows * 4);
                    }
                }
            }
        }
        self.ctx.queue.submit([enc.finish()]);
        Ok(staged)
    }

    /// The bindings of chunk `c`, and its parameters: the head's, for rows
    /// `row_base..row_base + rows` and tokens `lo..hi`, with the chunk's attention grid.
    fn chunk_buffers(&self, plan: &SplitPlan, c: &Chunk) -> Result<ChunkBuffers> {
        let device = &self.ctx.device;
        let mut params = self.params(&plan.head);
        params.row_base = c.row_base as u32;
        params.chunk_lo = c.lo as u32;
        params.chunk_hi = c.hi as u32;
        params.total_workgroups = c.attention.workgroups;
        params.workgroups_x = c.attention.grid[0];
        let steps: Vec<_> = c.downsample.iter().copied().chain(c.merge).collect();
        Ok(ChunkBuffers {
            t: HostBuffers::new(device, Shape::new(1, 1, c.rows, plan.head.shape.head_dim)),
            params: self.uniform("chunk params", &to_uniform_bytes(&params)?),
            select: self.uniform(
                "chunk level_select",
                &level_selects(&steps, self.select_stride())?,
            ),
        })
    }
}
