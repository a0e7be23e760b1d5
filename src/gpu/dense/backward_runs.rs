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
use crate::gpu::engine::front::{add_or_copy, head_chunks, kv_heads_of, one_head_over_binding};
use crate::gpu::engine::tensors::Output;
use crate::gradients::Gradients;
use crate::shape::Shape;
use crate::variants::HeadSpan;

use super::backward::{DenseRun, DenseSaved, WHY_WHOLE_HEAD};
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
        // Even one head over a binding: the error says the backward does not split a head.
        // A run's variants are checked against the caller's heads (the sinks' length).
        let whole = HeadSpan::whole(shape);
        let runs = head_chunks(shape, |s| self.backward_plan_in(s, whole).map(drop))
            .map_err(|e| one_head_over_binding(e, WHY_WHOLE_HEAD))?;
        let (per_q, per_kv) = (shape.seq * shape.head_dim, shape.seq_kv * shape.head_dim);
        let mut o = Vec::with_capacity(shape.elements());
        let mut lse = Vec::with_capacity(shape.rows());
        let mut kept = Vec::with_capacity(runs.len());
        for (first, count) in runs {
            let (kv_first, kv_count) = kv_heads_of(shape, (first, count));
            let qr = first * per_q..(first + count) * per_q;
            let kvr = kv_first * per_kv..(kv_first + kv_count) * per_kv;
            let (out, saved) = self
                .forward_train_whole(
                    (&q[qr], &k[kvr.clone()], &v[kvr]),
                    (shape.with_heads(count), HeadSpan::run(shape, first)),
                    None,
                )
                .await?;
            o.extend_from_slice(&out.o);
            lse.extend(out.lse.into_iter().flatten());
            kept.push(DenseRun {
                first,
                count,
                saved,
            });
        }
        let saved = DenseSaved::runs(shape, self.id, kept);
        Ok((Output { o, lse: Some(lse) }, saved))
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
        let (per_q, per_kv) = (shape.seq * shape.head_dim, shape.seq_kv * shape.head_dim);
        let mut dq = Vec::with_capacity(shape.elements());
        let mut dk = vec![0.0f32; shape.kv_elements()];
        let mut dv = vec![0.0f32; shape.kv_elements()];
        // K/V heads already written by an earlier run (a group split into single heads).
        let mut seen = vec![false; shape.batch * shape.kv_heads];
        // dS of the sinks: each run's (of its own rows, read as its heads' by its span)
        // added in run order, which is head order.
        let mut dsinks: Option<Vec<f32>> = None;
        for run in runs {
            let r = run.first * per_q..(run.first + run.count) * per_q;
            let g = self.backward_whole(&run.saved, &dout[r]).await?;
            dq.extend_from_slice(&g.dq);
            dsinks = match (dsinks, g.dsinks) {
                (Some(mut sum), Some(run)) => {
                    add_or_copy(&mut sum, &run, true);
                    Some(sum)
                }
                (sum, run) => sum.or(run),
            };
            let (kv_first, kv_count) = kv_heads_of(shape, (run.first, run.count));
            for (i, h) in (kv_first..kv_first + kv_count).enumerate() {
                let (src, dst) = (i * per_kv..(i + 1) * per_kv, h * per_kv..(h + 1) * per_kv);
                add_or_copy(&mut dk[dst.clone()], &g.dk[src.clone()], seen[h]);
                add_or_copy(&mut dv[dst], &g.dv[src], seen[h]);
                seen[h] = true;
            }
        }
        Ok(Gradients {
            dq,
            dk,
            dv,
            weights: None,
            dsinks,
        })
    }
}
