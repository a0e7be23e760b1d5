//! Training dense attention on host tensors whose single head exceeds one storage binding
//! (issue 27): the forward split as `split.rs` runs it, its inputs and outputs kept on the host
//! ([`DenseHostKept`]), and the backward of each K/V head and its group of query heads through
//! a [`DenseBackwardSplitPlan`] (its module header says in what order the pairs' passes run and
//! when the bits are the unsplit backward's).
//!
//! One K/V head at a time (one submit each): every chunk of its rows gets its own buffers
//! (each within a binding), the pairs' dispatches bind a query chunk's and a key chunk's, and
//! each gradient is summed on the device in the plan's fixed order (no atomics: the same bits
//! run to run). dQ, dK, dV are read back and put in head order on the host.

use std::sync::Arc;

use crate::error::{FmaError, Result};
use crate::gpu::engine::buffers::{read_f32, storage, uniform};
use crate::gpu::engine::front::RunGradients;
use crate::gpu::engine::params::{to_uniform_bytes, Params};
use crate::gpu::engine::passes::Role;
use crate::gpu::engine::record::{record_steps, Pipes, Resources, Selects};
use crate::gpu::engine::split_io::SplitIo;
use crate::gpu::engine::tensors::{Output, Scopes};
use crate::gradients::Gradients;
use crate::plan::{DenseBackwardSplitPlan, DenseBackwardStep, Dispatch};
use crate::shape::Shape;
use crate::storage::Storage;

use super::backward::DenseSaved;
use super::DenseAttention;

/// A split head's training forward, kept on the host: Q, O of (batch, heads, seq, head_dim),
/// K, V of (batch, kv_heads, seq, head_dim), the LSE of (batch, heads, seq).
#[derive(Clone, Debug)]
pub(super) struct DenseHostKept {
    pub q: Arc<Vec<f32>>,
    pub k: Arc<Vec<f32>>,
    pub v: Arc<Vec<f32>>,
    pub o: Arc<Vec<f32>>,
    pub lse: Arc<Vec<f32>>,
}

/// One chunk's rows `lo..hi` of a K/V head: its group's Q, O, dO, LSE, stats (LSE, D) and dQ,
/// (group, rows, ...), and the K/V head's K, V, dK, dV, (rows, d).
struct ChunkBuffers {
    q: wgpu::Buffer,
    o: wgpu::Buffer,
    dout: wgpu::Buffer,
    lse: wgpu::Buffer,
    stats: wgpu::Buffer,
    dq: wgpu::Buffer,
    k: wgpu::Buffer,
    v: wgpu::Buffer,
    dk: wgpu::Buffer,
    dv: wgpu::Buffer,
}

/// The parameter blocks of a plan's dispatches (the same for every K/V head).
struct SplitUniforms {
    /// Per query chunk: D's block and its selector.
    delta: Vec<(wgpu::Buffer, Selects)>,
    dkv: Vec<wgpu::Buffer>,
    dq: Vec<wgpu::Buffer>,
}

impl DenseAttention {
    /// The plan of the backward of a head of `shape` split across bindings.
    fn backward_split_plan(&self, shape: Shape) -> Result<DenseBackwardSplitPlan> {
        let group = shape.group();
        DenseBackwardSplitPlan::new(
            (shape.seq, shape.head_dim, group),
            self.causal,
            &self.limits,
            self.max_keys,
        )
    }

    /// The training forward of host tensors of `shape` whose single head's backward exceeds
    /// one binding: the split forward with the LSE, its tensors kept on the host.
    pub(super) async fn forward_train_split(
        &self,
        (q, k, v): (&[f32], &[f32], &[f32]),
        shape: Shape,
    ) -> Result<(Output, DenseSaved)> {
        // This path stages f32 rows: f16 storage trains a dense head only where it fits one
        // binding (FMA's split backward takes f16; the dense one is still to follow).
        if self.storage == Storage::F16 {
            return Err(FmaError::LimitExceeded {
                what: format!("f16 storage of a dense head over one binding, {shape}"),
                requested: shape.elements().max(shape.kv_elements()) as u64 * 2,
                max: self.limits.binding_bytes(),
                unit: "bytes in one storage binding (the dense split backward is f32 only)",
                advice: "train this head with f32 storage (split across bindings), with FMA \
                         (whose split backward takes f16), or with a shorter sequence"
                    .into(),
            });
        }
        // The split forward refuses the variants and cross attention; the backward must be
        // possible before the forward runs.
        self.check_unsplit(shape)?;
        self.backward_split_plan(shape)?;
        let io = SplitIo::Host {
            q,
            k,
            v,
            want_lse: true,
        };
        let out = self.forward_split(io, shape).await?;
        let lse = out.lse.clone().ok_or_else(|| FmaError::Gpu {
            stage: "the split forward of a dense training run".into(),
            message: "the forward returned no LSE".into(),
        })?;
        let kept = DenseHostKept {
            q: Arc::new(q.to_vec()),
            k: Arc::new(k.to_vec()),
            v: Arc::new(v.to_vec()),
            o: Arc::new(out.o.clone()),
            lse: Arc::new(lse),
        };
        Ok((out, DenseSaved::split(shape, self.id, kept)))
    }

    /// The backward of host dO ((batch, heads, seq, head_dim)) of a `DenseKept::Split`
    /// forward of `shape`: K/V head by K/V head (module header); dQ of Q's shape, dK, dV of
    /// K's.
    pub(super) async fn backward_split(
        &self,
        shape: Shape,
        kept: &DenseHostKept,
        dout: &[f32],
    ) -> Result<Gradients<f32>> {
        let plan = self.backward_split_plan(shape)?;
        let all: Vec<Dispatch> = plan
            .plans
            .iter()
            .flat_map(|p| [p.delta, p.dkv, p.dq])
            .collect();
        let pipes = Pipes::new(&self.ctx, &all).await?;
        let uniforms = self.split_uniforms(&plan)?;
        let group = plan.group;
        let mut sum = RunGradients::new(shape);
        for kv in 0..shape.kv_batch_heads() {
            let scopes = Scopes::push(&self.ctx)?;
            let (staging, bytes) =
                self.split_kv_head(&plan, &pipes, &uniforms, (kept, dout), (shape, kv))?;
            scopes
                .pop(&self.ctx, "the dense backward of a split head")
                .await?;
            let rows = read_f32(&self.ctx.device, &staging, bytes).await?;
            self.ctx.check_alive()?;
            sum.add((kv * group, group), self.scatter(&plan, &rows));
        }
        Ok(sum.finish(Storage::F32))
    }

    /// The parameter blocks of every dispatch of `plan`.
    fn split_uniforms(&self, plan: &DenseBackwardSplitPlan) -> Result<SplitUniforms> {
        let make = |p: Params, label: &str| -> Result<wgpu::Buffer> {
            Ok(uniform(
                &self.ctx.device,
                &self.ctx.queue,
                label,
                &to_uniform_bytes(&p)?,
            ))
        };
        let delta = plan
            .delta
            .iter()
            .map(|&at| {
                let p = &plan.plans[at];
                let params = make(self.params(&p.forward)?, "dense split delta params")?;
                Ok((params, Selects::new(&self.ctx, &[p.delta])?))
            })
            .collect::<Result<_>>()?;
        let step = |s: &DenseBackwardStep, dkv: bool| -> Result<wgpu::Buffer> {
            let p = &plan.plans[s.plan];
            let mut params = self.params(&p.forward)?;
            // A causal head's off-diagonal pair sees every key of its key chunk.
            params.causal = s.causal as u32;
            params.accumulate = s.accumulate as u32;
            params.total_workgroups = s.dispatch.workgroups;
            params.workgroups_x = s.dispatch.grid[0];
            let (lo, hi) = (s.rows.0 as u32, s.rows.1 as u32);
            if dkv {
                params.tiles_per_block = p.key_tiles;
                (params.chunk_lo, params.chunk_hi) = (lo, hi);
            } else {
                params.tiles_per_block = p.query_tiles;
                (params.key_lo, params.key_hi) = (lo, hi);
            }
            make(params, "dense split backward params")
        };
        Ok(SplitUniforms {
            delta,
            dkv: plan
                .dkv
                .iter()
                .map(|s| step(s, true))
                .collect::<Result<_>>()?,
            dq: plan
                .dq
                .iter()
                .map(|s| step(s, false))
                .collect::<Result<_>>()?,
        })
    }

    /// Records and submits the backward of K/V head `kv` and its group of query heads;
    /// returns the staging buffer its gradients are copied into (per chunk: dQ of the group,
    /// dK, dV) and its bytes.
    fn split_kv_head(
        &self,
        plan: &DenseBackwardSplitPlan,
        pipes: &Pipes,
        uniforms: &SplitUniforms,
        (kept, dout): (&DenseHostKept, &[f32]),
        (shape, kv): (Shape, usize),
    ) -> Result<(wgpu::Buffer, u64)> {
        let device = &self.ctx.device;
        let queue = &self.ctx.queue;
        let (n, d, group) = (shape.seq, shape.head_dim, plan.group);
        let input = wgpu::BufferUsages::COPY_DST;
        let output = wgpu::BufferUsages::COPY_SRC;
        let chunks: Vec<ChunkBuffers> = plan
            .chunks
            .iter()
            .map(|&(lo, hi)| {
                let rows = hi - lo;
                let (qb, kb) = ((group * rows * d * 4) as u64, (rows * d * 4) as u64);
                let b = ChunkBuffers {
                    q: storage(device, "split q", qb, input),
                    o: storage(device, "split o", qb, input),
                    dout: storage(device, "split dO", qb, input),
                    lse: storage(device, "split lse", (group * rows * 4) as u64, input),
                    stats: storage(device, "split stats", (group * rows * 8) as u64, input),
                    dq: storage(device, "split dq", qb, output),
                    k: storage(device, "split k", kb, input),
                    v: storage(device, "split v", kb, input),
                    dk: storage(device, "split dk", kb, output),
                    dv: storage(device, "split dv", kb, output),
                };
                // Rows lo..hi of each query head of the group, then of the K/V head.
                let of = |x: &[f32], heads: std::ops::Range<usize>, width: usize| {
                    let mut rows_of = Vec::with_capacity(heads.len() * rows * width);
                    for h in heads {
                        rows_of.extend_from_slice(&x[(h * n + lo) * width..(h * n + hi) * width]);
                    }
                    rows_of
                };
                let heads = kv * group..(kv + 1) * group;
                for (buf, data) in [
                    (&b.q, of(&kept.q, heads.clone(), d)),
                    (&b.o, of(&kept.o, heads.clone(), d)),
                    (&b.dout, of(dout, heads.clone(), d)),
                    (&b.lse, of(&kept.lse, heads.clone(), 1)),
                    (&b.k, of(&kept.k, kv..kv + 1, d)),
                    (&b.v, of(&kept.v, kv..kv + 1, d)),
                ] {
                    queue.write_buffer(buf, 0, bytemuck::cast_slice(&data));
                }
                b
            })
            .collect();
        let res = chunk_resources;
        let mut enc = device.create_command_encoder(&wgpu::CommandEncoderDescriptor {
            label: Some("dense backward (split head)"),
        });
        {
            let mut cpass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
                label: Some("dense backward (split head)"),
                timestamp_writes: None,
            });
            let ctx = &self.ctx;
            for ((params, selects), (&at, c)) in
                uniforms.delta.iter().zip(plan.delta.iter().zip(&chunks))
            {
                let delta = [plan.plans[at].delta];
                record_steps(
                    ctx,
                    &mut cpass,
                    &delta,
                    pipes,
                    Some(selects),
                    &res(params, c, c),
                )?;
            }
            // Each output's pairs in the plan's order: the first writes, the rest add.
            for (steps, params) in [(&plan.dkv, &uniforms.dkv), (&plan.dq, &uniforms.dq)] {
                for (s, params) in steps.iter().zip(params) {
                    let r = res(params, &chunks[s.query], &chunks[s.key]);
                    record_steps(ctx, &mut cpass, &[s.dispatch], pipes, None, &r)?;
                }
            }
        }
        // Per chunk: dQ of the group, dK, dV, in one staging buffer.
        let total: u64 = chunks
            .iter()
            .map(|c| c.dq.size() + c.dk.size() + c.dv.size())
            .sum();
        let staging = device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("dense split gradients readback"),
            size: total,
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        let mut at = 0;
        for c in &chunks {
            for b in [&c.dq, &c.dk, &c.dv] {
                enc.copy_buffer_to_buffer(b, 0, &staging, at, b.size());
                at += b.size();
            }
        }
        queue.submit([enc.finish()]);
        Ok((staging, total))
    }

    /// The gradients of one K/V head from its staging rows ([`DenseAttention::split_kv_head`]):
    /// dQ of its group (group, n, d), dK and dV (n, d).
    fn scatter(&self, plan: &DenseBackwardSplitPlan, rows: &[f32]) -> Gradients<f32> {
        let (n, d, group) = (plan.n, plan.d, plan.group);
        let mut g = Gradients {
            dq: vec![0.0; group * n * d],
            dk: vec![0.0; n * d],
            dv: vec![0.0; n * d],
            weights: None,
            dsinks: None,
        };
        let mut at = 0;
        // Buffers are at least 16 bytes: a chunk's slot is its buffer's size.
        let slot = |elements: usize| (elements * 4).max(16).div_ceil(4);
        for &(lo, hi) in &plan.chunks {
            let len = (hi - lo) * d;
            for h in 0..group {
                let src = &rows[at + h * len..at + (h + 1) * len];
                g.dq[(h * n + lo) * d..(h * n + hi) * d].copy_from_slice(src);
            }
            at += slot(group * len);
            for dst in [&mut g.dk, &mut g.dv] {
                dst[lo * d..hi * d].copy_from_slice(&rows[at..at + len]);
                at += slot(len);
            }
        }
        g
    }
}

/// The bindings of a pair: the query chunk `qc`'s rows of Q, O, dO, the LSE, the stats and dQ,
/// the key chunk `kc`'s of K, V, dK and dV (D's dispatch: a chunk with itself).
fn chunk_resources<'a>(
    params: &'a wgpu::Buffer,
    qc: &'a ChunkBuffers,
    kc: &'a ChunkBuffers,
) -> Resources<'a> {
    Resources::default()
        .with(Role::Params, params)
        .with(Role::Q, &qc.q)
        .with(Role::Out, &qc.o)
        .with(Role::DOut, &qc.dout)
        .with(Role::Lse, &qc.lse)
        .with(Role::Stats, &qc.stats)
        .with(Role::DQ, &qc.dq)
        .with(Role::K, &kc.k)
        .with(Role::V, &kc.v)
        .with(Role::DK, &kc.dk)
        .with(Role::DV, &kc.dv)
}
