//! The host-tensor front of every forward: checks the shape and the slices' lengths, then
//! runs the whole problem, runs of heads, or (one head over a binding) the executor's split
//! path, and concatenates what comes back.

use std::sync::Mutex;

use crate::error::{FmaError, Result};
use crate::gpu::engine::context::GpuContext;
use crate::gpu::engine::pipelines::poisoned;
use crate::gpu::engine::split_io::SplitIo;
use crate::gpu::engine::tensors::Output;
use crate::gpu::engine::tensors::{GpuTensors, HostPool, Scopes, Staged};
use crate::gradients::{Gradients, LevelGradients};
use crate::shape::Shape;
use crate::storage::Storage;
use crate::variants::HeadSpan;

/// Runs of whole heads `(first, count)` over batch*heads such that each run's shape passes
/// `fits` (a plan check): one run when the whole shape fits; otherwise the largest number of
/// heads whose tensors stay within the adapter's binding limits, so a tensor larger than one
/// storage binding is processed in pieces. A single head that does not fit is the error `fits`
/// gives for it (the FMA and dense fronts split such a head along its sequence before they
/// get here: `gpu/fma/split.rs`, `gpu/dense/split.rs`).
///
/// Grouped-query heads run in whole groups (a run's K/V are its groups' K/V heads), or, when
/// one group does not fit, one query head at a time with its K/V head.
pub(crate) fn head_chunks(
    shape: Shape,
    fits: impl Fn(Shape) -> Result<()>,
) -> Result<Vec<(usize, usize)>> {
    let bh = shape.batch_heads();
    match fits(shape) {
        Ok(()) => return Ok(vec![(0, bh)]),
        Err(FmaError::LimitExceeded { .. }) if bh > 1 => {}
        Err(e) => return Err(e),
    }
    let group = shape.group();
    let heads = |count| shape.with_heads(count);
    // Runs of whole groups when one group fits, else of single heads.
    let unit = if group > 1 && fits(heads(group)).is_ok() {
        group
    } else {
        fits(heads(1))?;
        1
    };
    if unit == 1 && group > 1 {
        // One query head at a time: a run of several single heads could straddle two groups,
        // whose two K/V heads the run's shape (`Shape::with_heads`: one K/V head) cannot say.
        return Ok((0..bh).map(|first| (first, 1)).collect());
    }
    // Largest number of units that fits (the checks are monotone in the number of heads).
    let (mut lo, mut hi) = (1, bh / unit);
    while lo < hi {
        let mid = (lo + hi).div_ceil(2);
        if fits(heads(mid * unit)).is_ok() {
            lo = mid;
        } else {
            hi = mid - 1;
        }
    }
    let run = lo * unit;
    Ok((0..bh)
        .step_by(run)
        .map(|first| (first, run.min(bh - first)))
        .collect())
}

/// The K/V heads `(first, count)` that the run of query heads `(first, count)` reads: a run
/// is whole groups or lies inside one ([`head_chunks`]), query head `bh` reading K/V head
/// `bh / group`.
pub(crate) fn kv_heads_of(shape: Shape, (first, count): (usize, usize)) -> (usize, usize) {
    let group = shape.group();
    let kv_first = first / group;
    (kv_first, (first + count - 1) / group + 1 - kv_first)
}

/// A binding limit `e` with its `what` and `advice` rewritten by `what` and `advice` (the
/// numbers kept): how the fronts say which piece of the caller's work hit the limit and what to
/// do instead. Other errors are returned as they are.
pub(crate) fn reworded_limit(
    e: FmaError,
    what: impl FnOnce(String) -> String,
    advice: impl FnOnce(String) -> String,
) -> FmaError {
    match e {
        FmaError::LimitExceeded {
            what: w,
            requested,
            max,
            unit,
            advice: a,
        } => FmaError::LimitExceeded {
            what: what(w),
            requested,
            max,
            unit,
            advice: advice(a),
        },
        e => e,
    }
}

/// The training forward's error when even one head's backward exceeds a storage binding
/// ([`crate::plan::exceeds_binding`]): the plan's, saying that the backward does not split a
/// head along its sequence, `why` (the pass that reads every query of the head), and what to
/// do instead. Other errors are returned as they are.
pub(crate) fn one_head_over_binding(e: FmaError, why: &str) -> FmaError {
    if !crate::plan::exceeds_binding(&e) {
        return e;
    }
    reworded_limit(
        e,
        |what| format!("the backward of one head: {what}"),
        |advice| {
            format!(
                "the backward runs tensors over one binding a run of heads at a time but does \
                 not split one head along its sequence ({why}): use shorter sequences per head \
                 or a device with larger storage bindings; the forward alone splits a head \
                 ({advice})"
            )
        },
    )
}

/// The error of resident tensors whose backward does not fit one binding (FMA's and dense
/// attention's `saved_from_buffers`, before the forward runs): the plan's limit, with what to
/// do instead (host tensors train in pieces; the caller's buffers do not). Other errors are
/// returned as they are.
pub(crate) fn resident_over_binding(e: FmaError) -> FmaError {
    reworded_limit(
        e,
        |what| format!("the backward of resident buffers: {what}"),
        |advice| {
            format!(
                "train on host tensors (Host, then HostGrad), which run in runs of heads or \
                 groups of sequences, or pass fewer heads or sequences per call ({advice})"
            )
        },
    )
}

/// `dst += src` when `dst` holds an earlier run's sum, else `dst = src` (a copy, so a K/V head
/// of one run keeps its bits, a -0.0 included): how the training runs of heads put a K/V
/// head's gradients together in head order (`fma/backward_runs.rs`, `dense/backward_runs.rs`).
pub(crate) fn add_or_copy(dst: &mut [f32], src: &[f32], add: bool) {
    if add {
        dst.iter_mut().zip(src).for_each(|(d, s)| *d += s);
    } else {
        dst.copy_from_slice(src);
    }
}

/// Runs `run` on each run of heads of `chunks` ([`head_chunks`]) and concatenates the outputs
/// (heads are independent, so the result is the one an unsplit run would give), keeping what
/// each run returns beside its output (a training run's saved forward) with its `(first,
/// count)`. Each run is told which of the caller's heads it holds ([`HeadSpan::run`]: the
/// sinks are per head).
#[allow(clippy::type_complexity)]
pub(crate) async fn runs_of_heads<'a, T, F, Fut>(
    shape: Shape,
    chunks: &[(usize, usize)],
    (q, k, v): (&'a [f32], &'a [f32], &'a [f32]),
    want_lse: bool,
    run: F,
) -> Result<(Output, Vec<((usize, usize), T)>)>
where
    F: Fn(&'a [f32], &'a [f32], &'a [f32], Shape, HeadSpan) -> Fut,
    Fut: std::future::Future<Output = Result<(Output, T)>>,
{
    let per_head = shape.seq * shape.head_dim;
    let per_kv_head = shape.seq_kv * shape.head_dim;
    let mut o = Vec::with_capacity(shape.elements());
    let mut lse = Vec::with_capacity(if want_lse { shape.rows() } else { 0 });
    let mut kept = Vec::with_capacity(chunks.len());
    for &(first, count) in chunks {
        let r = first * per_head..(first + count) * per_head;
        let (kv_first, kv_count) = kv_heads_of(shape, (first, count));
        let kv = kv_first * per_kv_head..(kv_first + kv_count) * per_kv_head;
        let span = HeadSpan::run(shape, first);
        let (part, t) = run(&q[r], &k[kv.clone()], &v[kv], shape.with_heads(count), span).await?;
        o.extend_from_slice(&part.o);
        if let Some(l) = part.lse {
            lse.extend_from_slice(&l);
        }
        kept.push(((first, count), t));
    }
    let out = Output {
        o,
        lse: want_lse.then_some(lse),
    };
    Ok((out, kept))
}

/// The gradients of the training runs of heads put together in head order
/// (`fma/backward_runs.rs`, `dense/backward_runs.rs`): dQ concatenated; each K/V head's dK and
/// dV copied from the run that holds its group, or added in head order over the runs of a
/// group split into single heads; the sinks' and the learned weights' gradients (sums over
/// heads) added in run order, in f32: the same bits run to run.
pub(crate) struct RunGradients {
    shape: Shape,
    sum: Gradients<f32>,
    /// K/V heads already written by an earlier run (a group split into single heads).
    seen: Vec<bool>,
}

impl RunGradients {
    /// No run yet, for a forward of `shape`.
    pub(crate) fn new(shape: Shape) -> Self {
        Self {
            shape,
            sum: Gradients {
                dq: Vec::with_capacity(shape.elements()),
                dk: vec![0.0; shape.kv_elements()],
                dv: vec![0.0; shape.kv_elements()],
                weights: None,
                dsinks: None,
            },
            seen: vec![false; shape.batch * shape.kv_heads],
        }
    }

    /// Adds the gradients `g` of the run of query heads `(first, count)`; runs come in head
    /// order.
    pub(crate) fn add(&mut self, (first, count): (usize, usize), g: Gradients<f32>) {
        let per_kv = self.shape.seq_kv * self.shape.head_dim;
        let sum = &mut self.sum;
        sum.dq.extend_from_slice(&g.dq);
        let (kv_first, kv_count) = kv_heads_of(self.shape, (first, count));
        for (i, h) in (kv_first..kv_first + kv_count).enumerate() {
            let (src, dst) = (i * per_kv..(i + 1) * per_kv, h * per_kv..(h + 1) * per_kv);
            add_or_copy(&mut sum.dk[dst.clone()], &g.dk[src.clone()], self.seen[h]);
            add_or_copy(&mut sum.dv[dst], &g.dv[src], self.seen[h]);
            self.seen[h] = true;
        }
        add_sums(sum, g);
    }

    /// The gradients of every run, dQ, dK, dV as tensors of `storage` hold them: under f16
    /// a K/V head's sum over runs (a group split into single heads) is rounded to f16 once
    /// more, as the unsplit backward stores its own sum (the weights' and sinks' stay f32).
    pub(crate) fn finish(mut self, storage: Storage) -> Gradients<f32> {
        if storage == Storage::F16 {
            self.sum.dk = crate::storage::round_to_f16(&self.sum.dk);
            self.sum.dv = crate::storage::round_to_f16(&self.sum.dv);
        }
        self.sum
    }
}

/// The sums over heads of a piece's gradients `g` (the sinks' and the learned weights') added
/// to the previous pieces' `sum`, in f32 (the first piece's copied): how runs of heads and
/// groups of sequences (`engine::varlen_io`) put them together, in piece order.
pub(crate) fn add_sums(sum: &mut Gradients<f32>, g: Gradients<f32>) {
    match (&mut sum.dsinks, g.dsinks) {
        (Some(total), Some(run)) => add_or_copy(total, &run, true),
        (total @ None, run) => *total = run,
        (Some(_), None) => {}
    }
    match (&mut sum.weights, g.weights) {
        (Some(total), Some(run)) => {
            for (s, l) in total.iter_mut().zip(&run) {
                add_level(s, l);
            }
        }
        (total @ None, run) => *total = run,
        (Some(_), None) => {}
    }
}

/// One level's weight gradients of a run added to the previous runs' sum.
fn add_level(sum: &mut LevelGradients<f32>, run: &LevelGradients<f32>) {
    for (s, r) in [
        (&mut sum.wk, &run.wk),
        (&mut sum.bk, &run.bk),
        (&mut sum.wv, &run.wv),
        (&mut sum.bv, &run.bv),
        (&mut sum.wq, &run.wq),
        (&mut sum.bq, &run.bq),
    ] {
        add_or_copy(s, r, true);
    }
}

/// Checks the shape, and the lengths of host Q, K and V against it.
pub(crate) fn check_host(shape: Shape, q: &[f32], k: &[f32], v: &[f32]) -> Result<()> {
    shape.validate()?;
    shape.check_len("Q", q.len())?;
    shape.check_kv_len("K", k.len())?;
    shape.check_kv_len("V", v.len())
}

/// The host-tensor front of every forward: checks the shape and the slices' lengths, then
/// runs `split` when `split_head` (the executor's test: one head alone exceeds a binding, its
/// tokens or, for FMA, its coarse rows; `split` cuts the head's sequence:
/// `gpu/fma/split.rs`, `gpu/dense/split.rs`), else `run` once, or once per run of heads when the
/// tensors exceed a binding (see [`head_chunks`]), with the caller's heads it runs
/// ([`HeadSpan`]).
#[allow(clippy::too_many_arguments)]
pub(crate) async fn forward_host<'a, F, Fut, S, SFut>(
    shape: Shape,
    q: &'a [f32],
    k: &'a [f32],
    v: &'a [f32],
    want_lse: bool,
    split_head: bool,
    fits: impl Fn(Shape) -> Result<()>,
    run: F,
    split: S,
) -> Result<Output>
where
    F: Fn(&'a [f32], &'a [f32], &'a [f32], Shape, HeadSpan) -> Fut,
    Fut: std::future::Future<Output = Result<Output>>,
    S: FnOnce(SplitIo<'a>) -> SFut,
    SFut: std::future::Future<Output = Result<Output>>,
{
    check_host(shape, q, k, v)?;
    if split_head {
        return split(SplitIo::Host { q, k, v, want_lse }).await;
    }
    let chunks = head_chunks(shape, fits)?;
    if chunks.len() == 1 {
        return run(q, k, v, shape, HeadSpan::whole(shape)).await;
    }
    let run = |q, k, v, s, span| {
        let part = run(q, k, v, s, span);
        async move { Ok((part.await?, ())) }
    };
    let (out, _) = runs_of_heads(shape, &chunks, (q, k, v), want_lse, run).await?;
    Ok(out)
}

/// One forward of host tensors whose buffers fit one binding each: uploads Q, K, V into the
/// executor's `pool` as `storage` (buffers of at most `cap` bytes unless the shape needs more), lets
/// `record` record the executor's work on them into the encoder (O and the LSE buffer given),
/// copies O (and the LSE) to a staging buffer in the same submit, submits inside error scopes
/// (`stage` names the work in an error) and reads the results back. The pool is locked from
/// upload to submit, so concurrent callers never see each other's inputs.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn run_host(
    ctx: &GpuContext,
    pool: &Mutex<HostPool>,
    (cap, storage): (u64, Storage),
    shape: Shape,
    (q, k, v): (&[f32], &[f32], &[f32]),
    want_lse: bool,
    stage: &str,
    record: impl FnOnce(&mut wgpu::CommandEncoder, GpuTensors<'_>, &wgpu::Buffer) -> Result<()>,
) -> Result<Output> {
    let staged = Staged::of(&ctx.device, shape, want_lse, storage);
    let scopes = Scopes::push(ctx)?;
    {
        let mut pool = pool.lock().map_err(poisoned)?;
        let host = pool.fit(&ctx.device, shape, cap, storage);
        host.upload(&ctx.queue, q, k, v);
        let mut enc = ctx
            .device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some(stage) });
        record(&mut enc, host.tensors(), &host.lse)?;
        staged.record(&mut enc, &host.out, &host.lse);
        ctx.queue.submit([enc.finish()]);
    }
    scopes.pop(ctx, stage).await?;
    staged.read(ctx).await
}
