//! The executor of the FMA backward, fine or coarse queries (algorithm.md §8): a forward that
//! keeps what the backward needs ([`Saved`]: Q, K, V, O and the LSE on the GPU), and a backward
//! that takes dO and records every dispatch of a [`BackwardPlan`] into one command encoder: the
//! coarse keys (and queries) recomputed by the forward's downsample pass, then the backward
//! passes in plan order.
//! FlashAttention-style: probabilities are recomputed from the saved LSE, no score matrix is
//! stored, every gradient is gathered by the invocation that owns it (no float atomics), so
//! two runs give identical bits.

use std::sync::Arc;

use crate::config::Downsample;
use crate::cross;
use crate::error::{FmaError, Result};
use crate::gpu::engine::buffers::{read_f32, sequence_table, storage};
use crate::gpu::engine::cache::Growing;
use crate::gpu::engine::front::{check_host, resident_over_binding};
use crate::gpu::engine::passes::Role;
use crate::gpu::engine::pipelines::poisoned;
use crate::gpu::engine::record::{record_steps, Pipes, Resources};
use crate::gpu::engine::tensors::Output;
use crate::gpu::engine::tensors::{
    check_storage, host_bytes, stored_values, tensor_bytes, widen, GpuTensors, SavedTensors, Scopes,
};
pub use crate::gpu::engine::tensors::{GradTensors, WeightGradTensors};
use crate::gpu::engine::varlen_io::GroupLayout;
use crate::gradients::{Gradients, LevelGradients};
use crate::plan::{BackwardPlan, Dispatch, Pass};
use crate::sequences::Sequences;
use crate::shape::Shape;
use crate::variants::HeadSpan;

use super::workspace::Uniforms;
use super::FmaAttention;

/// What a backward needs from its forward, kept on the GPU: Q, K, V, O of shape
/// (batch, heads, seq, head_dim) and the LSE of shape (batch, heads, seq), tied to the
/// [`FmaAttention`] that ran the forward. Made by [`FmaAttention::forward_train`] or, for
/// tensors the caller keeps on the GPU, by [`FmaAttention::saved_from_buffers`].
#[derive(Clone, Debug)]
pub struct Saved {
    shape: Shape,
    /// The caller's shape when Q was shorter than K and V (`crate::cross`): the saved tensors
    /// are then those of the full-length forward (`shape`), Q padded at the front.
    chunk: Option<Shape>,
    /// The sequences of a variable-length forward (`forward_train_varlen`); `None` for a batch
    /// of equal sequences.
    sequences: Option<Sequences>,
    /// Which of the caller's heads these are: a run of heads' (`backward_runs.rs`) reads its
    /// heads' sinks.
    span: HeadSpan,
    owner: u64,
    pub(super) kept: Kept,
}

/// Where a [`Saved`] forward's tensors are.
#[derive(Clone, Debug)]
pub(super) enum Kept {
    /// All heads in one set of buffers (each within one storage binding).
    Whole(SavedTensors),
    /// Tensors over one binding whose heads fit: runs of heads in head order, each its own
    /// forward with its own buffers (`backward_runs.rs`).
    Runs(Vec<HeadRun>),
    /// One head over a binding: the split forward's tensors on the host, bound chunk by chunk
    /// by the backward (`backward_split.rs`).
    Split(HostKept),
    /// A variable-length batch `seqs` over one binding: groups of its sequences in batch
    /// order, each its own forward (`backward_groups.rs`).
    Groups {
        seqs: Sequences,
        groups: Vec<SeqGroup>,
    },
}

/// One group of sequences of a [`Kept::Groups`]: where its sequences sit in the batch, and its
/// forward saved as a packed batch of them (a group of one sequence as a batch of one, which
/// may itself be saved in runs of heads or split along its sequence).
#[derive(Clone, Debug)]
pub(super) struct SeqGroup {
    pub layout: GroupLayout,
    pub saved: Saved,
}

/// A split-head forward's tensors, kept on the host ([`Kept::Split`], `backward_split.rs`):
/// Q, O (batch, heads, seq, head_dim), K, V (batch, kv_heads, seq, head_dim) and the LSE
/// (batch, heads, seq).
#[derive(Clone, Debug)]
pub(super) struct HostKept {
    pub q: Arc<Vec<f32>>,
    pub k: Arc<Vec<f32>>,
    pub v: Arc<Vec<f32>>,
    pub o: Arc<Vec<f32>>,
    pub lse: Arc<Vec<f32>>,
}

/// One run of heads of a [`Kept::Runs`]: query heads `first .. first + count` of the
/// batch*heads, saved as a forward of their own shape (`Shape::with_heads`).
#[derive(Clone, Debug)]
pub(super) struct HeadRun {
    pub first: usize,
    pub count: usize,
    pub saved: Saved,
}

impl Saved {
    /// A forward of `shape` by the executor `owner`, saved in runs of heads.
    pub(super) fn runs(shape: Shape, owner: u64, kept: Kept) -> Self {
        Self {
            shape,
            chunk: None,
            sequences: None,
            span: HeadSpan::whole(shape),
            owner,
            kept,
        }
    }

    /// The buffers of a forward saved whole; saved in runs of heads ([`Kept::Runs`], host
    /// tensors over one binding), a typed error: only a host backward splits them.
    fn whole(&self) -> Result<&SavedTensors> {
        match &self.kept {
            Kept::Whole(t) => Ok(t),
            Kept::Runs(_) | Kept::Split(_) | Kept::Groups { .. } => Err(FmaError::InvalidConfig {
                what: "the backward into buffers (ResidentGrad)",
                value: format!(
                    "a training forward of {} whose tensors exceed one storage binding, saved \
                     {}",
                    self.shape,
                    match &self.kept {
                        Kept::Runs(runs) => format!("in {} runs of heads", runs.len()),
                        Kept::Groups { groups, .. } => {
                            format!("in {} groups of sequences", groups.len())
                        }
                        _ => "on the host (one head over a binding)".into(),
                    }
                ),
                allowed: "the host backward (HostGrad), which differentiates one run of heads \
                          (or group of sequences) at a time; or tensors that fit one storage \
                          binding each"
                    .into(),
            }),
        }
    }

    /// The same tensors as a variable-length batch's.
    pub(super) fn with_sequences(mut self, seqs: Sequences) -> Self {
        self.sequences = Some(seqs);
        self
    }
}

/// Scratch buffers of the backward, grown by capacity: coarse K~, V~ recomputed by the
/// forward's downsample pass, their gradients dK~, dV~ (bh / kv_group, coarse_rows, d), the
/// LSE and D of every row (bh, n, 2); with coarse queries Q~ recomputed, dQ~ and G
/// (bh, coarse_rows, d) and (R, H) (bh, coarse_rows, 2), 16-byte stand-ins with fine queries
/// (the downsample passes bind them, params.pooled = 2 and params.coarse_queries = 0 leave
/// them unread).
pub(crate) struct BackwardScratch {
    coarse_k: Growing,
    coarse_v: Growing,
    coarse_q: Growing,
    dcoarse_k: Growing,
    dcoarse_v: Growing,
    dcoarse_q: Growing,
    coarse_dout: Growing,
    coarse_stats: Growing,
    stats: Growing,
}

impl Default for BackwardScratch {
    fn default() -> Self {
        let none = wgpu::BufferUsages::empty();
        // dK~ and the stats also carry a variable-length batch's sequence table at their tail.
        let table = wgpu::BufferUsages::COPY_DST;
        Self {
            coarse_k: Growing::new("coarse_k", none),
            coarse_v: Growing::new("coarse_v", none),
            coarse_q: Growing::new("coarse_q", none),
            dcoarse_k: Growing::new("dcoarse_k", table),
            dcoarse_v: Growing::new("dcoarse_v", none),
            dcoarse_q: Growing::new("dcoarse_q", none),
            coarse_dout: Growing::new("coarse_dout (G)", none),
            coarse_stats: Growing::new("coarse_stats (R, H)", none),
            stats: Growing::new("lse and delta", table),
        }
    }
}

impl BackwardScratch {
    /// The scratch roles of a backward of `plan`, sized for it. A variable-length batch's
    /// sequence table is written at element `plan.table_at` of dK~ and of the stats (for the
    /// passes with no binding to spare: dQ and the weight gradients).
    pub(super) fn resources<'a>(
        &'a mut self,
        ctx: &crate::gpu::engine::context::GpuContext,
        plan: &BackwardPlan,
        cap: u64,
    ) -> Resources<'a> {
        let device = &ctx.device;
        // K~, V~ and their gradients: one block per K/V head.
        let coarse = plan.forward.workspace.coarse_kv_bytes;
        let table = plan.forward.sequences.as_ref().map(|t| {
            let at = plan.table_at as u64 * 4;
            (at, at + t.words.len() as u64 * 4, t)
        });
        let with_table = |bytes: u64| table.map_or(bytes, |(_, end, _)| end.max(bytes));
        // The reader chunks' partial sums of the coarse dK~/dV~ pass follow in both.
        let partials = (plan.partials_at + plan.partial_elements) as u64 * 4;
        let dcoarse_k = self
            .dcoarse_k
            .at_least(device, with_table(coarse).max(partials), cap);
        let stats = self
            .stats
            .at_least(device, with_table(plan.stats_bytes), cap);
        // Coarse queries: Q~, dQ~ and G one block per query head, (R, H) two floats per row.
        let ws = &plan.forward.workspace;
        let (query_rows, query_stats) = if plan.coarse_dq.is_empty() {
            (16, 16)
        } else {
            (ws.coarse_bytes, 2 * ws.coarse_lse_bytes)
        };
        // The recomputed K~, V~ (Q~) hold the downsample pass's tap-chunk partial sums after
        // their rows, from `partials_at` (`q_partials_at`) as in dK~ (dQ~).
        let pooled_kv = coarse.max((plan.partials_at as u64 + ws.pool_partials_kv) * 4);
        let pooled_q = if plan.coarse_dq.is_empty() {
            16
        } else {
            query_rows.max((plan.q_partials_at as u64 + ws.pool_partials_q) * 4)
        };
        // dQ~ also holds the query weights' partial sums after its rows.
        let query_grads = query_rows.max((plan.q_partials_at + plan.q_partial_elements) as u64 * 4);
        if let Some((at, _, t)) = table {
            let words: &[u8] = bytemuck::cast_slice(&t.words);
            ctx.queue.write_buffer(dcoarse_k, at, words);
            ctx.queue.write_buffer(stats, at, words);
        }
        Resources::default()
            .with(
                Role::CoarseK,
                self.coarse_k.at_least(device, pooled_kv, cap),
            )
            .with(
                Role::CoarseV,
                self.coarse_v.at_least(device, pooled_kv, cap),
            )
            .with(Role::CoarseQ, self.coarse_q.at_least(device, pooled_q, cap))
            .with(Role::DCoarseK, dcoarse_k)
            .with(
                Role::DCoarseV,
                self.dcoarse_v.at_least(device, coarse.max(partials), cap),
            )
            .with(
                Role::DCoarseQ,
                self.dcoarse_q.at_least(device, query_grads, cap),
            )
            .with(
                Role::CoarseDOut,
                self.coarse_dout.at_least(device, query_rows, cap),
            )
            .with(
                Role::CoarseStats,
                self.coarse_stats.at_least(device, query_stats, cap),
            )
            .with(Role::Stats, stats)
    }
}

impl FmaAttention {
    /// The plan a backward of `shape` would execute.
    pub fn backward_plan(&self, shape: Shape) -> Result<BackwardPlan> {
        self.backward_plan_in(shape, HeadSpan::whole(shape))
    }

    /// The backward plan of `shape` as the heads `span` of the caller's problem (a run of
    /// heads: each problem reads its head's sink).
    pub(super) fn backward_plan_in(&self, shape: Shape, span: HeadSpan) -> Result<BackwardPlan> {
        let mut plan =
            BackwardPlan::new(shape, &self.cfg, &self.limits)?.with_storage(self.storage);
        plan.forward.head_span = span;
        Ok(plan)
    }

    /// Whether the backward of one head of `shape` (one query head, its K/V head) exceeds one
    /// storage binding: then training splits the head along its sequence.
    pub(super) fn one_head_exceeds(&self, shape: Shape) -> bool {
        let one = Shape::cross(1, 1, shape.seq, shape.seq_kv, shape.head_dim);
        matches!(self.backward_plan(one), Err(FmaError::LimitExceeded { .. }))
    }

    /// The plan of the backward of `saved`: of its shape, or of its variable-length batch.
    fn saved_plan(&self, saved: &Saved) -> Result<BackwardPlan> {
        match &saved.sequences {
            None => self.backward_plan_in(saved.shape, saved.span),
            Some(seqs) => self.backward_plan_sequences(saved.shape, seqs),
        }
    }

    /// FMA of host tensors that keeps what the backward needs on the GPU (async). Q, K, V:
    /// (batch, heads, seq, head_dim) f32. Returns O and the LSE (as [`FmaAttention::forward`]
    /// with the LSE) and the [`Saved`] tensors for [`FmaAttention::backward`]. Tensors whose
    /// backward exceeds one storage binding while one head's fits train a run of heads at a
    /// time (`backward_runs.rs`); their backward is then host dO only.
    ///
    /// K and V may be longer than Q with a causal, fine-query 1D configuration, as in
    /// [`FmaAttention::forward_async`] ([`crate::cross`]); the backward then takes dO of Q's
    /// shape and returns dQ of Q's shape.
    pub async fn forward_train_async(
        &self,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        shape: Shape,
    ) -> Result<(Output, Saved)> {
        if !cross::check_fma_cross(shape, &self.cfg)? {
            return self.forward_train_in((q, k, v), shape, None).await;
        }
        shape.validate()?;
        shape.check_len("Q", q.len())?;
        let full = cross::full_shape(shape);
        let q = cross::pad_rows(q, shape);
        let (out, mut saved) = self.forward_train_in((&q, k, v), full, None).await?;
        saved.chunk = Some(shape);
        let out = Output {
            o: cross::last_rows(&out.o, shape, shape.head_dim),
            lse: out.lse.map(|lse| cross::last_rows(&lse, shape, 1)),
        };
        Ok((out, saved))
    }

    /// [`FmaAttention::forward_train_async`] of a batch of equal sequences (`seqs = None`) or
    /// of a variable-length batch.
    pub(super) async fn forward_train_in(
        &self,
        (q, k, v): (&[f32], &[f32], &[f32]),
        shape: Shape,
        seqs: Option<&Sequences>,
    ) -> Result<(Output, Saved)> {
        check_host(shape, q, k, v)?;
        // The backward must be possible before we run a forward.
        match seqs {
            None => match self.backward_plan(shape) {
                // Tensors over one binding: a run of heads at a time, if one head fits.
                // One head over a binding: split along its sequence.
                Err(FmaError::LimitExceeded { .. }) if self.one_head_exceeds(shape) => {
                    return self.forward_train_split((q, k, v), shape).await;
                }
                Err(FmaError::LimitExceeded { .. }) if shape.batch_heads() > 1 => {
                    return self.forward_train_runs((q, k, v), shape).await;
                }
                // (A head over a binding splits above: what is left is not about bindings.)
                other => other?,
            },
            Some(seqs) => match self.backward_plan_sequences(shape, seqs) {
                // A batch over one binding: groups of sequences that fit.
                Err(FmaError::LimitExceeded { .. }) if !seqs.is_cross() => {
                    return self.forward_train_groups((q, k, v), shape, seqs).await;
                }
                other => other?,
            },
        };
        let span = HeadSpan::whole(shape);
        self.forward_train_whole((q, k, v), (shape, span), seqs)
            .await
    }

    /// [`FmaAttention::forward_train_in`] of tensors whose backward fits one binding each.
    pub(super) async fn forward_train_whole(
        &self,
        (q, k, v): (&[f32], &[f32], &[f32]),
        (shape, span): (Shape, HeadSpan),
        seqs: Option<&Sequences>,
    ) -> Result<(Output, Saved)> {
        let tensors = SavedTensors::upload(&self.ctx, shape, (q, k, v), self.storage);
        let t = tensors.tensors();
        match seqs {
            None => self.forward_buffers_in(t, shape, span).await?,
            Some(seqs) => self.forward_varlen_buffers_async(t, shape, seqs).await?,
        }
        let out = tensors.read_outputs(&self.ctx, shape).await?;
        let saved = Saved {
            shape,
            chunk: None,
            sequences: seqs.cloned(),
            span,
            owner: self.id,
            kept: Kept::Whole(tensors),
        };
        Ok((out, saved))
    }

    /// Keeps the tensors of a forward the caller ran with [`FmaAttention::forward_buffers`] on
    /// this instance, for [`FmaAttention::backward_buffers`]. `t.lse` must be the buffer that
    /// forward wrote the LSE into; without it there is nothing to differentiate from
    /// ([`FmaError::NoSavedForward`]). The buffers must not change until the backward is recorded.
    ///
    /// The backward of buffers runs on them whole: tensors over one storage binding are a
    /// typed error here, before the forward runs (host tensors train in runs of heads).
    pub fn saved_from_buffers(&self, t: GpuTensors<'_>, shape: Shape) -> Result<Saved> {
        // Only the binding limit is decided here; other errors keep coming from the backward.
        if let Err(e @ FmaError::LimitExceeded { .. }) = self.backward_plan(shape) {
            return Err(resident_over_binding(e));
        }
        self.saved_buffers(t, shape)
    }

    /// [`FmaAttention::saved_from_buffers`] without its check of the plan (a variable-length
    /// batch checks its own).
    pub(super) fn saved_buffers(&self, t: GpuTensors<'_>, shape: Shape) -> Result<Saved> {
        Ok(Saved {
            shape,
            chunk: None,
            sequences: None,
            span: HeadSpan::whole(shape),
            owner: self.id,
            kept: Kept::Whole(SavedTensors::from_buffers(t, shape, self.storage)?),
        })
    }

    /// Backward of host dO (async): dO of shape (batch, heads, seq, head_dim) = the saved
    /// forward's shape. Returns dQ of Q's shape, dK and dV of K's shape (batch, kv_heads,
    /// seq, head_dim): with grouped-query heads each K/V head's gradient is the sum over its
    /// group of query heads, in head order (deterministic), and, in Learned mode, the gradients of every level
    /// of the configuration's weights summed over batch and heads (levels the sequence does
    /// not use get zeros).
    pub async fn backward_async(&self, saved: &Saved, dout: &[f32]) -> Result<Gradients<f32>> {
        if let Some(chunk) = saved.chunk {
            // dO of the chunk's rows; the padding queries get dO = 0, so no gradient reaches
            // them or, through them, K and V (`crate::cross`).
            chunk.check_len("dO", dout.len())?;
            let mut g = self
                .backward_self(saved, &cross::pad_rows(dout, chunk))
                .await?;
            g.dq = cross::last_rows(&g.dq, chunk, chunk.head_dim);
            return Ok(g);
        }
        self.backward_self(saved, dout).await
    }

    /// [`FmaAttention::backward_async`] of the saved (full-length) shape.
    async fn backward_self(&self, saved: &Saved, dout: &[f32]) -> Result<Gradients<f32>> {
        saved.shape.check_len("dO", dout.len())?;
        match &saved.kept {
            Kept::Whole(_) => self.backward_whole(saved, dout).await,
            Kept::Runs(runs) => self.backward_runs(saved.shape, runs, dout).await,
            Kept::Split(kept) => self.backward_split(saved.shape, kept, dout).await,
            Kept::Groups { seqs, groups } => {
                self.backward_groups(saved.shape, seqs, groups, dout).await
            }
        }
    }

    /// [`FmaAttention::backward_async`] of tensors saved in one set of buffers
    /// ([`Kept::Whole`]).
    pub(super) async fn backward_whole(
        &self,
        saved: &Saved,
        dout: &[f32],
    ) -> Result<Gradients<f32>> {
        let shape = saved.shape;
        let plan = self.saved_plan(saved)?;
        let device = &self.ctx.device;
        // dO, dQ, dK, dV in the executor's storage (f16: dO rounded on upload, the gradients
        // widened on readback); the weights' gradients f32.
        let bytes = tensor_bytes(shape.elements(), self.storage);
        let out = wgpu::BufferUsages::COPY_SRC;
        let dout_buf = storage(device, "dO", bytes, wgpu::BufferUsages::COPY_DST);
        self.ctx
            .queue
            .write_buffer(&dout_buf, 0, &host_bytes(dout, self.storage));
        let kv_bytes = tensor_bytes(shape.kv_elements(), self.storage);
        let (dq, dk, dv) = (
            storage(device, "dq", bytes, out),
            storage(device, "dk", kv_bytes, out),
            storage(device, "dv", kv_bytes, out),
        );
        let learned = matches!(self.cfg.downsample, Downsample::Learned(_));
        let coarse_q = !plan.coarse_dq.is_empty();
        let (we, be) = (
            plan.weight_elements as u64 * 4,
            plan.bias_elements as u64 * 4,
        );
        let wbufs = learned.then(|| {
            [
                storage(device, "dwk", we, out),
                storage(device, "dwv", we, out),
                storage(device, "dbk", be, out),
                storage(device, "dbv", be, out),
            ]
        });
        let qbufs = (learned && coarse_q).then(|| {
            [
                storage(device, "dwq", we, out),
                storage(device, "dbq", be, out),
            ]
        });
        let grads = GradTensors {
            dq: &dq,
            dk: &dk,
            dv: &dv,
            weights: wbufs.as_ref().map(|[wk, wv, bk, bv]| WeightGradTensors {
                wk,
                wv,
                bk,
                bv,
                queries: qbufs.as_ref().map(|[wq, bq]| (wq, bq)),
            }),
        };
        // The saved tensors as a whole-length forward's (a chunk's dO is padded by now).
        let whole = Saved {
            chunk: None,
            ..saved.clone()
        };
        self.backward_buffers_async(&whole, &dout_buf, grads)
            .await?;

        // One staging buffer: dq, dk, dv, then dWK, dWV, dbK, dbV (and dWQ, dbQ).
        let mut parts: Vec<(&wgpu::Buffer, u64)> =
            vec![(&dq, bytes), (&dk, kv_bytes), (&dv, kv_bytes)];
        if let Some([wk, wv, bk, bv]) = &wbufs {
            parts.extend([(wk, we), (wv, we), (bk, be), (bv, be)]);
        }
        if let Some([wq, bq]) = &qbufs {
            parts.extend([(wq, we), (bq, be)]);
        }
        let total: u64 = parts.iter().map(|p| p.1).sum();
        let staging = device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("gradients readback"),
            size: total.max(4),
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        let mut enc = device.create_command_encoder(&wgpu::CommandEncoderDescriptor {
            label: Some("gradients readback"),
        });
        let mut at = 0;
        for &(buf, len) in &parts {
            if len > 0 {
                enc.copy_buffer_to_buffer(buf, 0, &staging, at, len);
            }
            at += len;
        }
        self.ctx.queue.submit([enc.finish()]);
        let all = read_f32(device, &staging, total).await?;
        self.ctx.check_alive()?;
        let (n, n_kv) = (shape.elements(), shape.kv_elements());
        let mut rest = all.as_slice();
        let mut take = |len: usize| {
            let (head, tail) = rest.split_at(len.min(rest.len()));
            rest = tail;
            head.to_vec()
        };
        let words = |b: u64| (b / 4) as usize;
        let (gq, gk, gv) = (
            widen(take(words(bytes)), n, self.storage),
            widen(take(words(kv_bytes)), n_kv, self.storage),
            widen(take(words(kv_bytes)), n_kv, self.storage),
        );
        let weights = match &self.cfg.downsample {
            Downsample::Learned(w) => {
                let (wk, wv) = (take(plan.weight_elements), take(plan.weight_elements));
                let (bk, bv) = (take(plan.bias_elements), take(plan.bias_elements));
                // Fine queries do not use the query weights: their gradients are zeros.
                let (wq, bq) = if coarse_q {
                    (take(plan.weight_elements), take(plan.bias_elements))
                } else {
                    (
                        vec![0.0; plan.weight_elements],
                        vec![0.0; plan.bias_elements],
                    )
                };
                // The used levels from the buffers; the weights' extra levels get zeros.
                let used = plan.split_weight_gradients([&wk, &wv, &wq], [&bk, &bv, &bq]);
                let unused = w.levels[used.len()..]
                    .iter()
                    .map(LevelGradients::zeros_like);
                let levels = used.into_iter().chain(unused).collect();
                Some(levels)
            }
            Downsample::Average => None,
        };
        // dS of the sinks from the saved O and LSE, on the host (as the dense backward).
        let dsinks = match &self.cfg.variants.sinks {
            None => None,
            Some(_) => {
                let out = saved.whole()?.read_outputs(&self.ctx, shape).await?;
                let lse = out.lse.unwrap_or_default();
                let variants = &self.cfg.variants;
                // The dO the kernels saw (f16 storage: rounded).
                let dout = stored_values(dout, self.storage);
                variants.sink_gradient(shape, saved.span, &out.o, &lse, &dout)
            }
        };
        Ok(Gradients {
            dq: gq,
            dk: gk,
            dv: gv,
            weights,
            dsinks,
        })
    }

    /// Backward of dO already on the GPU ((batch, heads, seq, head_dim) f32, `STORAGE`) into
    /// the caller's gradient buffers; records and submits one command buffer and returns
    /// without waiting for the GPU.
    pub async fn backward_buffers_async(
        &self,
        saved: &Saved,
        dout: &wgpu::Buffer,
        g: GradTensors<'_>,
    ) -> Result<()> {
        if saved.owner != self.id {
            return Err(FmaError::NoSavedForward(
                "these tensors were saved by another FmaAttention (whose configuration may differ); \
                 run forward_train on the instance that runs the backward"
                    .into(),
            ));
        }
        if let Some(chunk) = saved.chunk {
            return Err(FmaError::ShapeMismatch {
                what: "the backward of a chunk (Q shorter than K, V) into buffers".into(),
                expected: "host dO through backward / backward_async, which pad it".into(),
                got: format!("{chunk}"),
            });
        }
        let shape = saved.shape;
        let tensors = saved.whole()?;
        let plan = self.saved_plan(saved)?;
        // dO and the gradients have the elements of the storage (issue 29).
        let bytes = shape.elements() as u64 * self.storage.bytes();
        check_storage("dO", dout, bytes, shape)?;
        check_storage("dQ", g.dq, bytes, shape)?;
        let kv_bytes = shape.kv_elements() as u64 * self.storage.bytes();
        check_storage("dK", g.dk, kv_bytes, shape)?;
        check_storage("dV", g.dv, kv_bytes, shape)?;
        let learned = matches!(self.cfg.downsample, Downsample::Learned(_));
        if let Some(w) = &g.weights {
            if !learned {
                return Err(FmaError::InvalidConfig {
                    what: "weight gradients",
                    value: "requested".into(),
                    allowed: "only in Learned mode: Average downsampling has no weights".into(),
                });
            }
            let (we, be) = (
                plan.weight_elements as u64 * 4,
                plan.bias_elements as u64 * 4,
            );
            check_storage("dWK", w.wk, we, shape)?;
            check_storage("dWV", w.wv, we, shape)?;
            check_storage("dbK", w.bk, be, shape)?;
            check_storage("dbV", w.bv, be, shape)?;
            if let Some((wq, bq)) = w.queries {
                check_storage("dWQ", wq, we, shape)?;
                check_storage("dbQ", bq, be, shape)?;
            }
        }
        // The weight passes run only when their gradients are asked for.
        let query_weights = g.weights.is_some_and(|w| w.queries.is_some());
        let steps: Vec<Dispatch> = plan
            .dispatches()
            .into_iter()
            .filter(|d| match d.pass {
                Pass::WeightsBackward | Pass::WeightsBackwardCombine => g.weights.is_some(),
                Pass::WeightsBackwardQ | Pass::WeightsBackwardQCombine => query_weights,
                _ => true,
            })
            .collect();
        let pipes = Pipes::new(&self.ctx, &steps).await?;
        let uniforms = self.backward_uniforms(&plan, &steps)?;
        let table = plan
            .forward
            .sequences
            .as_ref()
            .map(|t| sequence_table(&self.ctx.device, t));
        let scopes = Scopes::push(&self.ctx)?;
        {
            let mut scratch = self.backward_scratch.lock().map_err(poisoned)?;
            let w = &self.weights;
            let mut res = scratch
                .resources(&self.ctx, &plan, self.limits.binding_bytes())
                .with(Role::Params, &uniforms.params)
                .with_saved(tensors)
                .with(Role::DOut, dout)
                .with(Role::Weights, &w.w)
                .with(Role::Biases, &w.b)
                .with(Role::DQ, g.dq)
                .with(Role::DK, g.dk)
                .with(Role::DV, g.dv);
            if let Some(table) = &table {
                res = res.with(Role::SeqTable, table);
            }
            if let Some(gw) = g.weights {
                res = res
                    .with(Role::DWk, gw.wk)
                    .with(Role::DWv, gw.wv)
                    .with(Role::DBk, gw.bk)
                    .with(Role::DBv, gw.bv);
                if let Some((wq, bq)) = gw.queries {
                    res = res.with(Role::DWq, wq).with(Role::DBq, bq);
                }
            }
            let mut enc = self
                .ctx
                .device
                .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                    label: Some("fma backward"),
                });
            {
                let mut cpass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
                    label: Some("fma backward"),
                    timestamp_writes: None,
                });
                record_steps(
                    &self.ctx,
                    &mut cpass,
                    &steps,
                    &pipes,
                    Some(&uniforms.selects),
                    &res,
                )?;
            }
            self.ctx.queue.submit([enc.finish()]);
        }
        scopes.pop(&self.ctx, "the FMA backward").await
    }

    /// The uniforms of a backward of `plan` recording `steps` (with or without the weight
    /// passes): the forward's parameter block and one selector per step.
    /// A variable-length batch's depend on its lengths: made per call, not cached by shape.
    fn backward_uniforms(&self, plan: &BackwardPlan, steps: &[Dispatch]) -> Result<Arc<Uniforms>> {
        if plan.forward.sequences.is_some() {
            let mut params = self.params(&plan.forward);
            params.table_at = plan.table_at as u32;
            params.partials_at = plan.partials_at as u32;
            params.q_partials_at = plan.q_partials_at as u32;
            return Ok(Arc::new(Uniforms::new(&self.ctx, &params, steps)?));
        }
        let key = (plan.forward.shape, plan.forward.head_span, steps.len());
        self.backward_uniforms.get_or_make(key, || {
            let mut params = self.params(&plan.forward);
            params.partials_at = plan.partials_at as u32;
            params.q_partials_at = plan.q_partials_at as u32;
            Uniforms::new(&self.ctx, &params, steps)
        })
    }
}
