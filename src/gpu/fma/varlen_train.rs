//! Training on a variable-length batch (`crate::Sequences`, packed or padded): the forward
//! that keeps what the backward needs, and the backward's plan. The backward itself is
//! [`FmaAttention::backward`]: a [`Saved`] remembers its sequences, and the backward passes
//! read the same sequence table as the forward (every sequence its own FMA, no per-sequence
//! dispatch, no gradient across sequences).

use crate::error::Result;
use crate::gpu::engine::front::resident_over_binding;
use crate::gpu::engine::tensors::{GpuTensors, Output};
use crate::plan::BackwardPlan;
use crate::sequences::Sequences;
use crate::shape::Shape;

use super::backward::Saved;
use super::FmaAttention;

impl FmaAttention {
    /// The plan of the backward of a variable-length batch of `shape` (the tensors' shape, as
    /// [`Sequences::shape`] gives it).
    pub fn backward_plan_sequences(&self, shape: Shape, seqs: &Sequences) -> Result<BackwardPlan> {
        shape.validate()?;
        seqs.check(shape)?;
        super::varlen::host_only(seqs, "the backward")?;
        Ok(BackwardPlan::for_sequences(
            seqs,
            shape.heads,
            shape.kv_heads,
            shape.head_dim,
            &self.cfg,
            &self.limits,
        )?
        .with_storage(self.storage))
    }

    /// [`FmaAttention::forward_varlen_async`] that keeps what the backward needs on the GPU:
    /// returns O and the LSE (padding rows: 0 and -inf) and the [`Saved`] tensors, whose
    /// [`FmaAttention::backward_async`] gives dQ of Q's shape, dK and dV of K's shape (0 on
    /// padding rows) and, in Learned mode, the weight gradients summed over the sequences.
    /// Tensors over one storage binding train a group of sequences at a time (and a sequence
    /// too long for a group alone, split along itself where the backward splits one head;
    /// `backward_groups.rs`): the backward then takes host dO only.
    pub async fn forward_train_varlen_async(
        &self,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        shape: Shape,
        seqs: &Sequences,
    ) -> Result<(Output, Saved)> {
        self.forward_train_in((q, k, v), shape, Some(seqs)).await
    }

    /// [`FmaAttention::saved_from_buffers`] of a forward the caller ran with
    /// [`FmaAttention::forward_varlen_buffers`] on the variable-length batch `seqs`.
    pub fn saved_from_buffers_varlen(
        &self,
        t: GpuTensors<'_>,
        shape: Shape,
        seqs: &Sequences,
    ) -> Result<Saved> {
        // Only host tensors train in groups of sequences: a batch over a binding says so.
        self.backward_plan_sequences(shape, seqs)
            .map_err(resident_over_binding)?;
        Ok(self.saved_buffers(t, shape)?.with_sequences(seqs.clone()))
    }
}
