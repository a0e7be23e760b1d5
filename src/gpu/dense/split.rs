//! The executor of a [`DenseSplitPlan`]: dense attention of tensors too large for one storage
//! binding, one head at a time, one dispatch per (query chunk, key chunk) pair
//! (`crate::plan::DenseSplitPlan`). Inputs and outputs as for FMA ([`SplitIo`]).

use crate::error::{FmaError, Result};
use crate::gpu::engine::buffers::uniform;
use crate::gpu::engine::params::to_uniform_bytes;
use crate::gpu::engine::record::Pipes;
use crate::gpu::engine::split_io::{
    check_copy_usage, check_split_storage, copy_rows_out, per_head, SplitIo,
};
use crate::gpu::engine::tensors::Output;
use crate::gpu::engine::tensors::{GpuTensors, HostBuffers, Staged};
use crate::plan::DenseSplitPlan;
use crate::shape::Shape;

use super::DenseAttention;

impl DenseAttention {
    /// Dense attention of `shape` through a [`DenseSplitPlan`]: per head, one submit; host
    /// outputs are read back head by head (an empty [`Output`] for [`SplitIo::Device`]).
    pub(super) async fn forward_split(&self, io: SplitIo<'_>, shape: Shape) -> Result<Output> {
        if let SplitIo::Device(t) = &io {
            check_copy_usage(t)?;
        }
        check_split_storage(shape, self.storage)?;
        // A split head's pairs are not planned with the variants (yet).
        self.check_unsplit(shape)?;
        if !shape.is_self() {
            return Err(FmaError::LimitExceeded {
                what: format!("one head of {shape}"),
                requested: shape.seq.max(shape.seq_kv) as u64 * shape.head_dim as u64 * 4,
                max: self.limits.binding_bytes(),
                unit: "bytes in one storage binding",
                advice: "a head is split across bindings only when it has as many keys as \
                         queries: use shorter heads"
                    .into(),
            });
        }
        let plan = DenseSplitPlan::with_kernel(
            shape.seq,
            shape.head_dim,
            self.causal,
            &self.limits,
            (self.max_keys, self.kernel),
        )?
        .with_storage(self.storage);
        let pipes = Pipes::new(&self.ctx, [&plan.head.attention]).await?;
        per_head(
            &self.ctx,
            io,
            shape,
            "the dense forward of a split head",
            |h| self.split_head(&plan, &pipes, io, (shape, h)),
        )
        .await
    }

    /// Records and submits head `h`: inputs in, every pair, outputs out.
    fn split_head(
        &self,
        plan: &DenseSplitPlan,
        pipes: &Pipes,
        io: SplitIo<'_>,
        (shape, h): (Shape, usize),
    ) -> Result<Vec<Staged>> {
        let device = &self.ctx.device;
        let (n, d) = (plan.head.shape.seq, plan.head.shape.head_dim);
        // Per chunk rows lo..hi of Q, K, V, O and the LSE.
        let chunks: Vec<_> = plan
            .chunks
            .iter()
            .map(|&(lo, hi)| HostBuffers::new(device, Shape::new(1, 1, hi - lo, d), self.storage))
            .collect();
        let mut enc = device.create_command_encoder(&wgpu::CommandEncoderDescriptor {
            label: Some("dense"),
        });

        for (&(lo, hi), b) in plan.chunks.iter().zip(&chunks) {
            io.fill(
                &self.ctx.queue,
                &mut enc,
                (shape, h, self.storage),
                lo..hi,
                [&b.q, &b.k, &b.v],
            );
        }

        // One parameter block per pair: its query rows and keys.
        let base = self.params(&plan.head)?;
        let params = plan
            .pairs
            .iter()
            .map(|pair| {
                let (q_lo, q_hi) = plan.chunks[pair.query];
                let mut params = base;
                params.row_base = q_lo as u32;
                params.chunk_lo = q_lo as u32;
                params.chunk_hi = q_hi as u32;
                params.key_base = plan.chunks[pair.key].0 as u32;
                params.key_lo = pair.keys.0 as u32;
                params.key_hi = pair.keys.1 as u32;
                params.tiles_per_block = pair.tiles;
                params.total_workgroups = pair.dispatch.workgroups;
                params.workgroups_x = pair.dispatch.grid[0];
                let bytes = to_uniform_bytes(&params)?;
                Ok(uniform(
                    device,
                    &self.ctx.queue,
                    "dense chunk params",
                    &bytes,
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        // The f32 partial O under f16 storage: one query chunk's rows (its pairs run in a
        // row, so the chunks share it), as large as the largest chunk.
        let rows = plan
            .chunks
            .iter()
            .map(|&(lo, hi)| hi - lo)
            .max()
            .unwrap_or(0);
        let partial = self.partial_scratch(plan.pairs.len(), rows * d);
        {
            let mut cpass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
                label: Some("dense forward (split head)"),
                timestamp_writes: None,
            });
            for (pair, params) in plan.pairs.iter().zip(&params) {
                let (qc, kc) = (&chunks[pair.query], &chunks[pair.key]);
                let t = GpuTensors {
                    q: &qc.q,
                    k: &kc.k,
                    v: &kc.v,
                    out: &qc.out,
                    lse: None,
                };
                let steps = [pair.dispatch];
                self.record(
                    &mut cpass,
                    &steps,
                    pipes,
                    params,
                    &t,
                    &qc.lse,
                    partial.as_ref(),
                )?;
            }
        }

        let mut staged = Vec::new();
        for (&(lo, hi), b) in plan.chunks.iter().zip(&chunks) {
            match io {
                SplitIo::Host { want_lse, .. } => {
                    let part =
                        Staged::of(device, Shape::new(1, 1, hi - lo, d), want_lse, self.storage);
                    part.record(&mut enc, &b.out, &b.lse);
                    staged.push(part);
                }
                SplitIo::Device(t) => {
                    let (first, rows) = ((h * n + lo) as u64, (hi - lo) as u64);
                    let at = (first, 0, rows);
                    copy_rows_out(&mut enc, (&b.out, &b.lse), &t, at, (d, self.storage));
                }
            }
        }
        self.ctx.queue.submit([enc.finish()]);
        Ok(staged)
    }
}
