//! The backward of exact dense attention (FlashAttention-2's structure, `plan::DenseBackwardPlan`):
//! a forward that keeps what the backward needs ([`DenseSaved`]: Q, K, V, O and the LSE on the
//! GPU), and a backward that takes dO and records D = rowsum(dO * O), dK/dV per key tile (query
//! chunks in order) and dQ per query tile (key chunks in order) into one command encoder. The
//! same calls as `FmaAttention`'s (`forward_train`, `saved_from_buffers`, `backward`,
//! `backward_buffers`), so callers treat both alike. Probabilities are recomputed from the saved
//! LSE; every gradient is summed by the invocation that owns it in a fixed order (no float
//! atomics), so two runs give identical bits.

use crate::error::{FmaError, Result};
use crate::gpu::engine::buffers::{read_f32, sequence_table, storage, uniform};
use crate::gpu::engine::front::{check_host, resident_over_binding};
use crate::gpu::engine::params::{to_uniform_bytes, Params};
use crate::gpu::engine::passes::Role;
use crate::gpu::engine::pipelines::poisoned;
use crate::gpu::engine::record::{record_steps, Pipes, Resources, Selects};
use crate::gpu::engine::tensors::{
    check_storage, host_bytes, stored_values, tensor_bytes, widen, GpuTensors, GradTensors, Output,
    SavedTensors, Scopes,
};
use crate::gpu::engine::varlen_io::GroupLayout;
use crate::gradients::Gradients;
use crate::plan::{DenseBackwardPlan, Dispatch, SoftmaxFlags};
use crate::sequences::Sequences;
use crate::shape::Shape;
use crate::storage::Storage;
use crate::variants::HeadSpan;

use super::DenseAttention;

/// What a dense backward needs from its forward, kept on the GPU: Q and O of shape (batch,
/// heads, seq, head_dim), K and V of (batch, kv_heads, seq_kv, head_dim), the LSE of (batch,
/// heads, seq), tied to the [`DenseAttention`] that ran the forward (its causal flag). Made by
/// [`DenseAttention::forward_train`] or, for tensors the caller keeps on the GPU, by
/// [`DenseAttention::saved_from_buffers`].
#[derive(Clone, Debug)]
pub struct DenseSaved {
    shape: Shape,
    /// The sequences of a variable-length forward; `None` for a batch of equal sequences.
    sequences: Option<Sequences>,
    /// Which of the caller's heads these are: a run of heads' (`backward_runs.rs`) reads its
    /// heads' sinks.
    span: HeadSpan,
    owner: u64,
    kept: DenseKept,
}

/// A split head's training forward, kept on the host: Q, O of (batch, heads, seq, head_dim),
/// K, V of (batch, kv_heads, seq, head_dim), the LSE of (batch, heads, seq).
#[derive(Clone, Debug)]
pub(super) struct DenseHostKept {
    pub q: std::sync::Arc<Vec<f32>>,
    pub k: std::sync::Arc<Vec<f32>>,
    pub v: std::sync::Arc<Vec<f32>>,
    pub o: std::sync::Arc<Vec<f32>>,
    pub lse: std::sync::Arc<Vec<f32>>,
}

/// Where a [`DenseSaved`] forward's tensors are.
#[derive(Clone, Debug)]
pub(super) enum DenseKept {
    /// All heads in one set of buffers (each within one storage binding).
    Whole(SavedTensors),
    /// Host tensors over one binding whose heads fit: runs of heads in head order, each its
    /// own forward with its own buffers (`backward_runs.rs`).
    Runs(Vec<DenseRun>),
    /// A variable-length batch `seqs` over one binding: groups of its sequences in batch
    /// order, each its own forward (`backward_groups.rs`).
    Groups {
        seqs: Sequences,
        groups: Vec<DenseGroup>,
    },
    /// Host tensors whose single head exceeds one binding: the split forward's inputs and
    /// outputs on the host, differentiated K/V head by K/V head in chunks
    /// (`backward_split.rs`).
    Split(DenseHostKept),
}

/// One group of sequences of a [`DenseKept::Groups`]: where its sequences sit in the batch,
/// and its forward saved as a packed batch of them (a group of one sequence as a batch of one,
/// which may itself be saved in runs of heads).
#[derive(Clone, Debug)]
pub(super) struct DenseGroup {
    pub layout: GroupLayout,
    pub saved: DenseSaved,
}

/// One run of heads of a [`DenseKept::Runs`]: query heads `first .. first + count` of the
/// batch*heads, saved as a forward of their own shape (`Shape::with_heads`).
#[derive(Clone, Debug)]
pub(super) struct DenseRun {
    pub first: usize,
    pub count: usize,
    pub saved: DenseSaved,
}

impl DenseSaved {
    /// A forward of `shape` by the executor `owner`, saved in runs of heads.
    pub(super) fn runs(shape: Shape, owner: u64, runs: Vec<DenseRun>) -> Self {
        Self {
            shape,
            sequences: None,
            span: HeadSpan::whole(shape),
            owner,
            kept: DenseKept::Runs(runs),
        }
    }

    /// A forward of the variable-length batch `seqs` of `shape` by the executor `owner`, saved
    /// in groups of sequences.
    pub(super) fn groups(
        shape: Shape,
        owner: u64,
        seqs: &Sequences,
        groups: Vec<DenseGroup>,
    ) -> Self {
        Self {
            shape,
            sequences: Some(seqs.clone()),
            span: HeadSpan::whole(shape),
            owner,
            kept: DenseKept::Groups {
                seqs: seqs.clone(),
                groups,
            },
        }
    }

    /// A forward of `shape` by the executor `owner` whose single head exceeds one binding,
    /// kept on the host.
    pub(super) fn split(shape: Shape, owner: u64, kept: DenseHostKept) -> Self {
        Self {
            shape,
            sequences: None,
            span: HeadSpan::whole(shape),
            owner,
            kept: DenseKept::Split(kept),
        }
    }

    /// Refuses tensors saved by another executor than `id` (whose causal flag may differ).
    pub(super) fn check_owner(&self, id: u64) -> Result<()> {
        if self.owner == id {
            return Ok(());
        }
        Err(FmaError::NoSavedForward(
            "these tensors were saved by another DenseAttention (whose causal flag may \
             differ); run forward_train on the instance that runs the backward"
                .into(),
        ))
    }

    /// The buffers of a forward saved whole; saved in runs of heads or groups of sequences
    /// ([`DenseKept::Runs`], [`DenseKept::Groups`]: host tensors over one binding), a typed
    /// error: only a host backward takes them.
    fn whole(&self) -> Result<&SavedTensors> {
        let pieces = match &self.kept {
            DenseKept::Whole(t) => return Ok(t),
            DenseKept::Runs(runs) => format!("{} runs of heads", runs.len()),
            DenseKept::Groups { groups, .. } => format!("{} groups of sequences", groups.len()),
            DenseKept::Split(_) => "chunks of one head, on the host".into(),
        };
        Err(FmaError::InvalidConfig {
            what: "the dense backward into buffers (ResidentGrad)",
            value: format!(
                "a training forward of {} whose tensors exceed one storage binding, saved in \
                 {pieces}",
                self.shape,
            ),
            allowed: "the host backward (HostGrad), which differentiates one run of heads (or \
                      group of sequences, or chunks of one head) at a time; or tensors that fit \
                      one storage binding each"
                .into(),
        })
    }
}

/// Why the dense backward of a variable-length batch does not split one sequence's head (its
/// error says it; a batch of equal sequences splits one: `backward_split.rs`).
pub(super) const WHY_WHOLE_HEAD: &str = "a sequence of a variable-length batch is differentiated \
     whole; the split backward of one head takes batches of equal sequences";

/// The parameter blocks of one backward shape: D's (with its level selector), one per query
/// chunk of the dK/dV pass and one per key chunk of the dQ pass; a padded variable-length
/// batch's padding pass uses D's block with its own selector.
pub(super) struct BackwardUniforms {
    delta: wgpu::Buffer,
    selects: Selects,
    dkv: Vec<wgpu::Buffer>,
    dq: Vec<wgpu::Buffer>,
    pad: Option<Selects>,
}

impl DenseAttention {
    /// The plan a backward of `shape` would execute. Causal with fewer keys than queries is
    /// planned (its first seq - seq_kv rows take no gradient) even where the forward refuses it.
    pub fn backward_plan(&self, shape: Shape) -> Result<DenseBackwardPlan> {
        self.backward_plan_in(shape, HeadSpan::whole(shape))
    }

    /// The backward plan of `shape` as the heads `span` of the caller's problem (a run of
    /// heads: the variants are checked against the caller's heads, and each problem reads
    /// its head's sink).
    pub(super) fn backward_plan_in(
        &self,
        shape: Shape,
        span: HeadSpan,
    ) -> Result<DenseBackwardPlan> {
        self.variants.validate(span.heads, self.causal)?;
        let mut plan = DenseBackwardPlan::new(shape, &self.limits)?
            .with_softmax(SoftmaxFlags::of(&self.variants))
            .with_storage(self.storage);
        plan.forward.head_span = span;
        Ok(plan)
    }

    /// The plan of the backward of a variable-length batch of `shape` (the tensors' shape, as
    /// [`Sequences::shape`] gives it).
    pub fn backward_plan_sequences(
        &self,
        shape: Shape,
        seqs: &Sequences,
    ) -> Result<DenseBackwardPlan> {
        shape.validate()?;
        seqs.check(shape)?;
        self.variants.validate(shape.heads, self.causal)?;
        Ok(DenseBackwardPlan::for_sequences(
            seqs,
            shape.heads,
            shape.kv_heads,
            shape.head_dim,
            &self.limits,
        )?
        .with_softmax(SoftmaxFlags::of(&self.variants))
        .with_storage(self.storage))
    }

    /// The plan of the backward of `saved`: of its shape, or of its variable-length batch.
    fn saved_plan(&self, saved: &DenseSaved) -> Result<DenseBackwardPlan> {
        match &saved.sequences {
            None => self.backward_plan_in(saved.shape, saved.span),
            Some(seqs) => self.backward_plan_sequences(saved.shape, seqs),
        }
    }

    /// The query chunks of the dK/dV dispatches and the key chunks of the dQ dispatches.
    fn backward_chunks(&self, plan: &DenseBackwardPlan) -> [Vec<(usize, usize)>; 2] {
        [
            plan.query_chunks(self.max_keys.unwrap_or_else(|| plan.queries_per_dispatch())),
            plan.key_chunks(self.max_keys.unwrap_or_else(|| plan.keys_per_dispatch())),
        ]
    }

    /// The uniforms of `plan`, made once per shape (a variable-length batch's depend on its
    /// lengths: made per call).
    fn backward_uniforms(
        &self,
        plan: &DenseBackwardPlan,
    ) -> Result<std::sync::Arc<BackwardUniforms>> {
        if plan.forward.sequences.is_some() {
            return Ok(std::sync::Arc::new(self.make_backward_uniforms(plan)?));
        }
        self.backward_uniforms
            .get_or_make((plan.forward.shape, plan.forward.head_span), || {
                self.make_backward_uniforms(plan)
            })
    }

    fn make_backward_uniforms(&self, plan: &DenseBackwardPlan) -> Result<BackwardUniforms> {
        {
            let base = self.params(&plan.forward)?;
            let make = |p: Params, label: &str| -> Result<wgpu::Buffer> {
                Ok(uniform(
                    &self.ctx.device,
                    &self.ctx.queue,
                    label,
                    &to_uniform_bytes(&p)?,
                ))
            };
            let per = |d: &Dispatch, tiles: u32| {
                let mut p = base;
                p.tiles_per_block = tiles;
                p.total_workgroups = d.workgroups;
                p.workgroups_x = d.grid[0];
                p
            };
            let [queries, keys] = self.backward_chunks(plan);
            // The f16 variants keep their f32 partial sums while queries (dK, dV) or keys (dQ)
            // remain: `params.n` and `params.n_kv` are where the last part ends (a
            // variable-length batch's problems read their lengths from the sequence table, so
            // its longest sequence's lengths there change no result).
            let seqs = plan.forward.sequences.as_ref();
            let dkv = queries
                .into_iter()
                .map(|(lo, hi)| {
                    let mut p = per(&plan.dkv, plan.key_tiles);
                    (p.chunk_lo, p.chunk_hi) = (lo as u32, hi as u32);
                    if let Some(t) = seqs {
                        p.n = t.max_len as u32;
                    }
                    make(p, "dense dkv params")
                })
                .collect::<Result<_>>()?;
            let dq = keys
                .into_iter()
                .map(|(lo, hi)| {
                    let mut p = per(&plan.dq, plan.query_tiles);
                    (p.key_lo, p.key_hi) = (lo as u32, hi as u32);
                    if let Some(t) = seqs {
                        p.n_kv = t.max_kv_len as u32;
                    }
                    make(p, "dense dq params")
                })
                .collect::<Result<_>>()?;
            Ok(BackwardUniforms {
                delta: make(base, "dense delta params")?,
                selects: Selects::new(&self.ctx, &[plan.delta])?,
                dkv,
                dq,
                pad: plan
                    .pad
                    .map(|pad| Selects::new(&self.ctx, &[pad]))
                    .transpose()?,
            })
        }
    }

    /// Dense attention of host tensors that keeps what the backward needs on the GPU (async).
    /// Q: (batch, heads, seq, head_dim), K, V: (batch, kv_heads, seq_kv, head_dim), f32.
    /// Returns O and the LSE (as [`DenseAttention::forward`] with the LSE) and the
    /// [`DenseSaved`] tensors for [`DenseAttention::backward`].
    pub async fn forward_train_async(
        &self,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        shape: Shape,
    ) -> Result<(Output, DenseSaved)> {
        self.forward_train_in((q, k, v), shape, None).await
    }

    /// [`DenseAttention::forward_varlen_async`] that keeps what the backward needs on the GPU:
    /// returns O and the LSE (padding rows: 0 and -inf) and the [`DenseSaved`] tensors, whose
    /// [`DenseAttention::backward_async`] gives dQ of Q's shape, dK and dV of K's shape (0 on
    /// padding rows). Tensors over one storage binding train a group of sequences at a time
    /// (`backward_groups.rs`; a sequence whose one head exceeds a binding is a typed error),
    /// and the backward then takes host dO only.
    pub async fn forward_train_varlen_async(
        &self,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        shape: Shape,
        seqs: &Sequences,
    ) -> Result<(Output, DenseSaved)> {
        self.forward_train_in((q, k, v), shape, Some(seqs)).await
    }

    /// The training forward of a batch of equal sequences (`seqs = None`) or of a
    /// variable-length batch.
    async fn forward_train_in(
        &self,
        (q, k, v): (&[f32], &[f32], &[f32]),
        shape: Shape,
        seqs: Option<&Sequences>,
    ) -> Result<(Output, DenseSaved)> {
        check_host(shape, q, k, v)?;
        // The backward must be possible before we run a forward.
        match seqs {
            None => match self.backward_plan(shape) {
                // Tensors over one binding: a run of heads at a time, if one head fits.
                Err(FmaError::LimitExceeded { .. }) if shape.batch_heads() > 1 => {
                    return self.forward_train_runs((q, k, v), shape).await;
                }
                // One head over a binding: split along its sequence (`backward_split.rs`).
                Err(e) if crate::plan::exceeds_binding(&e) => {
                    return self.forward_train_split((q, k, v), shape).await;
                }
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

    /// [`DenseAttention::forward_train_in`] of tensors whose backward fits one binding each.
    pub(super) async fn forward_train_whole(
        &self,
        (q, k, v): (&[f32], &[f32], &[f32]),
        (shape, span): (Shape, HeadSpan),
        seqs: Option<&Sequences>,
    ) -> Result<(Output, DenseSaved)> {
        let tensors = SavedTensors::upload(&self.ctx, shape, (q, k, v), self.storage);
        let t = tensors.tensors();
        match seqs {
            None => self.forward_buffers_in(t, shape, span).await?,
            Some(seqs) => self.forward_varlen_buffers_async(t, shape, seqs).await?,
        }
        let out = tensors.read_outputs(&self.ctx, shape).await?;
        let saved = DenseSaved {
            shape,
            sequences: seqs.cloned(),
            span,
            owner: self.id,
            kept: DenseKept::Whole(tensors),
        };
        Ok((out, saved))
    }

    /// Keeps the tensors of a forward the caller ran with [`DenseAttention::forward_buffers`]
    /// on this instance, for [`DenseAttention::backward_buffers`]. `t.lse` must be the buffer
    /// that forward wrote the LSE into ([`FmaError::NoSavedForward`] without one). The buffers
    /// must not change until the backward is recorded.
    ///
    /// The backward of buffers runs on them whole: tensors over one storage binding are a
    /// typed error here, before the forward runs (host tensors train in runs of heads).
    pub fn saved_from_buffers(&self, t: GpuTensors<'_>, shape: Shape) -> Result<DenseSaved> {
        // Only the binding limit is decided here; other errors keep coming from the backward.
        if let Err(e @ FmaError::LimitExceeded { .. }) = self.backward_plan(shape) {
            return Err(resident_over_binding(e));
        }
        self.saved_buffers(t, shape)
    }

    /// [`DenseAttention::saved_from_buffers`] without its check of the plan (a variable-length
    /// batch checks its own).
    fn saved_buffers(&self, t: GpuTensors<'_>, shape: Shape) -> Result<DenseSaved> {
        Ok(DenseSaved {
            shape,
            sequences: None,
            span: HeadSpan::whole(shape),
            owner: self.id,
            kept: DenseKept::Whole(SavedTensors::from_buffers(t, shape, self.storage)?),
        })
    }

    /// [`DenseAttention::saved_from_buffers`] of a forward the caller ran with
    /// [`DenseAttention::forward_varlen_buffers`] on the variable-length batch `seqs`.
    pub fn saved_from_buffers_varlen(
        &self,
        t: GpuTensors<'_>,
        shape: Shape,
        seqs: &Sequences,
    ) -> Result<DenseSaved> {
        // Only host tensors train in groups of sequences: a batch over a binding says so.
        self.backward_plan_sequences(shape, seqs)
            .map_err(resident_over_binding)?;
        let mut saved = self.saved_buffers(t, shape)?;
        saved.sequences = Some(seqs.clone());
        Ok(saved)
    }

    /// Backward of host dO (async), dO of Q's shape (batch, heads, seq, head_dim). Returns dQ
    /// of Q's shape, dK and dV of K's shape (batch, kv_heads, seq_kv, head_dim): with
    /// grouped-query heads each K/V head's gradient is the sum over its group of query heads,
    /// in head order (deterministic). `weights` is `None`.
    /// Tensors saved in runs of heads or groups of sequences (host tensors over one binding)
    /// are differentiated one run or group at a time (`backward_runs.rs`,
    /// `backward_groups.rs`).
    pub async fn backward_async(&self, saved: &DenseSaved, dout: &[f32]) -> Result<Gradients<f32>> {
        saved.shape.check_len("dO", dout.len())?;
        match &saved.kept {
            DenseKept::Whole(_) => self.backward_whole(saved, dout).await,
            DenseKept::Runs(runs) => self.backward_runs(saved.shape, runs, dout).await,
            DenseKept::Groups { seqs, groups } => {
                self.backward_groups(saved.shape, seqs, groups, dout).await
            }
            DenseKept::Split(kept) => {
                saved.check_owner(self.id)?;
                self.backward_split(saved.shape, kept, dout).await
            }
        }
    }

    /// [`DenseAttention::backward_async`] of tensors saved in one set of buffers
    /// ([`DenseKept::Whole`]).
    pub(super) async fn backward_whole(
        &self,
        saved: &DenseSaved,
        dout: &[f32],
    ) -> Result<Gradients<f32>> {
        let shape = saved.shape;
        shape.check_len("dO", dout.len())?;
        let device = &self.ctx.device;
        // dO and the gradients in the executor's storage (f16: dO rounded on upload, the
        // gradients widened on readback).
        let bytes = tensor_bytes(shape.elements(), self.storage);
        let kv_bytes = tensor_bytes(shape.kv_elements(), self.storage);
        let dout_buf = storage(device, "dO", bytes, wgpu::BufferUsages::COPY_DST);
        self.ctx
            .queue
            .write_buffer(&dout_buf, 0, &host_bytes(dout, self.storage));
        let out = wgpu::BufferUsages::COPY_SRC;
        let (dq, dk, dv) = (
            storage(device, "dq", bytes, out),
            storage(device, "dk", kv_bytes, out),
            storage(device, "dv", kv_bytes, out),
        );
        let grads = GradTensors {
            dq: &dq,
            dk: &dk,
            dv: &dv,
            weights: None,
        };
        self.backward_buffers_async(saved, &dout_buf, grads).await?;
        // One staging buffer: dq, dk, dv.
        let total = bytes + 2 * kv_bytes;
        let staging = device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("dense gradients readback"),
            size: total.max(4),
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        let mut enc = device.create_command_encoder(&wgpu::CommandEncoderDescriptor {
            label: Some("dense gradients readback"),
        });
        enc.copy_buffer_to_buffer(&dq, 0, &staging, 0, bytes);
        enc.copy_buffer_to_buffer(&dk, 0, &staging, bytes, kv_bytes);
        enc.copy_buffer_to_buffer(&dv, 0, &staging, bytes + kv_bytes, kv_bytes);
        self.ctx.queue.submit([enc.finish()]);
        let mut all = read_f32(device, &staging, total).await?;
        self.ctx.check_alive()?;
        let gv = all.split_off(((bytes + kv_bytes) / 4) as usize);
        let gk = all.split_off((bytes / 4) as usize);
        let (gq, gk, gv) = (
            widen(all, shape.elements(), self.storage),
            widen(gk, shape.kv_elements(), self.storage),
            widen(gv, shape.kv_elements(), self.storage),
        );
        // dS of the sinks from the saved O and LSE (a reduction over rows per head, on the
        // host: WGSL has no portable float atomics, and it is two floats per row).
        let dsinks = match &self.variants.sinks {
            None => None,
            Some(_) => {
                let out = saved.whole()?.read_outputs(&self.ctx, shape).await?;
                let lse = out.lse.unwrap_or_default();
                let variants = &self.variants;
                // The dO the kernels saw (f16 storage: rounded).
                let dout = stored_values(dout, self.storage);
                variants.sink_gradient(shape, saved.span, &out.o, &lse, &dout)
            }
        };
        Ok(Gradients {
            dq: gq,
            dk: gk,
            dv: gv,
            weights: None,
            dsinks,
        })
    }

    /// Backward of dO already on the GPU ((batch, heads, seq, head_dim) f32, `STORAGE`) into
    /// the caller's gradient buffers (`g.weights` must be `None`: dense attention has no
    /// weights); records and submits one command buffer and returns without waiting for the
    /// GPU.
    pub async fn backward_buffers_async(
        &self,
        saved: &DenseSaved,
        dout: &wgpu::Buffer,
        g: GradTensors<'_>,
    ) -> Result<()> {
        saved.check_owner(self.id)?;
        if g.weights.is_some() {
            return Err(FmaError::InvalidConfig {
                what: "weight gradients",
                value: "requested".into(),
                allowed: "none: dense attention has no learned weights".into(),
            });
        }
        let shape = saved.shape;
        let tensors = saved.whole()?;
        let plan = self.saved_plan(saved)?;
        // dO and the gradients have the elements of the storage (issue 29).
        let bytes = shape.elements() as u64 * self.storage.bytes();
        let kv_bytes = shape.kv_elements() as u64 * self.storage.bytes();
        check_storage("dO", dout, bytes, shape)?;
        check_storage("dQ", g.dq, bytes, shape)?;
        check_storage("dK", g.dk, kv_bytes, shape)?;
        check_storage("dV", g.dv, kv_bytes, shape)?;
        let steps: Vec<Dispatch> = [plan.delta, plan.dkv, plan.dq]
            .into_iter()
            .chain(plan.pad)
            .collect();
        let pipes = Pipes::new(&self.ctx, &steps).await?;
        let uniforms = self.backward_uniforms(&plan)?;
        let table = plan
            .forward
            .sequences
            .as_ref()
            .map(|t| sequence_table(&self.ctx.device, t));
        let scopes = Scopes::push(&self.ctx)?;
        // Under f16 storage, the f32 partial gradients of passes that run in several parts.
        let scratch = |parts: usize, elements: usize, label| {
            (self.storage == Storage::F16 && parts > 1).then(|| {
                storage(
                    &self.ctx.device,
                    label,
                    elements as u64 * 4,
                    wgpu::BufferUsages::empty(),
                )
            })
        };
        let kv = shape.kv_elements();
        let (dkv_parts, dq_parts) = (uniforms.dkv.len(), uniforms.dq.len());
        let partials = [
            (
                Role::DQPartial,
                scratch(dq_parts, shape.elements(), "dense partial dQ (f32)"),
            ),
            (
                Role::DKPartial,
                scratch(dkv_parts, kv, "dense partial dK (f32)"),
            ),
            (
                Role::DVPartial,
                scratch(dkv_parts, kv, "dense partial dV (f32)"),
            ),
        ];
        {
            let mut stats = self.stats.lock().map_err(poisoned)?;
            let stats = stats.at_least(
                &self.ctx.device,
                plan.stats_bytes,
                self.limits.binding_bytes(),
            );
            let res = |params| {
                let mut r = resources(params, tensors, dout, stats, &g);
                // The f16 variants bind the partials: the scratch, or with one part (where no
                // store keeps a partial) a placeholder. The f32 variants bind none.
                for (role, buf) in &partials {
                    r = r.with(*role, buf.as_ref().unwrap_or(&self.ctx.kernels.no_partial));
                }
                match &table {
                    Some(table) => r.with(Role::SeqTable, table),
                    None => r,
                }
            };
            let mut enc = self
                .ctx
                .device
                .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                    label: Some("dense backward"),
                });
            {
                let mut cpass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
                    label: Some("dense backward"),
                    timestamp_writes: None,
                });
                let ctx = &self.ctx;
                record_steps(
                    ctx,
                    &mut cpass,
                    &[plan.delta],
                    &pipes,
                    Some(&uniforms.selects),
                    &res(&uniforms.delta),
                )?;
                // Chunks in order: each resumes the sums the previous left in dK, dV or dQ.
                for params in &uniforms.dkv {
                    record_steps(ctx, &mut cpass, &[plan.dkv], &pipes, None, &res(params))?;
                }
                for params in &uniforms.dq {
                    record_steps(ctx, &mut cpass, &[plan.dq], &pipes, None, &res(params))?;
                }
                // A padded batch: zeros on the padding rows, last.
                if let (Some(pad), Some(selects)) = (plan.pad, &uniforms.pad) {
                    let res = res(&uniforms.delta);
                    record_steps(ctx, &mut cpass, &[pad], &pipes, Some(selects), &res)?;
                }
            }
            self.ctx.queue.submit([enc.finish()]);
        }
        scopes.pop(&self.ctx, "the dense backward").await
    }
}

/// The buffers of every pass of a dense backward, with `params` as its parameter block.
fn resources<'a>(
    params: &'a wgpu::Buffer,
    saved: &'a SavedTensors,
    dout: &'a wgpu::Buffer,
    stats: &'a wgpu::Buffer,
    g: &GradTensors<'a>,
) -> Resources<'a> {
    Resources::default()
        .with(Role::Params, params)
        .with_saved(saved)
        .with(Role::DOut, dout)
        .with(Role::Stats, stats)
        .with(Role::DQ, g.dq)
        .with(Role::DK, g.dk)
        .with(Role::DV, g.dv)
}
