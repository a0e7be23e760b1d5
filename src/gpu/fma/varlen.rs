//! FMA of a variable-length batch (`crate::Sequences`, packed or padded): the forward's passes
//! with the sequence table bound, one submit, every sequence its own FMA.

use crate::cross;
use crate::error::{FmaError, Result};
use crate::gpu::engine::front::{check_host, run_host};
use crate::gpu::engine::record::Pipes;
use crate::gpu::engine::tensors::{GpuTensors, Output, Scopes};
use crate::gpu::engine::varlen_io::varlen_in_groups;
use crate::levels::Levels;
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
        if cross::check_fma_cross_varlen(seqs, &self.cfg)? {
            // Each sequence's queries as the last of its keys' positions (`crate::cross`).
            let full = cross::full_sequences(seqs)?;
            let full_shape = full.shape(shape.heads, shape.kv_heads, shape.head_dim);
            return self.plan_sequences(full_shape, &full);
        }
        self.check_variants(shape.heads)?;
        Ok(FmaPlan::for_sequences_with(
            seqs,
            (shape.heads, shape.kv_heads, shape.head_dim),
            &self.cfg,
            &self.limits,
            self.fine_kernel(),
        )?
        .with_storage(self.storage))
    }

    /// FMA of a variable-length batch of host tensors (async; works on the web). Packed
    /// ([`Sequences::packed`]): Q of shape `(1, heads, total, head_dim)`, K, V `(1, kv_heads,
    /// total, head_dim)`, the sequences one after another; padded ([`Sequences::padded`]):
    /// `(batch, heads, n, head_dim)` with one length per row. Every sequence is its own FMA (its
    /// own levels, windows and partial last window), no token attends across sequences, and
    /// the work is its tokens' (no padding to the longest). Packed sequences whose keys have
    /// lengths of their own ([`Sequences::packed_cross`]; causal fine queries, at least as many
    /// keys as queries) run as [`crate::cross`] says. Returns O of Q's shape and, if
    /// `want_lse`, the LSE `(batch, heads, n)`; padding rows hold O = 0 and LSE = -inf.
    ///
    /// Tensors over one storage binding run in groups of sequences that fit, and a sequence
    /// too long alone is split along its sequence as [`FmaAttention::forward_async`] does (the
    /// result equals the unsplit run to float rounding). Training:
    /// [`FmaAttention::forward_train_varlen`] and [`FmaAttention::backward`] (over a binding,
    /// in groups of sequences too).
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
        if cross::check_fma_cross_varlen(seqs, &self.cfg)? {
            seqs.check(shape)?;
            let full = cross::full_sequences(seqs)?;
            let full_shape = full.shape(shape.heads, shape.kv_heads, shape.head_dim);
            let q = cross::pad_rows_varlen(q, seqs, shape.heads, shape.head_dim);
            let out = self
                .forward_varlen_self(&q, k, v, full_shape, &full, want_lse)
                .await?;
            return Ok(Output {
                o: cross::last_rows_varlen(&out.o, seqs, shape.heads, shape.head_dim),
                lse: out
                    .lse
                    .map(|lse| cross::last_rows_varlen(&lse, seqs, shape.heads, 1)),
            });
        }
        self.forward_varlen_self(q, k, v, shape, seqs, want_lse)
            .await
    }

    /// [`FmaAttention::forward_varlen_async`] of sequences whose keys are their queries.
    async fn forward_varlen_self(
        &self,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        shape: Shape,
        seqs: &Sequences,
        want_lse: bool,
    ) -> Result<Output> {
        match self.plan_sequences(shape, seqs) {
            Err(FmaError::LimitExceeded { .. }) => {
                self.forward_varlen_groups((q, k, v), shape, seqs, want_lse)
                    .await
            }
            Err(e) => Err(e),
            Ok(_) => {
                self.forward_varlen_whole((q, k, v), shape, seqs, want_lse)
                    .await
            }
        }
    }

    /// One run of a batch whose tensors fit one binding each (else the plan's error).
    async fn forward_varlen_whole(
        &self,
        (q, k, v): (&[f32], &[f32], &[f32]),
        shape: Shape,
        seqs: &Sequences,
        want_lse: bool,
    ) -> Result<Output> {
        let plan = self.plan_sequences(shape, seqs)?;
        let pipes = Pipes::new(&self.ctx, &plan.steps()).await?;
        run_host(
            &self.ctx,
            &self.host,
            (self.limits.binding_bytes(), self.storage),
            shape,
            (q, k, v),
            want_lse,
            "the FMA forward of a variable-length batch",
            |enc, t, lse| self.record(enc, &plan, &pipes, t, lse),
        )
        .await
    }

    /// A batch whose tensors exceed one binding: its sequences in packed groups that fit, and
    /// a sequence too long alone through [`FmaAttention::forward_async`], which splits it
    /// along its sequence (`engine::varlen_io`). Every sequence is computed as if alone, so
    /// the result is the unsplit one up to the float rounding of tiles that follow each
    /// group's longest sequence.
    async fn forward_varlen_groups(
        &self,
        qkv: (&[f32], &[f32], &[f32]),
        shape: Shape,
        seqs: &Sequences,
        want_lse: bool,
    ) -> Result<Output> {
        let (h, kvh, d) = (shape.heads, shape.kv_heads, shape.head_dim);
        let levels = Levels::new(seqs.max_len().max(1), self.cfg.block, self.cfg.rank);
        // The largest tensor of a packed run: Q, O or the coarse rows of its query heads
        // (counted with the batch's levels, at least the run's own).
        let bytes_of = |lens: &[usize]| -> u64 {
            let tokens: usize = lens.iter().sum();
            let rows: usize = lens
                .iter()
                .map(|&n| {
                    let lv = &levels.levels;
                    lv.iter()
                        .map(|l| n.div_ceil(l.window) * levels.p)
                        .sum::<usize>()
                })
                .sum();
            (h * tokens.max(rows) * d) as u64 * 4
        };
        let cap = self.limits.binding_bytes();
        varlen_in_groups(
            qkv,
            shape,
            seqs,
            want_lse,
            (cap, &bytes_of),
            |g| async move {
                if g.layout.seqs.count() == 1 {
                    let one = Shape::new(1, h, g.layout.seqs.total(), d).with_kv_heads(kvh);
                    self.forward_async(&g.q, &g.k, &g.v, one, want_lse).await
                } else {
                    self.forward_varlen_whole((&g.q, &g.k, &g.v), g.shape, &g.layout.seqs, want_lse)
                        .await
                }
            },
        )
        .await
    }

    /// [`FmaAttention::forward_varlen_async`] of tensors already on the GPU: O (and the LSE,
    /// when `t.lse` is given) stay there. Records and submits one command buffer.
    pub async fn forward_varlen_buffers_async(
        &self,
        t: GpuTensors<'_>,
        shape: Shape,
        seqs: &Sequences,
    ) -> Result<()> {
        t.check_as(shape, self.storage)?;
        host_only(seqs, "a forward of buffers")?;
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
}

/// Sequences whose keys have lengths of their own run through host tensors only (their queries
/// are padded on the host, `crate::cross`): a typed error for `what` otherwise.
pub(super) fn host_only(seqs: &Sequences, what: &str) -> Result<()> {
    if !seqs.is_cross() {
        return Ok(());
    }
    Err(FmaError::ShapeMismatch {
        what: format!("FMA sequences with key lengths of their own in {what}"),
        expected: "host tensors through forward_varlen, or key lengths equal to the query \
                   lengths"
            .into(),
        got: format!("queries {:?}, keys {:?}", seqs.lengths, seqs.kv_lens()),
    })
}
