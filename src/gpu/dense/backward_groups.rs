//! Training dense attention on a variable-length batch of host tensors over one storage
//! binding: the forward and the backward a group of sequences at a time (`engine::varlen_io`'s
//! `train_in_groups` and `backward_in_groups`, as FMA's `fma/backward_groups.rs`), each group
//! its own saved forward, and the groups' gradients put back in the batch's layout on the host.
//!
//! Groups are the longest runs of sequences, in batch order, whose backward plan fits; a
//! group is packed into tensors of its own and trained as a variable-length batch of its
//! sequences. A sequence whose tensors exceed a binding alone is trained as a batch of one
//! (in runs of heads when one head fits; one head over a binding is a typed error naming the
//! sequence, before any group runs: the dense backward does not split a head).
//!
//! Every sequence attends only to itself, so dQ, dK and dV are those of the unsplit backward
//! up to the rounding of tiles that follow each group's longest sequence; sequences are
//! disjoint, so their gradients are copied, never summed. dS of the sinks is each group's sum
//! added in group order, in f32: the same bits run to run, rounding from the unsplit sum.

use crate::error::Result;
use crate::gpu::engine::front::{head_chunks, one_head_over_binding};
use crate::gpu::engine::tensors::Output;
use crate::gpu::engine::varlen_io::{backward_in_groups, train_in_groups, Group};
use crate::gradients::Gradients;
use crate::sequences::Sequences;
use crate::shape::Shape;
use crate::variants::HeadSpan;

use super::backward::{DenseGroup, DenseSaved, WHY_WHOLE_HEAD};
use super::DenseAttention;

impl DenseAttention {
    /// The training forward of the variable-length batch `seqs` of `shape` whose backward does
    /// not fit one binding: one training forward per group of sequences, O and the LSE put
    /// back in the batch's layout (padding rows: 0 and -inf).
    pub(super) async fn forward_train_groups(
        &self,
        qkv: (&[f32], &[f32], &[f32]),
        shape: Shape,
        seqs: &Sequences,
    ) -> Result<(Output, DenseSaved)> {
        let fits = |s, packed: &Sequences| self.backward_plan_sequences(s, packed).map(drop);
        // A sequence trained alone runs in runs of its heads (the dense backward does not
        // split one head).
        let alone = |one| {
            let whole = HeadSpan::whole(one);
            head_chunks(one, |s| self.backward_plan_in(s, whole).map(drop))
                .map(drop)
                .map_err(|e| one_head_over_binding(e, WHY_WHOLE_HEAD))
        };
        let train = |g: Group| async move {
            if g.layout.seqs.count() == 1 {
                // Boxed: the ordinary training forward is the caller of this one.
                Box::pin(self.forward_train_async(&g.q, &g.k, &g.v, g.one())).await
            } else {
                let span = HeadSpan::whole(g.shape);
                self.forward_train_whole((&g.q, &g.k, &g.v), (g.shape, span), Some(&g.layout.seqs))
                    .await
            }
        };
        let (out, kept) = train_in_groups(qkv, shape, seqs, (fits, alone), train).await?;
        let groups = kept
            .into_iter()
            .map(|(layout, saved)| DenseGroup { layout, saved })
            .collect();
        Ok((out, DenseSaved::groups(shape, self.id, seqs, groups)))
    }

    /// The backward of host dO (the batch `seqs`' layout, Q's shape) over the groups of a
    /// [`super::backward::DenseKept::Groups`] forward of `shape`: one backward per group,
    /// gradients put back in the batch's layout, dS of the sinks added in group order.
    pub(super) async fn backward_groups(
        &self,
        shape: Shape,
        seqs: &Sequences,
        groups: &[DenseGroup],
        dout: &[f32],
    ) -> Result<Gradients<f32>> {
        let groups = groups.iter().map(|g| (&g.layout, &g.saved));
        // Boxed: the ordinary backward is the caller of this one.
        let backward = |saved, dout: Vec<f32>| async move {
            Box::pin(self.backward_async(saved, &dout)).await
        };
        backward_in_groups(shape, seqs, groups, dout, backward).await
    }
}
