//! Training on host tensors over one storage binding whose heads fit: the forward and the
//! backward a run of heads at a time (`engine::front::head_chunks`, as the forward's
//! `forward_host`), each run its own saved forward, and the runs' gradients put together in
//! head order on the host.
//!
//! Runs are whole K/V-head groups whenever one group fits, so each K/V head's dK and dV are
//! summed over its query heads inside one run, by the same passes as an unsplit backward: dQ,
//! dK and dV are then the bits of the unsplit run. A group too large for one binding runs one
//! query head at a time and its K/V head's gradients are the sum of those runs in head order.
//! The learned weights' gradients are sums over every head: each run's sum is added to the
//! previous runs' in run order, in f32 on the host, so the result is the same bits run to run
//! and differs from the unsplit run (one tree of partial sums over all heads) by rounding only.
//!
//! Each run knows which of the caller's heads it holds (`HeadSpan`, in its plans and its
//! `Saved`), so its rows read their own heads' sinks; dS of the sinks is each run's sum
//! (over its rows) added in run order, in f32: rounding from the unsplit sum.

use crate::error::Result;
use crate::gpu::engine::front::{head_chunks, runs_of_heads, RunGradients};
use crate::gpu::engine::tensors::Output;
use crate::gradients::Gradients;
use crate::shape::Shape;
use crate::variants::HeadSpan;

use super::backward::{HeadRun, Kept, Saved};
use super::FmaAttention;

impl FmaAttention {
    /// A training forward of `shape` whose backward does not fit one binding with all heads:
    /// one training forward per run of heads, outputs concatenated in head order.
    pub(super) async fn forward_train_runs(
        &self,
        (q, k, v): (&[f32], &[f32], &[f32]),
        shape: Shape,
    ) -> Result<(Output, Saved)> {
        // One head over a binding trains split along its sequence (`backward_split.rs`), so
        // every head fits here. A run's variants are checked against the caller's heads (the
        // sinks' length).
        let whole = HeadSpan::whole(shape);
        let runs = head_chunks(shape, |s| self.backward_plan_in(s, whole).map(drop))?;
        let train = |q, k, v, s, span| self.forward_train_whole((q, k, v), (s, span), None);
        let (out, runs) = runs_of_heads(shape, &runs, (q, k, v), true, train).await?;
        let kept = runs
            .into_iter()
            .map(|((first, count), saved)| HeadRun {
                first,
                count,
                saved,
            })
            .collect();
        let saved = Saved::runs(shape, self.id, Kept::Runs(kept));
        Ok((out, saved))
    }

    /// The backward of host dO over the runs of a [`Kept::Runs`] forward of `shape`: one
    /// backward per run, gradients put together in head order (module header).
    pub(super) async fn backward_runs(
        &self,
        shape: Shape,
        runs: &[HeadRun],
        dout: &[f32],
    ) -> Result<Gradients<f32>> {
        let per_q = shape.seq * shape.head_dim;
        let mut sum = RunGradients::new(shape);
        for run in runs {
            let r = run.first * per_q..(run.first + run.count) * per_q;
            sum.add(
                (run.first, run.count),
                self.backward_whole(&run.saved, &dout[r]).await?,
            );
        }
        Ok(sum.finish(self.storage))
    }
}
