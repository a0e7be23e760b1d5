//! Training a variable-length batch of host tensors over one storage binding: the forward and
//! the backward a group of sequences at a time (`engine::varlen_io`'s `train_in_groups` and
//! `backward_in_groups`, shared with dense attention's `dense/backward_groups.rs`), each group
//! its own saved forward, and the groups' gradients put back in the batch's layout on the host.
//!
//! Groups are the longest runs of sequences, in batch order, whose backward plan fits
//! (`groups_that_fit`); a group is packed into tensors of its own and trained as a
//! variable-length batch of its sequences. A sequence whose tensors exceed a binding alone is
//! trained as a batch of one through the ordinary path (runs of heads, or split along its
//! sequence: `backward_split.rs`, with that path's limits: a typed error naming the sequence
//! otherwise, before any group runs).
//!
//! Every sequence is its own FMA whichever group holds it, so dQ, dK and dV are those of the
//! unsplit backward up to the float rounding of plans that follow each group's longest
//! sequence (as the forward's groups, `fma/varlen.rs`); sequences are disjoint, so they are
//! copied, never summed. The sums over sequences (the learned weights' gradients, dS of the
//! sinks) are each group's sum added in group order, in f32 on the host: the same bits run to
//! run, and rounding from the unsplit run's one tree of partial sums.

use crate::error::Result;
use crate::gpu::engine::front::head_chunks;
use crate::gpu::engine::tensors::Output;
use crate::gpu::engine::varlen_io::{backward_in_groups, train_in_groups, Group};
use crate::gradients::Gradients;
use crate::plan::BackwardSplitPlan;
use crate::sequences::Sequences;
use crate::shape::Shape;
use crate::variants::HeadSpan;

use super::backward::{Kept, Saved, SeqGroup};
use super::FmaAttention;

impl FmaAttention {
    /// The training forward of the variable-length batch `seqs` of `shape` whose backward does
    /// not fit one binding: one training forward per group of sequences, O and the LSE put
    /// back in the batch's layout (padding rows: 0 and -inf).
    pub(super) async fn forward_train_groups(
        &self,
        qkv: (&[f32], &[f32], &[f32]),
        shape: Shape,
        seqs: &Sequences,
    ) -> Result<(Output, Saved)> {
        let fits = |s, packed: &Sequences| self.backward_plan_sequences(s, packed).map(drop);
        let alone = |one| self.check_train_alone(one);
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
            .map(|(layout, saved)| SeqGroup { layout, saved })
            .collect();
        let kept = Kept::Groups {
            seqs: seqs.clone(),
            groups,
        };
        let saved = Saved::runs(shape, self.id, kept).with_sequences(seqs.clone());
        Ok((out, saved))
    }

    /// What the training forward of one sequence of `shape` (a batch of one) checks before it
    /// runs: its forward, and a backward of the whole, of runs of heads or split along the
    /// sequence, whichever `forward_train_in` takes.
    fn check_train_alone(&self, shape: Shape) -> Result<()> {
        use crate::error::FmaError::LimitExceeded;
        self.check(shape)?;
        match self.backward_plan(shape) {
            Err(LimitExceeded { .. }) if self.one_head_exceeds(shape) => {
                BackwardSplitPlan::new(shape.seq, shape.head_dim, &self.cfg, &self.limits).map(drop)
            }
            Err(LimitExceeded { .. }) if shape.batch_heads() > 1 => {
                let whole = HeadSpan::whole(shape);
                head_chunks(shape, |s| self.backward_plan_in(s, whole).map(drop)).map(drop)
            }
            other => other.map(drop),
        }
    }

    /// The backward of host dO (the batch `seqs`' layout, Q's shape) over the groups of a
    /// [`Kept::Groups`] forward of `shape`: one backward per group, gradients put back in the
    /// batch's layout and sums added in group order (module header).
    pub(super) async fn backward_groups(
        &self,
        shape: Shape,
        seqs: &Sequences,
        groups: &[SeqGroup],
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
