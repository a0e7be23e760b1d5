//! The one entry point of the GPU path: [`Attention`] runs a [`Problem`] by a [`Method`] (FMA
//! or exact dense attention), one call per operation (forward, training forward, backward),
//! each taking its tensors as host slices, resident buffers or the caller's encoder
//! (`engine/io.rs`).
//! Below it the executors (`gpu/fma/`, `gpu/dense/`) keep one method per path; this layer
//! only chooses the path, so every caller branches nowhere.

use std::sync::{Arc, Mutex};

use crate::config::Downsample;
use crate::error::{FmaError, Result};
use crate::gpu::dense::{DenseAttention, DenseSaved};
use crate::gpu::engine::context::GpuContext;
use crate::gpu::engine::split_io::check_split_storage;
use crate::gpu::engine::storage_types::check_device_storage;
use crate::gpu::engine::tensors::Output;
use crate::gpu::fma::backward::Saved as FmaSaved;
use crate::gpu::fma::FmaAttention;
use crate::gradients::Gradients;
use crate::method::Method;
use crate::plan::{BackwardPlan, DenseBackwardPlan, DenseKernel, DensePlan, FmaKernel, FmaPlan};
use crate::problem::Problem;
use crate::storage::{check_f16_range, Storage};
use crate::variants::Variants;

use crate::gpu::engine::io::{BackwardArgs, BackwardIo, ForwardArgs, ForwardIo, TrainIo};

/// Attention on the GPU: a [`Method`] on a device, run on any [`Problem`].
///
/// ```no_run
/// use multipole_attn::gpu::{Attention, GpuContext, Host, HostGrad};
/// use multipole_attn::{FmaConfig, Method, Problem, Shape};
/// let ctx = GpuContext::new()?;                          // honours WGPU_BACKEND
/// let fma = Attention::new(&ctx, Method::Fma(FmaConfig::new(64, 2)))?;
/// let p = Problem::new(Shape::new(1, 4, 8192, 64)).causal(true);
/// let q = vec![0.1f32; p.shape.elements()];
/// let out = fma.forward(&p, Host::new(&q, &q, &q))?;    // O (1, 4, 8192, 64), LSE (1, 4, 8192)
/// let (_, saved) = fma.train(&p, Host::new(&q, &q, &q))?;
/// let grads = fma.backward(&saved, HostGrad(&out.o))?;  // dQ, dK, dV
/// # Ok::<(), multipole_attn::FmaError>(())
/// ```
///
/// Built once per method; the executors behind it (one per mask and variants, made on first
/// use, the last eight kept) cache pipelines per device, uniforms per shape and buffers by
/// capacity, so repeated calls allocate nothing once the largest shape has been seen. Sink
/// logits are part of an executor's uniforms: sinks that change every step (training them)
/// make an executor per step (pipelines are still shared per device). Safe to share between
/// threads.
/// Every call has an `_async` form (the only one on the web) and a blocking twin.
pub struct Attention {
    ctx: GpuContext,
    method: Method,
    max_binding: Option<u64>,
    keys_per_dispatch: Option<usize>,
    /// The element type of Q, K, V and O ([`Attention::storage`]).
    storage: Storage,
    /// Dense attention's forward kernel, when not the adapter's choice.
    dense_kernel: Option<DenseKernel>,
    /// FMA's fused fine-query kernel, when not the adapter's choice.
    fma_kernel: Option<FmaKernel>,
    /// FMA's executors, one per mask and variants seen (each uploads the learned weights).
    fma: Mutex<Vec<(Softmax, Arc<FmaAttention>)>>,
    /// Dense attention's executors, likewise.
    dense: Mutex<Vec<(Softmax, Arc<DenseAttention>)>>,
    /// Unique per instance: ties a [`Saved`] to the Attention that made it.
    id: u64,
}

/// The next [`Attention`] id.
static NEXT_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// What an executor is specialised by besides the method: the problem's mask and variants.
#[derive(Clone, Debug, PartialEq)]
struct Softmax {
    causal: bool,
    variants: Variants,
}

impl Softmax {
    fn of(p: &Problem) -> Self {
        Self {
            causal: p.causal,
            variants: p.variants.clone(),
        }
    }
}

/// Executors kept per [`Attention`]: a model's layers use one or two (window and global
/// layers), a sweep a few more; the oldest goes beyond this many.
const KEPT: usize = 8;

/// The executor kept for `key`, or a new one from `make`.
fn kept<T>(
    cell: &Mutex<Vec<(Softmax, Arc<T>)>>,
    key: Softmax,
    make: impl FnOnce() -> Result<T>,
) -> Result<Arc<T>> {
    // A poisoned lock only means another thread panicked while holding it; the list is
    // still a valid list of executors.
    let mut all = cell.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, e)) = all.iter().find(|(k, _)| *k == key) {
        return Ok(e.clone());
    }
    let e = Arc::new(make()?);
    if all.len() >= KEPT {
        all.remove(0);
    }
    all.push((key, e.clone()));
    Ok(e)
}

impl std::fmt::Debug for Attention {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Attention")
            .field("adapter", &self.ctx.info.name)
            .field("method", &self.method)
            .field("max_binding", &self.max_binding)
            .field("keys_per_dispatch", &self.keys_per_dispatch)
            .field("dense_kernel", &self.dense_kernel)
            .field("fma_kernel", &self.fma_kernel)
            .finish_non_exhaustive()
    }
}

/// The tensors a training forward keeps for [`Attention::backward`], with the problem they
/// belong to and the executor that made them (so a backward finds it even when the Attention
/// has since made other executors). Only the [`Attention`] that made it takes it back.
pub struct Saved {
    problem: Problem,
    kind: SavedKind,
    exec: Exec,
    owner: u64,
}

enum SavedKind {
    Fma(FmaSaved),
    Dense(DenseSaved),
}

impl std::fmt::Debug for Saved {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let method = match self.kind {
            SavedKind::Fma(_) => "FMA",
            SavedKind::Dense(_) => "dense",
        };
        f.debug_struct("Saved")
            .field("method", &method)
            .field("problem", &self.problem)
            .finish_non_exhaustive()
    }
}

impl Saved {
    /// The problem of the saved forward.
    pub fn problem(&self) -> &Problem {
        &self.problem
    }
}

/// The plan a forward or backward of a problem executes: FMA's or dense attention's.
// A plan is made per call and read, not stored in bulk: boxing would only add an indirection.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug)]
pub enum Plan {
    /// FMA's forward: per-level dispatches, buffer sizes.
    Fma(FmaPlan),
    /// FMA's backward.
    FmaBackward(BackwardPlan),
    /// Dense attention's forward.
    Dense(DensePlan),
    /// Dense attention's backward.
    DenseBackward(DenseBackwardPlan),
}

impl Plan {
    /// FMA's forward plan, if this is one.
    pub fn fma(&self) -> Option<&FmaPlan> {
        match self {
            Plan::Fma(p) => Some(p),
            _ => None,
        }
    }

    /// FMA's backward plan, if this is one.
    pub fn fma_backward(&self) -> Option<&BackwardPlan> {
        match self {
            Plan::FmaBackward(p) => Some(p),
            _ => None,
        }
    }

    /// Dense attention's forward plan, if this is one.
    pub fn dense(&self) -> Option<&DensePlan> {
        match self {
            Plan::Dense(p) => Some(p),
            _ => None,
        }
    }

    /// Dense attention's backward plan, if this is one.
    pub fn dense_backward(&self) -> Option<&DenseBackwardPlan> {
        match self {
            Plan::DenseBackward(p) => Some(p),
            _ => None,
        }
    }
}

/// One executor, whichever the method.
#[derive(Clone)]
enum Exec {
    Fma(Arc<FmaAttention>),
    Dense(Arc<DenseAttention>),
}

impl Attention {
    /// Prepares `method` on `ctx`. FMA's configuration is checked here (m, p, the weights'
    /// shapes for their head_dim and their values); the executors (and the learned weights'
    /// upload) come with the first call of each mask and variants, after the shape-dependent
    /// checks.
    pub fn new(ctx: &GpuContext, method: Method) -> Result<Self> {
        let attention = Self {
            ctx: ctx.clone(),
            method,
            max_binding: None,
            keys_per_dispatch: None,
            storage: Storage::F32,
            dense_kernel: None,
            fma_kernel: None,
            fma: Default::default(),
            dense: Default::default(),
            id: NEXT_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
        };
        // A bad configuration fails here, before any executor is made (a grid or coarse
        // queries refuse only a causal problem, at its first call).
        match &attention.method {
            Method::Fma(cfg) => FmaAttention::check_config(ctx, cfg)?,
            Method::Dense => ctx.check_alive()?,
        }
        Ok(attention)
    }

    /// FMA with `cfg` ([`Attention::new`] with [`Method::Fma`]).
    pub fn fma(ctx: &GpuContext, cfg: crate::FmaConfig) -> Result<Self> {
        Self::new(ctx, Method::Fma(cfg))
    }

    /// Exact dense attention ([`Attention::new`] with [`Method::Dense`]).
    pub fn dense(ctx: &GpuContext) -> Result<Self> {
        Self::new(ctx, Method::Dense)
    }

    /// Uses at most `bytes` per storage binding, below the device's own limit (a larger value
    /// changes nothing): tensors over it take the split paths ([`crate::plan::SplitPlan`],
    /// [`crate::plan::DenseSplitPlan`]). For checking those paths on an adapter (`doctor`
    /// does) or bounding the library's single allocations. Call before the first forward.
    pub fn max_binding(mut self, bytes: u64) -> Result<Self> {
        self.max_binding = Some(bytes);
        self.rebuild()
    }

    /// Dense attention attends at most `keys` keys per query row in one dispatch (rounded
    /// down to whole key tiles), longer ranges in chunks (default
    /// [`crate::plan::DENSE_KEY_TILES_PER_DISPATCH`] tiles: llvmpipe's loop limit); its
    /// backward walks at most as many. Smaller values exercise the chunking on small
    /// problems or measure its cost. No effect on FMA.
    pub fn keys_per_dispatch(mut self, keys: usize) -> Result<Self> {
        self.keys_per_dispatch = Some(keys);
        self.rebuild()
    }

    /// Stores Q, K, V and O as `storage` (issue 29). [`Storage::F16`] needs
    /// `wgpu::Features::SHADER_F16` on the device ([`FmaError::MissingFeature`] otherwise:
    /// every browser without shader-f16, and any context made with `browser_limits`); the
    /// kernels load f16, compute in f32 (scores, softmax state, accumulators) and store O as
    /// f16, so O is the f32 path's result on the f16-rounded inputs, rounded once more to f16
    /// (docs/architecture.md, "Storage"). The LSE and FMA's coarse rows stay f32.
    ///
    /// With f16: [`Host`](crate::gpu::Host) tensors stay f32 slices (rounded to f16 on upload;
    /// a finite value beyond 65504 is a typed error) and O comes back as f16 values widened to
    /// f32; [`Resident`](crate::gpu::Resident) and [`Encode`](crate::gpu::Encode) buffers hold
    /// f16 elements (2 bytes each, same layouts) and an f32 LSE. Training and the backward
    /// run with f16 Q, K, V, O, dO and dQ, dK, dV ([`HostGrad`](crate::gpu::HostGrad): dO
    /// rounded to f16, the gradients widened, the learned weights' and the sinks' gradients
    /// f32; [`ResidentGrad`](crate::gpu::ResidentGrad): f16 buffers, the learned weights'
    /// gradients f32). Everything f32 storage runs, f16 storage runs: variable-length
    /// batches, and host tensors over one storage binding in the same pieces (runs of heads,
    /// groups of sequences, a head split along its sequence; the limits count 4 bytes per
    /// element either way, so f16 pieces are those of f32). A head split across bindings
    /// needs an even head_dim with f16 (its chunks are copied in whole 4-byte words).
    pub fn storage(mut self, storage: Storage) -> Result<Self> {
        check_device_storage(&self.ctx, storage)?;
        self.storage = storage;
        self.rebuild()
    }

    /// The element type of Q, K, V and O ([`Attention::storage`]).
    pub fn storage_type(&self) -> Storage {
        self.storage
    }

    /// Dense attention's forward runs the kernel of shape `kernel` instead of the adapter's
    /// choice ([`DenseKernel::for_device`]: [`DenseKernel::Rows`] on a CPU adapter such as
    /// lavapipe, [`DenseKernel::Tiled`] on a GPU): for testing the tiled kernel on lavapipe and
    /// comparing the two on one device. Results agree within f32 rounding. Where the tiled
    /// kernel's tiles do not fit the adapter for the head dimension, the rows kernel runs. The
    /// backward is the same either way. No effect on FMA. Call before the first forward.
    pub fn dense_kernel(mut self, kernel: DenseKernel) -> Result<Self> {
        self.dense_kernel = Some(kernel);
        self.rebuild()
    }

    /// FMA's forward runs its fused fine-query pass (`fine_attention`: near field and far
    /// field in one online softmax) with the kernel of shape `kernel` instead of the adapter's
    /// choice ([`FmaKernel::for_device`]: [`FmaKernel::Rows`] on a CPU adapter such as
    /// lavapipe, [`FmaKernel::Tiled`] on a GPU): for testing the tiled kernel on lavapipe and
    /// comparing the two on one device. Results agree within f32 rounding. Where the tiled
    /// kernel's tiles do not fit the adapter for the head dimension, the rows kernel runs. The training forward runs the chosen kernel; the backward is the
    /// same either way. No effect on dense attention (nor on FMA with a window and Average
    /// downsampling, which runs on dense attention's banded kernel:
    /// [`Attention::dense_kernel`]). Call before the first forward.
    pub fn fma_kernel(mut self, kernel: FmaKernel) -> Result<Self> {
        self.fma_kernel = Some(kernel);
        self.rebuild()
    }

    /// The method.
    pub fn method(&self) -> &Method {
        &self.method
    }

    /// The context.
    pub fn context(&self) -> &GpuContext {
        &self.ctx
    }

    /// Drops the executors made so far (after a knob changed): the next calls make them anew.
    fn rebuild(mut self) -> Result<Self> {
        self.fma = Default::default();
        self.dense = Default::default();
        Ok(self)
    }

    /// The executor of `softmax` (made on first use).
    fn exec_for(&self, softmax: Softmax) -> Result<Exec> {
        match &self.method {
            Method::Fma(cfg) => {
                let make = || {
                    let cfg = cfg
                        .clone()
                        .causal(softmax.causal)
                        .variants(softmax.variants.clone());
                    let mut e = FmaAttention::new(&self.ctx, cfg)?.with_storage(self.storage)?;
                    if let Some(bytes) = self.max_binding {
                        e = e.max_binding(bytes);
                    }
                    if let Some(kernel) = self.fma_kernel {
                        e = e.kernel(kernel);
                    }
                    Ok(e)
                };
                kept(&self.fma, softmax.clone(), make).map(Exec::Fma)
            }
            Method::Dense => self.dense_exec(softmax),
        }
    }

    /// Dense attention's executor of `softmax` (made on first use): the method's, or FMA's
    /// with a window ([`Attention::fma_window_as_dense`]).
    fn dense_exec(&self, softmax: Softmax) -> Result<Exec> {
        let make = || {
            let mut e = DenseAttention::new(&self.ctx, softmax.causal)?
                .with_variants(softmax.variants.clone())
                .with_storage(self.storage)?;
            if let Some(bytes) = self.max_binding {
                e = e.max_binding(bytes);
            }
            if let Some(keys) = self.keys_per_dispatch {
                e = e.keys_per_dispatch(keys);
            }
            if let Some(kernel) = self.dense_kernel {
                e = e.kernel(kernel);
            }
            Ok(e)
        };
        kept(&self.dense, softmax.clone(), make).map(Exec::Dense)
    }

    /// Whether FMA's problem `p` runs on dense attention's banded kernel: FMA with a window
    /// has no coarse level (docs/variants.md), so it is exact windowed attention through its
    /// near field, the same numbers as dense attention with the window to f32 rounding, and
    /// the banded kernel is faster (docs/perf.md, change 20). Average downsampling only (a
    /// Learned configuration's backward also returns its weights' zero gradients, which the
    /// dense path has not). FMA's own rules are checked first (its executor's `check`: the
    /// window within the block, no grid, fine queries, cross-length only causal), so FMA
    /// accepts and refuses the same problems as before; a binding limit is left to the dense
    /// path's own handling.
    fn fma_window_as_dense(&self, p: &Problem) -> Result<bool> {
        let Method::Fma(cfg) = &self.method else {
            return Ok(false);
        };
        if p.variants.window.is_none() || cfg.downsample != Downsample::Average {
            return Ok(false);
        }
        let Exec::Fma(fma) = self.exec_for(Softmax::of(p))? else {
            return Ok(false);
        };
        let checked = match &p.sequences {
            None => fma.check(p.shape),
            Some(seqs) => fma.plan_sequences(p.shape, seqs).map(drop),
        };
        match checked {
            Ok(()) | Err(FmaError::LimitExceeded { .. }) => Ok(true),
            Err(e) => Err(e),
        }
    }

    /// The executor that runs `p`: the method's, except FMA with a window on dense
    /// attention's banded kernel ([`Attention::fma_window_as_dense`]).
    fn exec(&self, p: &Problem) -> Result<Exec> {
        if self.fma_window_as_dense(p)? {
            return self.dense_exec(Softmax::of(p));
        }
        self.exec_for(Softmax::of(p))
    }

    /// The plan a forward of `p` executes (dispatches, buffer sizes), without running it.
    pub fn plan(&self, p: &Problem) -> Result<Plan> {
        p.validate()?;
        let s = p.shape;
        Ok(match (self.exec(p)?, &p.sequences) {
            (Exec::Fma(e), None) => Plan::Fma(e.plan(s)?),
            (Exec::Fma(e), Some(seqs)) => Plan::Fma(e.plan_sequences(s, seqs)?),
            (Exec::Dense(e), None) => Plan::Dense(e.plan(s)?),
            (Exec::Dense(e), Some(seqs)) => Plan::Dense(e.plan_sequences(s, seqs)?),
        })
    }

    /// The plan a backward of `p` executes. Tensors over one storage binding that train in
    /// pieces ([`Attention::train`]: runs of heads, a head split along its sequence, groups of
    /// sequences) have no one plan: this is then the binding's `LimitExceeded`, and each run's
    /// plan that of `p` with the run's heads ([`crate::Shape::with_heads`]), each group's that
    /// of its sequences packed.
    pub fn backward_plan(&self, p: &Problem) -> Result<Plan> {
        p.validate()?;
        let s = p.shape;
        Ok(match (self.exec(p)?, &p.sequences) {
            (Exec::Fma(e), None) => Plan::FmaBackward(e.backward_plan(s)?),
            (Exec::Fma(e), Some(seqs)) => Plan::FmaBackward(e.backward_plan_sequences(s, seqs)?),
            (Exec::Dense(e), None) => Plan::DenseBackward(e.backward_plan(s)?),
            (Exec::Dense(e), Some(seqs)) => {
                Plan::DenseBackward(e.backward_plan_sequences(s, seqs)?)
            }
        })
    }

    /// Checks that a forward of `p` can run on this device (shape, configuration, limits:
    /// whole tensors, a run of heads or a head split across bindings, whichever the forward
    /// takes), without touching the GPU: a caller can fail before reading gigabytes of input.
    pub fn check(&self, p: &Problem) -> Result<()> {
        p.validate()?;
        if self.storage == Storage::F16 && !p.shape.head_dim.is_multiple_of(2) {
            // An f16 head split across bindings needs an even head_dim (`split_io`).
            let split = match self.exec(p)? {
                Exec::Fma(e) => e.splits_head(p.shape),
                Exec::Dense(e) => e.splits_head(p.shape),
            };
            if split {
                check_split_storage(p.shape, self.storage)?;
            }
        }
        let fits = match (self.exec(p)?, &p.sequences) {
            (Exec::Fma(e), None) => return e.check(p.shape),
            (Exec::Fma(e), Some(seqs)) => e.plan_sequences(p.shape, seqs).map(drop),
            (Exec::Dense(e), None) => e.plan(p.shape).map(drop),
            (Exec::Dense(e), Some(seqs)) => e.plan_sequences(p.shape, seqs).map(drop),
        };
        match fits {
            // Host tensors over a binding run in pieces (runs of heads, groups of sequences,
            // chunks of a head): the limit is not the end of the road.
            Err(FmaError::LimitExceeded { .. }) => Ok(()),
            r => r,
        }
    }

    /// The forward of `p` (async): O (batch, heads, seq, head_dim) and the LSE (batch, heads,
    /// seq), returned ([`Host`](crate::gpu::Host)) or written into the caller's buffers ([`Resident`](crate::gpu::Resident),
    /// [`Encode`](crate::gpu::Encode)).
    pub async fn forward_async<'a, I: ForwardIo<'a>>(&self, p: &Problem, io: I) -> Result<I::Out> {
        self.forward_args(p, io.args()).await.map(I::out)
    }

    /// Blocking [`Attention::forward_async`] (native only).
    #[cfg(not(target_arch = "wasm32"))]
    pub fn forward<'a, I: ForwardIo<'a>>(&self, p: &Problem, io: I) -> Result<I::Out> {
        pollster::block_on(self.forward_async(p, io))
    }

    /// A training forward of `p` (async): the forward's output as [`Attention::forward`]
    /// gives it, and the tensors the backward needs ([`Saved`]). With [`Resident`](crate::gpu::Resident) tensors
    /// the LSE buffer is required (the backward reads it) and the buffers must not change
    /// until the backward is recorded.
    ///
    /// Host tensors over one storage binding train in pieces, as the forward runs them, and
    /// their backward takes [`HostGrad`](crate::gpu::HostGrad) only: runs of heads (whole K/V
    /// groups when one fits; FMA and dense), one head split along its sequence in the
    /// forward's chunks (FMA, Average downsampling, no softmax variant: 1D with fine or coarse
    /// queries, or a 2D grid with fine queries; [`crate::plan::BackwardSplitPlan`]: its coarse
    /// rows bound whole, their partial sums in groups of rows, [`crate::plan::DkvRowGroup`];
    /// dense attention, causal or not, grouped-query heads, no softmax variant, as many keys as
    /// queries: (query chunk, key chunk) pairs, [`crate::plan::DenseBackwardSplitPlan`]), and a
    /// variable-length batch in groups of sequences (FMA and dense; a sequence too long for a
    /// group trains alone by the rules above). Still a typed error, before the forward runs:
    /// resident buffers over a binding, and one head over a binding otherwise (FMA's Learned
    /// downsampling, coarse queries on a 2D grid, a softmax variant, or coarse rows of all
    /// levels over a binding; a dense head with a softmax variant or fewer queries than keys; a
    /// dense sequence of a variable-length batch; its error names the sequence of a
    /// variable-length batch).
    pub async fn train_async<'a, I: TrainIo<'a>>(
        &self,
        p: &Problem,
        io: I,
    ) -> Result<(I::Out, Saved)> {
        p.validate()?;
        let exec = self.exec(p)?;
        let (out, kind) = self.train_args(&exec, p, io.args()).await?;
        let saved = Saved {
            problem: p.clone(),
            kind,
            exec,
            owner: self.id,
        };
        Ok((I::out(out), saved))
    }

    /// Blocking [`Attention::train_async`] (native only).
    #[cfg(not(target_arch = "wasm32"))]
    pub fn train<'a, I: TrainIo<'a>>(&self, p: &Problem, io: I) -> Result<(I::Out, Saved)> {
        pollster::block_on(self.train_async(p, io))
    }

    /// The backward of a training forward (async): dQ of Q's shape, dK and dV of K's (with
    /// grouped K/V heads each K/V head's gradient sums its group's, in head order), and in
    /// FMA's Learned mode the gradients of every level's weights; returned ([`HostGrad`](crate::gpu::HostGrad)) or
    /// written into the caller's buffers ([`ResidentGrad`](crate::gpu::ResidentGrad)). Deterministic run to run.
    pub async fn backward_async<'a, I: BackwardIo<'a>>(
        &self,
        saved: &Saved,
        io: I,
    ) -> Result<I::Out> {
        self.backward_args(saved, io.args()).await.map(I::out)
    }

    /// Blocking [`Attention::backward_async`] (native only).
    #[cfg(not(target_arch = "wasm32"))]
    pub fn backward<'a, I: BackwardIo<'a>>(&self, saved: &Saved, io: I) -> Result<I::Out> {
        pollster::block_on(self.backward_async(saved, io))
    }

    async fn forward_args(&self, p: &Problem, args: ForwardArgs<'_>) -> Result<Option<Output>> {
        p.validate()?;
        let s = p.shape;
        let seqs = p.sequences.as_ref();
        self.check_host_range(&args)?;
        match (self.exec(p)?, seqs, args) {
            (_, Some(_), ForwardArgs::Encode(..)) => Err(encoder_varlen()),
            (Exec::Fma(e), None, ForwardArgs::Host(h)) => {
                e.forward_async(h.q, h.k, h.v, s, h.lse).await.map(Some)
            }
            (Exec::Fma(e), Some(seqs), ForwardArgs::Host(h)) => e
                .forward_varlen_async(h.q, h.k, h.v, s, seqs, h.lse)
                .await
                .map(Some),
            (Exec::Fma(e), None, ForwardArgs::Resident(t)) => {
                e.forward_buffers_async(t, s).await.map(|_| None)
            }
            (Exec::Fma(e), Some(seqs), ForwardArgs::Resident(t)) => e
                .forward_varlen_buffers_async(t, s, seqs)
                .await
                .map(|_| None),
            (Exec::Fma(e), None, ForwardArgs::Encode(enc, t)) => {
                e.encode_async(enc, t, s).await.map(|_| None)
            }
            (Exec::Dense(e), None, ForwardArgs::Host(h)) => {
                e.forward_async(h.q, h.k, h.v, s, h.lse).await.map(Some)
            }
            (Exec::Dense(e), Some(seqs), ForwardArgs::Host(h)) => e
                .forward_varlen_async(h.q, h.k, h.v, s, seqs, h.lse)
                .await
                .map(Some),
            (Exec::Dense(e), None, ForwardArgs::Resident(t)) => {
                e.forward_buffers_async(t, s).await.map(|_| None)
            }
            (Exec::Dense(e), Some(seqs), ForwardArgs::Resident(t)) => e
                .forward_varlen_buffers_async(t, s, seqs)
                .await
                .map(|_| None),
            (Exec::Dense(e), None, ForwardArgs::Encode(enc, t)) => {
                e.encode_async(enc, t, s).await.map(|_| None)
            }
        }
    }

    async fn train_args(
        &self,
        exec: &Exec,
        p: &Problem,
        args: ForwardArgs<'_>,
    ) -> Result<(Option<Output>, SavedKind)> {
        let s = p.shape;
        self.check_host_range(&args)?;
        let seqs = p.sequences.as_ref();
        match (exec, args) {
            (_, ForwardArgs::Encode(..)) => Err(FmaError::InvalidConfig {
                what: "training forward",
                value: "an encoder".into(),
                allowed: "host tensors or resident buffers (the backward needs a submitted \
                          forward)"
                    .into(),
            }),
            (Exec::Fma(e), ForwardArgs::Host(h)) => {
                let (out, saved) = match seqs {
                    None => e.forward_train_async(h.q, h.k, h.v, s).await?,
                    Some(seqs) => e.forward_train_varlen_async(h.q, h.k, h.v, s, seqs).await?,
                };
                Ok((Some(out), SavedKind::Fma(saved)))
            }
            (Exec::Dense(e), ForwardArgs::Host(h)) => {
                let (out, saved) = match seqs {
                    None => e.forward_train_async(h.q, h.k, h.v, s).await?,
                    Some(seqs) => e.forward_train_varlen_async(h.q, h.k, h.v, s, seqs).await?,
                };
                Ok((Some(out), SavedKind::Dense(saved)))
            }
            (exec, ForwardArgs::Resident(t)) => {
                // Checked before the forward runs: no LSE buffer, nothing to differentiate.
                let saved = match (exec, seqs) {
                    (Exec::Fma(e), None) => SavedKind::Fma(e.saved_from_buffers(t, s)?),
                    (Exec::Fma(e), Some(q)) => {
                        SavedKind::Fma(e.saved_from_buffers_varlen(t, s, q)?)
                    }
                    (Exec::Dense(e), None) => SavedKind::Dense(e.saved_from_buffers(t, s)?),
                    (Exec::Dense(e), Some(q)) => {
                        SavedKind::Dense(e.saved_from_buffers_varlen(t, s, q)?)
                    }
                };
                self.forward_args(p, ForwardArgs::Resident(t)).await?;
                Ok((None, saved))
            }
        }
    }

    async fn backward_args(
        &self,
        saved: &Saved,
        args: BackwardArgs<'_>,
    ) -> Result<Option<Gradients<f32>>> {
        if saved.owner != self.id {
            return Err(FmaError::NoSavedForward(
                "these tensors were saved by another Attention (whose method or configuration \
                 may differ); run train on the Attention that runs the backward"
                    .into(),
            ));
        }
        if let (Storage::F16, BackwardArgs::Host(dout)) = (self.storage, &args) {
            // Rounded to f16 on upload by the executor: a value beyond f16's range fails here.
            check_f16_range("dO", dout)?;
        }
        // The executor that saved them (its own owner check is then a formality).
        match (&saved.exec, &saved.kind, args) {
            (Exec::Fma(e), SavedKind::Fma(s), BackwardArgs::Host(dout)) => {
                e.backward_async(s, dout).await.map(Some)
            }
            (Exec::Fma(e), SavedKind::Fma(s), BackwardArgs::Resident(dout, g)) => {
                e.backward_buffers_async(s, dout, g).await.map(|_| None)
            }
            (Exec::Dense(e), SavedKind::Dense(s), BackwardArgs::Host(dout)) => {
                e.backward_async(s, dout).await.map(Some)
            }
            (Exec::Dense(e), SavedKind::Dense(s), BackwardArgs::Resident(dout, g)) => {
                e.backward_buffers_async(s, dout, g).await.map(|_| None)
            }
            // An executor keeps its own kind of saved tensors.
            _ => Err(FmaError::NoSavedForward(
                "saved tensors of another method than their executor's".into(),
            )),
        }
    }
}

impl Attention {
    /// Under f16 storage, checks that host Q, K, V hold no finite value beyond f16's range
    /// (the executors round them on upload), before anything is uploaded.
    fn check_host_range(&self, args: &ForwardArgs<'_>) -> Result<()> {
        match (self.storage, args) {
            (Storage::F16, ForwardArgs::Host(h)) => {
                check_f16_range("Q", h.q)?;
                check_f16_range("K", h.k)?;
                check_f16_range("V", h.v)
            }
            _ => Ok(()),
        }
    }
}

/// A variable-length batch recorded into the caller's encoder: not offered (its sequence
/// table is uploaded per call).
fn encoder_varlen() -> FmaError {
    FmaError::InvalidConfig {
        what: "I/O",
        value: "a variable-length batch recorded into the caller's encoder".into(),
        allowed: "host tensors or resident buffers for a variable-length batch; an encoder \
                  for a batch of whole sequences"
            .into(),
    }
}
