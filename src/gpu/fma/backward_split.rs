//! Training on host tensors whose single head exceeds one storage binding: the forward split
//! as `split.rs` runs it, its inputs and outputs kept on the host ([`HostKept`]), and the
//! backward of each query head through a [`BackwardSplitPlan`] (its module header says in what
//! order the chunks' passes run and which bits equal the unsplit backward's).
//!
//! Query heads run one at a time (one submit each); a grouped-query K/V head's dK and dV are
//! the sum of its query heads' in head order, on the host: the same bits run to run.

use std::sync::Arc;

use crate::error::{FmaError, Result};
use crate::gpu::engine::buffers::{read_f32, storage};
use crate::gpu::engine::front::RunGradients;
use crate::gpu::engine::passes::Role;
use crate::gpu::engine::pipelines::poisoned;
use crate::gpu::engine::record::{record_steps, Pipes};
use crate::gpu::engine::split_io::SplitIo;
use crate::gpu::engine::tensors::{host_bytes, tensor_bytes, widen, Output, Scopes};
use crate::gradients::Gradients;
use crate::plan::{BackwardSplitPlan, Chunk, Dispatch, DkvRowGroup};
use crate::shape::Shape;

use super::backward::{HostKept, Kept, Saved};
use super::backward_split_coarse_q::CoarseQueryUniforms;
use super::workspace::Uniforms;
use super::FmaAttention;

/// One chunk's bindings: rows `row_base .. row_base + rows` of one query head's Q, O, dO, the
/// LSE and D (stats), of its K/V head's K and V, and of the gradients dQ, dK, dV.
struct ChunkBuffers {
    q: wgpu::Buffer,
    k: wgpu::Buffer,
    v: wgpu::Buffer,
    o: wgpu::Buffer,
    dout: wgpu::Buffer,
    lse: wgpu::Buffer,
    stats: wgpu::Buffer,
    dq: wgpu::Buffer,
    dk: wgpu::Buffer,
    dv: wgpu::Buffer,
    /// Parameters of D over the bound rows (`chunk_lo .. chunk_hi` = the bound rows).
    delta: Uniforms,
    /// Parameters of the chunk's other passes (`chunk_lo .. chunk_hi` = its tokens), the
    /// selectors of its pooling steps.
    pool: Uniforms,
    /// The same parameters, the selectors of its dQ and near-field dK/dV steps.
    grads: Uniforms,
    /// The same parameters with each group of coarse rows (`plan.dkv_groups`, levels in
    /// order), with the selector of this chunk's coarse dK~/dV~ step over the group's rows it
    /// may add to, and that step (`plan::DkvChunkRows`; `None`: no row of the group).
    coarse: Vec<Option<(Uniforms, Dispatch)>>,
    /// The same parameters, the selector of its downsampling backward.
    unpool: Uniforms,
}

impl FmaAttention {
    /// The training forward of host tensors of `shape` whose single head's backward exceeds
    /// one binding: the split forward with the LSE, its tensors kept on the host.
    pub(super) async fn forward_train_split(
        &self,
        (q, k, v): (&[f32], &[f32], &[f32]),
        shape: Shape,
    ) -> Result<(Output, Saved)> {
        // Everything the backward will need must be possible before the forward runs.
        BackwardSplitPlan::new(shape.seq, shape.head_dim, &self.cfg, &self.limits)?;
        let io = SplitIo::Host {
            q,
            k,
            v,
            want_lse: true,
        };
        let out = self.forward_split(io, shape).await?;
        let lse = out.lse.clone().ok_or_else(|| FmaError::Gpu {
            stage: "the split forward of a training run".into(),
            message: "the forward returned no LSE".into(),
        })?;
        let kept = HostKept {
            q: Arc::new(q.to_vec()),
            k: Arc::new(k.to_vec()),
            v: Arc::new(v.to_vec()),
            o: Arc::new(out.o.clone()),
            lse: Arc::new(lse),
        };
        Ok((out, Saved::runs(shape, self.id, Kept::Split(kept))))
    }

    /// The backward of host dO of a [`Kept::Split`] forward of `shape`: query head by query
    /// head, gradients put together in head order (module header).
    pub(super) async fn backward_split(
        &self,
        shape: Shape,
        kept: &HostKept,
        dout: &[f32],
    ) -> Result<Gradients<f32>> {
        let plan = BackwardSplitPlan::new(shape.seq, shape.head_dim, &self.cfg, &self.limits)?
            .with_storage(self.storage);
        let all = plan.dispatches();
        let pipes = Pipes::new(&self.ctx, &all).await?;
        let per = shape.seq * shape.head_dim;
        // Each of dQ, dK, dV in the staging buffer: whole words of the storage's elements.
        let per_bytes = tensor_bytes(per, self.storage);
        // A query head is a run of one: its K/V head's gradients are added in head order.
        let mut sum = RunGradients::new(shape);
        for h in 0..shape.batch_heads() {
            let scopes = Scopes::push(&self.ctx)?;
            let staging = self.split_head_backward(&plan, &pipes, kept, dout, (shape, h))?;
            scopes
                .pop(&self.ctx, "the FMA backward of a split head")
                .await?;
            let mut rows = read_f32(&self.ctx.device, &staging, 3 * per_bytes).await?;
            self.ctx.check_alive()?;
            let words = (per_bytes / 4) as usize;
            let g_v = rows.split_off(2 * words);
            let g_k = rows.split_off(words);
            let g = Gradients {
                dq: widen(rows, per, self.storage),
                dk: widen(g_k, per, self.storage),
                dv: widen(g_v, per, self.storage),
                weights: None,
                dsinks: None,
            };
            sum.add((h, 1), g);
        }
        Ok(sum.finish(self.storage))
    }

    /// Records and submits the backward of query head `h`; returns the staging buffer its dQ,
    /// dK and dV rows (n each, in that order) are copied into.
    fn split_head_backward(
        &self,
        plan: &BackwardSplitPlan,
        pipes: &Pipes,
        kept: &HostKept,
        dout: &[f32],
        (shape, h): (Shape, usize),
    ) -> Result<wgpu::Buffer> {
        let device = &self.ctx.device;
        let queue = &self.ctx.queue;
        let (n, d) = (shape.seq, shape.head_dim);
        let kv = h / shape.group();
        let head_params = self.split_backward_params(plan, 0, 0..n);
        let shared = plan.shared_pool();
        let head_shared = Uniforms::new(&self.ctx, &head_params, &shared)?;
        // Per group of coarse rows (levels in order), its combine rounds over the whole head.
        let combine = plan
            .dkv_groups
            .iter()
            .flatten()
            .map(|g| Uniforms::new(&self.ctx, &with_rows(head_params, g), &g.combine))
            .collect::<Result<Vec<_>>>()?;
        let coarse_q = plan
            .coarse_queries
            .as_ref()
            .map(|steps| {
                let params = plan.split.chunks.iter();
                let params =
                    params.map(|c| self.split_backward_params(plan, c.row_base, c.lo..c.hi));
                CoarseQueryUniforms::new(&self.ctx, steps, params, &head_params)
            })
            .transpose()?;
        let chunks = plan
            .split
            .chunks
            .iter()
            .zip(&plan.chunks)
            .enumerate()
            .map(|(i, (c, b))| {
                let t = self.split_chunk_buffers(plan, (i, c), b)?;
                // Rows row_base .. row_base + rows of head h (K, V: of its K/V head).
                let span = |head: usize| {
                    let at = head * n * d + c.row_base * d;
                    at..at + c.rows * d
                };
                let lse = &kept.lse[h * n + c.row_base..h * n + c.row_base + c.rows];
                for (buf, data) in [
                    (&t.q, &kept.q[span(h)]),
                    (&t.k, &kept.k[span(kv)]),
                    (&t.v, &kept.v[span(kv)]),
                    (&t.o, &kept.o[span(h)]),
                    (&t.dout, &dout[span(h)]),
                ] {
                    queue.write_buffer(buf, 0, &host_bytes(data, self.storage));
                }
                queue.write_buffer(&t.lse, 0, bytemuck::cast_slice(lse));
                Ok(t)
            })
            .collect::<Result<Vec<_>>>()?;
        let first = chunks.first().ok_or_else(|| FmaError::Gpu {
            stage: "recording a split head's backward".into(),
            message: "the plan has no chunk".into(),
        })?;
        let mut enc = device.create_command_encoder(&wgpu::CommandEncoderDescriptor {
            label: Some("fma backward (split head)"),
        });
        {
            let mut scratch = self.backward_scratch.lock().map_err(poisoned)?;
            let cap = self.limits.binding_bytes();
            let mut cpass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
                label: Some("fma backward (split head)"),
                timestamp_writes: None,
            });
            // The roles of every pass: the scratch's coarse rows (whole), a chunk's rows.
            macro_rules! res {
                ($params:expr, $t:expr) => {
                    scratch
                        .resources(&self.ctx, &plan.head, cap)
                        .with(Role::Params, $params)
                        .with(Role::Q, &$t.q)
                        .with(Role::K, &$t.k)
                        .with(Role::V, &$t.v)
                        .with(Role::Out, &$t.o)
                        .with(Role::Lse, &$t.lse)
                        .with(Role::Stats, &$t.stats)
                        .with(Role::DOut, &$t.dout)
                        .with(Role::DQ, &$t.dq)
                        .with(Role::DK, &$t.dk)
                        .with(Role::DV, &$t.dv)
                        .with(Role::Weights, &self.weights.w)
                        .with(Role::Biases, &self.weights.b)
                };
            }
            // 1. The coarse K~, V~: level 1 from each chunk's tokens, the rest once.
            for (c, t) in plan.split.chunks.iter().zip(&chunks) {
                let res = res!(&t.pool.params, t);
                let sel = Some(&t.pool.selects);
                record_steps(&self.ctx, &mut cpass, &c.downsample, pipes, sel, &res)?;
            }
            let res = res!(&head_shared.params, first);
            let sel = Some(&head_shared.selects);
            record_steps(&self.ctx, &mut cpass, &shared, pipes, sel, &res)?;
            // 2. Per chunk: D, dQ, near-field dK/dV.
            for (b, t) in plan.chunks.iter().zip(&chunks) {
                let res = res!(&t.delta.params, t);
                let sel = Some(&t.delta.selects);
                record_steps(&self.ctx, &mut cpass, &[b.delta], pipes, sel, &res)?;
                let res = res!(&t.grads.params, t);
                let sel = Some(&t.grads.selects);
                record_steps(&self.ctx, &mut cpass, &[b.dq, b.dkv_fine], pipes, sel, &res)?;
            }
            // 3. Coarse queries: each chunk's level-1 (G, R, H), then the passes over coarse rows
            //    alone, once (backward_split_coarse_q.rs).
            if let (Some(steps), Some(u)) = (&plan.coarse_queries, &coarse_q) {
                for ((step, t), u) in steps.first_level.iter().zip(&chunks).zip(&u.first_level) {
                    let res = res!(&u.params, t);
                    let sel = Some(&u.selects);
                    record_steps(&self.ctx, &mut cpass, &[*step], pipes, sel, &res)?;
                }
                let res = res!(&u.shared.params, first);
                let sel = Some(&u.shared.selects);
                record_steps(&self.ctx, &mut cpass, &steps.shared, pipes, sel, &res)?;
            }
            // 3. Fine queries, level by level, each level's groups of coarse rows in order (the
            //    groups share the partial sums' space): each chunk's coarse dK~/dV~ of the
            //    group's rows in chunk order, added to the earlier chunks', then the group's
            //    combine rounds (coarse queries: no group).
            let groups = plan.dkv_groups.iter().flatten().zip(&combine);
            for (i, (g, head)) in groups.enumerate() {
                // The first chunk writes every row's sums, a later one adds to the rows it
                // may read (plan::DkvChunkRows).
                for t in &chunks {
                    let Some((u, step)) = &t.coarse[i] else {
                        continue;
                    };
                    let res = res!(&u.params, t);
                    let sel = Some(&u.selects);
                    record_steps(&self.ctx, &mut cpass, &[*step], pipes, sel, &res)?;
                }
                let res = res!(&head.params, first);
                let sel = Some(&head.selects);
                record_steps(&self.ctx, &mut cpass, &g.combine, pipes, sel, &res)?;
            }
            // 4. Per chunk, dK~ and dV~ into its tokens' dK and dV.
            for (b, t) in plan.chunks.iter().zip(&chunks) {
                let steps: Vec<Dispatch> = b.downsample_backward.into_iter().collect();
                let res = res!(&t.unpool.params, t);
                let sel = Some(&t.unpool.selects);
                record_steps(&self.ctx, &mut cpass, &steps, pipes, sel, &res)?;
            }
        }
        // Rows lo..hi of each chunk's dQ, dK, dV (the halo rows hold another chunk's); f16 rows
        // of an even head_dim (`check_split_storage`), so every copy is of whole words.
        let row = d as u64 * self.storage.bytes();
        let per = tensor_bytes(n * d, self.storage);
        let staging = device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("split head gradients readback"),
            size: 3 * per,
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        for (c, t) in plan.split.chunks.iter().zip(&chunks) {
            let skip = (c.lo - c.row_base) as u64 * row;
            let len = (c.hi - c.lo) as u64 * row;
            for (i, src) in [&t.dq, &t.dk, &t.dv].into_iter().enumerate() {
                let at = i as u64 * per + c.lo as u64 * row;
                enc.copy_buffer_to_buffer(src, skip, &staging, at, len);
            }
        }
        queue.submit([enc.finish()]);
        Ok(staging)
    }

    /// The backward's parameter block for a split head's rows from `row_base` and tokens
    /// `tokens` (the whole head: 0 and 0..n).
    fn split_backward_params(
        &self,
        plan: &BackwardSplitPlan,
        row_base: usize,
        tokens: std::ops::Range<usize>,
    ) -> crate::gpu::engine::params::Params {
        let mut params = self.params(&plan.head.forward);
        params.partials_at = plan.head.partials_at as u32;
        params.q_partials_at = plan.head.q_partials_at as u32;
        params.row_base = row_base as u32;
        params.chunk_lo = tokens.start as u32;
        params.chunk_hi = tokens.end as u32;
        params
    }

    /// The bindings of chunk `c`, the `i`-th (backward passes `b`), and their parameter
    /// blocks.
    fn split_chunk_buffers(
        &self,
        plan: &BackwardSplitPlan,
        (i, c): (usize, &Chunk),
        b: &crate::plan::BackwardChunk,
    ) -> Result<ChunkBuffers> {
        let device = &self.ctx.device;
        let d = plan.head.forward.shape.head_dim;
        let bytes = tensor_bytes(c.rows * d, self.storage);
        let input = wgpu::BufferUsages::COPY_DST;
        let output = wgpu::BufferUsages::COPY_SRC;
        let bound = c.row_base..c.row_base + c.rows;
        let params = self.split_backward_params(plan, c.row_base, c.lo..c.hi);
        let unpool: Vec<Dispatch> = b.downsample_backward.into_iter().collect();
        Ok(ChunkBuffers {
            q: storage(device, "q (split chunk)", bytes, input),
            k: storage(device, "k (split chunk)", bytes, input),
            v: storage(device, "v (split chunk)", bytes, input),
            o: storage(device, "o (split chunk)", bytes, input),
            dout: storage(device, "dO (split chunk)", bytes, input),
            lse: storage(device, "lse (split chunk)", c.rows as u64 * 4, input),
            stats: storage(
                device,
                "lse and delta (split chunk)",
                c.rows as u64 * 8,
                output,
            ),
            dq: storage(device, "dq (split chunk)", bytes, output),
            dk: storage(device, "dk (split chunk)", bytes, output),
            dv: storage(device, "dv (split chunk)", bytes, output),
            delta: Uniforms::new(
                &self.ctx,
                &self.split_backward_params(plan, c.row_base, bound),
                &[b.delta],
            )?,
            pool: Uniforms::new(&self.ctx, &params, &c.downsample)?,
            grads: Uniforms::new(&self.ctx, &params, &[b.dq, b.dkv_fine])?,
            coarse: plan
                .dkv_groups
                .iter()
                .flatten()
                .map(|g| {
                    g.chunks[i]
                        .as_ref()
                        .map(|r| {
                            let mut at = with_rows(params, g);
                            at.dkv_first = r.rows.start as u32;
                            let u = Uniforms::new(&self.ctx, &at, &[r.dkv_coarse])?;
                            Ok((u, r.dkv_coarse))
                        })
                        .transpose()
                })
                .collect::<Result<Vec<_>>>()?,
            unpool: Uniforms::new(&self.ctx, &params, &unpool)?,
        })
    }
}

/// `params` for the coarse dK~/dV~ pass and combine rounds of group `g` of a level's coarse
/// rows: its first row and its rows (its partial sums from `partials_at`).
fn with_rows(
    mut params: crate::gpu::engine::params::Params,
    g: &DkvRowGroup,
) -> crate::gpu::engine::params::Params {
    params.dkv_row_lo = g.rows.start as u32;
    params.dkv_rows = g.rows.len() as u32;
    params
}
