//! The executor of a [`CoarseSplit`]: a split head whose coarse rows of all levels exceed one
//! storage binding. The rows live in copy-only stores (per level and coarse tensor, in as many
//! buffers as the adapter's buffer limit needs); every step copies the rows it reads into
//! compact buffers of one binding, runs its dispatches with its levels' row offsets moved onto
//! them, and copies back what it wrote (`plan/split_coarse.rs` says why the shaders need no
//! change and the result is the unsplit one to the bit).

use std::collections::HashMap;

use crate::error::Result;
use crate::gpu::engine::buffers::storage;
use crate::gpu::engine::passes::Role;
use crate::gpu::engine::record::{record_steps, Pipes, Resources};
use crate::gpu::engine::split_io::{copy_rows_out, per_head, SplitIo};
use crate::gpu::engine::tensors::{HostBuffers, Output, Staged};
use crate::plan::{CoarseSplit, CoarseStep, CoarseTensor, Pass, Slice, SplitPlan};
use crate::shape::Shape;

use super::workspace::Uniforms;
use super::FmaAttention;

/// Every coarse tensor, in a fixed order.
const TENSORS: [CoarseTensor; 5] = [
    CoarseTensor::K,
    CoarseTensor::V,
    CoarseTensor::Q,
    CoarseTensor::Out,
    CoarseTensor::Lse,
];

/// The rows of one level of one coarse tensor, in buffers of at most `segment` rows each.
struct Store {
    buffers: Vec<wgpu::Buffer>,
    segment: usize,
    row_bytes: u64,
}

impl Store {
    fn new(device: &wgpu::Device, rows: usize, row_bytes: u64, max_buffer: u64) -> Self {
        let segment = ((max_buffer / row_bytes) as usize).max(1);
        let buffers = (0..rows)
            .step_by(segment)
            .map(|first| {
                device.create_buffer(&wgpu::BufferDescriptor {
                    label: Some("coarse store"),
                    size: ((segment.min(rows - first)) as u64 * row_bytes).max(16),
                    usage: wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST,
                    mapped_at_creation: false,
                })
            })
            .collect();
        Self {
            buffers,
            segment,
            row_bytes,
        }
    }

    /// Copies the rows of `s` between this store and `compact` (row `s.at` there), into the
    /// store when `save`.
    fn copy(&self, enc: &mut wgpu::CommandEncoder, compact: &wgpu::Buffer, s: Slice, save: bool) {
        let mut row = s.first;
        while row < s.first + s.rows {
            let (seg, within) = (row / self.segment, row % self.segment);
            let rows = (self.segment - within).min(s.first + s.rows - row);
            let store_at = within as u64 * self.row_bytes;
            let compact_at = (s.at + row - s.first) as u64 * self.row_bytes;
            let bytes = rows as u64 * self.row_bytes;
            let store = &self.buffers[seg];
            if save {
                enc.copy_buffer_to_buffer(compact, compact_at, store, store_at, bytes);
            } else {
                enc.copy_buffer_to_buffer(store, store_at, compact, compact_at, bytes);
            }
            row += rows;
        }
    }
}

/// The device state of a split head's coarse rows, made once per forward and shared by its
/// heads (their submits run in order): stores, compact buffers, each step's uniforms, and the
/// chunks' token bindings.
pub(super) struct CoarseState {
    stores: HashMap<(CoarseTensor, usize), Store>,
    compact: HashMap<CoarseTensor, wgpu::Buffer>,
    pool: Vec<Uniforms>,
    attend: Vec<Uniforms>,
    /// One per chunk, or one for all (shared tokens).
    tokens: Vec<HostBuffers>,
}

impl CoarseState {
    fn tokens(&self, chunk: usize) -> &HostBuffers {
        &self.tokens[chunk.min(self.tokens.len() - 1)]
    }
}

impl FmaAttention {
    /// [`FmaAttention::forward_split`] of a plan whose coarse rows are split.
    pub(super) async fn forward_split_coarse(
        &self,
        io: SplitIo<'_>,
        shape: Shape,
        plan: &SplitPlan,
        coarse: &CoarseSplit,
    ) -> Result<Output> {
        let pipes = Pipes::new(&self.ctx, &plan.head.steps()).await?;
        let state = self.coarse_state(plan, coarse)?;
        per_head(
            &self.ctx,
            io,
            shape,
            "the FMA forward of a split head (coarse rows split)",
            |h| self.split_head_coarse(plan, coarse, &pipes, &state, io, (shape, h)),
        )
        .await
    }

    fn coarse_state(&self, plan: &SplitPlan, coarse: &CoarseSplit) -> Result<CoarseState> {
        let device = &self.ctx.device;
        let (d, p) = (plan.head.shape.head_dim as u64, plan.head.levels.p);
        let coarse_q = plan.head.merge.is_some();
        let used = |t: CoarseTensor| coarse_q || matches!(t, CoarseTensor::K | CoarseTensor::V);
        let row_bytes = |t: CoarseTensor| if t == CoarseTensor::Lse { 4 } else { 4 * d };
        let rows = coarse
            .pool
            .iter()
            .chain(&coarse.attend)
            .map(CoarseStep::rows)
            .max()
            .unwrap_or(0) as u64;
        // Learned pooling in tap chunks: its partial sums after those rows in K~, V~ (Q~).
        let partial_rows = coarse
            .pool
            .iter()
            .map(CoarseStep::partial_rows)
            .max()
            .unwrap_or(0) as u64;
        let copy = wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST;
        let mut stores = HashMap::new();
        let mut compact = HashMap::new();
        for t in TENSORS {
            // Unused roles (Q~, o~, lse~ with fine queries) get placeholders: the downsample
            // pass binds Q~ but pools only K and V.
            let pooled = matches!(t, CoarseTensor::K | CoarseTensor::V | CoarseTensor::Q);
            let extra = if pooled { partial_rows } else { 0 };
            let bytes = if used(t) {
                (rows + extra) * row_bytes(t)
            } else {
                0
            };
            compact.insert(t, storage(device, "coarse compact", bytes, copy));
            if used(t) {
                for (lvl, lv) in plan.head.levels.levels.iter().enumerate() {
                    let store =
                        Store::new(device, lv.rows(p), row_bytes(t), self.limits.max_buffer);
                    stores.insert((t, lvl), store);
                }
            }
        }
        let uniforms = |steps: &[CoarseStep]| {
            steps
                .iter()
                .map(|s| self.step_uniforms(plan, s, rows as usize))
                .collect::<Result<Vec<_>>>()
        };
        let n = plan.head.shape.seq;
        let bound = if plan.shared_tokens {
            1
        } else {
            plan.chunks.len()
        };
        let tokens = plan.chunks[..bound]
            .iter()
            .map(|c| {
                let rows = Shape::new(1, 1, c.rows.min(n), d as usize);
                HostBuffers::new(device, rows, self.storage)
            })
            .collect();
        Ok(CoarseState {
            stores,
            compact,
            pool: uniforms(&coarse.pool)?,
            attend: uniforms(&coarse.attend)?,
            tokens,
        })
    }

    /// The parameters of `step`: the head's, with its chunk's token binding, its tokens, its
    /// levels' row offsets moved onto the compact buffers and (attention) its grid.
    fn step_uniforms(&self, plan: &SplitPlan, step: &CoarseStep, rows: usize) -> Result<Uniforms> {
        let mut params = self.params(&plan.head);
        // The downsample pass's tap-chunk partial sums follow the compact rows.
        let after = (rows * plan.head.shape.head_dim) as u32;
        (params.partials_at, params.q_partials_at) = (after, after);
        params.row_base = plan.chunks[step.chunk].row_base as u32;
        params.chunk_lo = step.lo as u32;
        params.chunk_hi = step.hi as u32;
        for s in &step.layout {
            params.levels[s.level].row_offset = s.row_offset();
        }
        if let Some(a) = step
            .dispatches
            .iter()
            .find(|d| matches!(d.pass, Pass::FineAttention | Pass::FineTiled))
        {
            params.total_workgroups = a.workgroups;
            params.workgroups_x = a.grid[0];
        }
        Uniforms::new(&self.ctx, &params, &step.dispatches)
    }

    /// Records and submits head `h`: inputs in, every step of `coarse` (copies in, dispatches,
    /// copies out), outputs out.
    fn split_head_coarse(
        &self,
        plan: &SplitPlan,
        coarse: &CoarseSplit,
        pipes: &Pipes,
        state: &CoarseState,
        io: SplitIo<'_>,
        (shape, h): (Shape, usize),
    ) -> Result<Vec<Staged>> {
        let device = &self.ctx.device;
        let (n, d) = (plan.head.shape.seq, plan.head.shape.head_dim);
        let mut enc = device.create_command_encoder(&wgpu::CommandEncoderDescriptor {
            label: Some("fma (coarse rows split)"),
        });
        for (c, t) in plan.chunks.iter().zip(&state.tokens) {
            let tokens = c.row_base..c.row_base + c.rows;
            io.fill(
                &self.ctx.queue,
                &mut enc,
                (shape, h, self.storage),
                tokens,
                [&t.q, &t.k, &t.v],
            );
        }
        let steps = coarse.pool.iter().zip(&state.pool);
        for (step, u) in steps.chain(coarse.attend.iter().zip(&state.attend)) {
            for (t, s) in &step.load {
                state.stores[&(*t, s.level)].copy(&mut enc, &state.compact[t], *s, false);
            }
            {
                let t = state.tokens(step.chunk);
                let c = &state.compact;
                let res = Resources::default()
                    .with(Role::Params, &u.params)
                    .with(Role::Weights, &self.weights.w)
                    .with(Role::Biases, &self.weights.b)
                    .with(Role::CoarseK, &c[&CoarseTensor::K])
                    .with(Role::CoarseV, &c[&CoarseTensor::V])
                    .with(Role::CoarseQ, &c[&CoarseTensor::Q])
                    .with(Role::CoarseOut, &c[&CoarseTensor::Out])
                    .with(Role::CoarseLse, &c[&CoarseTensor::Lse])
                    .tensors(&t.tensors(), &t.lse);
                let mut cpass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
                    label: Some("fma forward (coarse rows split)"),
                    timestamp_writes: None,
                });
                record_steps(
                    &self.ctx,
                    &mut cpass,
                    &step.dispatches,
                    pipes,
                    Some(&u.selects),
                    &res,
                )?;
            }
            for (t, s) in &step.save {
                state.stores[&(*t, s.level)].copy(&mut enc, &state.compact[t], *s, true);
            }
        }

        // Outputs: rows lo..hi of each chunk.
        let mut staged = Vec::new();
        for (i, c) in plan.chunks.iter().enumerate() {
            let t = state.tokens(i);
            let skip = (c.lo - c.row_base) as u64;
            let rows = (c.hi - c.lo) as u64;
            match io {
                SplitIo::Host { want_lse, .. } => {
                    let part = Shape::new(1, 1, c.hi - c.lo, d);
                    let part = Staged::of(device, part, want_lse, self.storage);
                    part.record_from(&mut enc, &t.out, &t.lse, skip);
                    staged.push(part);
                }
                SplitIo::Device(dst) => {
                    let at = ((h * n + c.lo) as u64, skip, rows);
                    copy_rows_out(&mut enc, (&t.out, &t.lse), &dst, at, (d, self.storage));
                }
            }
        }
        self.ctx.queue.submit([enc.finish()]);
        Ok(staged)
    }
}
