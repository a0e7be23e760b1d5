//! Training dense attention on host tensors over one storage binding whose heads fit: the
//! forward and the backward a run of heads at a time (`engine::front::head_chunks`, as the
//! forward's `forward_host` and FMA's `fma/backward_runs.rs`), each run its own saved forward,
//! and the runs' gradients put together in head order on the host.
//!
//! Runs are whole K/V-head groups whenever one group fits, so each K/V head's dK and dV are
//! summed over its query heads inside one run by the same passes as an unsplit backward: dQ,
//! dK and dV are then the bits of the unsplit run (a run's dispatches cover fewer heads, and
//! each head's sums run in the same order). A group too large for one binding runs one query
//! head at a time, and its K/V head's gradients are the sum of those runs in head order (the
//! same terms regrouped: rounding only, and the same bits run to run).
//!
//! Each run knows which of the caller's heads it holds (`HeadSpan`, in its plans and its
//! `DenseSaved`), so its rows read their own heads' sinks; dS of the sinks is each run's sum
//! (over its rows) added in run order, in f32: rounding from the unsplit sum.

use crate::error::Result;
use crate::gpu::engine::front::{head_chunks, runs_of_heads, RunGradients};
use crate::gpu::engine::tensors::Output;
use crate::gradients::Gradients;
use crate::plan::exceeds_binding;
use crate::shape::Shape;
use crate::variants::HeadSpan;

use super::backward::{DenseRun, DenseSaved};
use super::DenseAttention;

impl DenseAttention {
    /// A training forward of `shape` (Q: (batch, heads, seq, head_dim), K, V: (batch,
    /// kv_heads, seq_kv, head_dim)) whose backward does not fit one binding with all heads:
    /// one training forward per run of heads, O (and the LSE, (batch, heads, seq))
    /// concatenated in head order.
    pub(super) async fn forward_train_runs(
        &self,
        (q, k, v): (&[f32], &[f32], &[f32]),
        shape: Shape,
    ) -> Result<(Output, DenseSaved)> {
        // A run's variants are checked against the caller's heads (the sinks' length).
        let whole = HeadSpan::whole(shape);
        let runs = match head_chunks(shape, |s| self.backward_plan_in(s, whole).map(drop)) {
            Ok(runs) => runs,
            // Even one query head over a binding: every head split along its sequence.
            Err(e) if exceeds_binding(&e) => {
                return self.forward_train_split((q, k, v), shape).await;
            }
            Err(e) => return Err(e),
        };
        let train = |q, k, v, s, span| self.forward_train_whole((q, k, v), (s, span), None);
        let (out, runs) = runs_of_heads(shape, &runs, (q, k, v), true, train).await?;
        let kept = runs
            .into_iter()
            .map(|((first, count), saved)| DenseRun {
                first,
                count,
                saved,
            })
            .collect();
        let saved = DenseSaved::runs(shape, self.id, kept);
        Ok((out, saved))
    }

    /// The backward of host dO ((batch, heads, seq, head_dim)) over the runs of a
    /// [`super::backward::DenseKept::Runs`] forward of `shape`: one backward per run, dQ
    /// concatenated, dK and dV ((batch, kv_heads, seq_kv, head_dim)) copied per K/V head, or
    /// added in head order for a group split into single heads (module header).
    pub(super) async fn backward_runs(
        &self,
        shape: Shape,
        runs: &[DenseRun],
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
