//! Tensors on the GPU: the caller's ([`GpuTensors`]), the library's own for host tensors
//! ([`HostBuffers`]), their readback ([`Staged`]), and the error scopes around one submit so
//! validation failures and out-of-memory come back as typed errors ([`Scopes`]).
//!
//! Host tensors are f32 slices whatever the storage: under [`Storage::F16`] the library's own
//! buffers hold f16 elements, rounded on upload ([`host_bytes`]) and widened on readback
//! ([`widen`]), so every host path (whole tensors, runs of heads, groups of sequences, the
//! chunks of a split head, a training forward's saved tensors) runs the f16 kernels on f16
//! buffers. The LSE is f32 always.

use std::borrow::Cow;

use crate::error::{FmaError, Result};
use crate::gpu::engine::buffers::{read_f32, storage};
use crate::gpu::engine::context::GpuContext;
use crate::shape::Shape;
use crate::storage::Storage;

/// Q, K, V, O and the LSE of one forward living in GPU buffers (the caller's own, or ones the
/// library allocated for host tensors). Q, K, V, O: (batch, heads, seq, head_dim) f32 with
/// `STORAGE` usage (f16 under [`crate::Storage::F16`]); LSE: (batch, heads, seq) f32.
#[derive(Clone, Copy, Debug)]
pub struct GpuTensors<'a> {
    /// Queries, read.
    pub q: &'a wgpu::Buffer,
    /// Keys, read.
    pub k: &'a wgpu::Buffer,
    /// Values, read.
    pub v: &'a wgpu::Buffer,
    /// Output O, written.
    pub out: &'a wgpu::Buffer,
    /// Per-row log-sum-exp, written when given.
    pub lse: Option<&'a wgpu::Buffer>,
}

impl GpuTensors<'_> {
    /// Checks every buffer is a storage buffer large enough for `shape` (f32 elements).
    pub fn check(&self, shape: Shape) -> Result<()> {
        self.check_as(shape, Storage::F32)
    }

    /// Checks every buffer is a storage buffer large enough for `shape`, Q, K, V and O with
    /// elements of `storage` (the LSE is f32 always).
    pub fn check_as(&self, shape: Shape, storage: Storage) -> Result<()> {
        let tensor = shape.elements() as u64 * storage.bytes();
        let kv = shape.kv_elements() as u64 * storage.bytes();
        let rows = shape.rows() as u64 * 4;
        let mut all = vec![
            ("Q", self.q, tensor),
            ("K", self.k, kv),
            ("V", self.v, kv),
            ("O", self.out, tensor),
        ];
        if let Some(l) = self.lse {
            all.push(("LSE", l, rows));
        }
        for (name, buf, need) in all {
            check_storage(name, buf, need, shape)?;
        }
        Ok(())
    }

    /// The LSE buffer to write: the caller's, or a scratch one of `shape`'s rows when the
    /// caller wants none (the passes always write an LSE). The scratch may be dropped once
    /// recorded: wgpu keeps a buffer alive while a recorded command uses it.
    pub(crate) fn lse_or_scratch(&self, device: &wgpu::Device, shape: Shape) -> wgpu::Buffer {
        self.lse.cloned().unwrap_or_else(|| {
            storage(
                device,
                "lse (unused)",
                shape.rows() as u64 * 4,
                wgpu::BufferUsages::empty(),
            )
        })
    }
}

/// Checks that a caller's buffer named `name` has `STORAGE` usage and at least `need` bytes
/// (for `shape`, which the error names).
pub(crate) fn check_storage(name: &str, buf: &wgpu::Buffer, need: u64, shape: Shape) -> Result<()> {
    if !buf.usage().contains(wgpu::BufferUsages::STORAGE) {
        return Err(FmaError::ShapeMismatch {
            what: format!("{name} buffer usage"),
            expected: "a buffer created with BufferUsages::STORAGE".into(),
            got: format!("{:?}", buf.usage()),
        });
    }
    if buf.size() < need {
        return Err(FmaError::ShapeMismatch {
            what: format!("{name} buffer"),
            expected: format!("at least {need} bytes for {shape}"),
            got: format!("{} bytes", buf.size()),
        });
    }
    Ok(())
}

/// Bytes of a buffer of `elements` values of `storage`: whole 4-byte words (wgpu writes and
/// copies words; an f16 tensor of an odd length ends in half a word of padding).
pub(crate) fn tensor_bytes(elements: usize, storage: Storage) -> u64 {
    (elements as u64 * storage.bytes()).next_multiple_of(4)
}

/// Host values `x` as the bytes of `storage`, padded to whole words: f32 as they are, f16
/// rounded to nearest (ties to even; the entry point has checked the range,
/// [`crate::storage::check_f16_range`], so no finite value becomes an infinity unasked).
pub(crate) fn host_bytes(x: &[f32], storage: Storage) -> Cow<'_, [u8]> {
    match storage {
        Storage::F32 => Cow::Borrowed(bytemuck::cast_slice(x)),
        Storage::F16 => {
            let mut bits: Vec<u16> = x
                .iter()
                .map(|&v| half::f16::from_f32(v).to_bits())
                .collect();
            bits.resize(x.len().next_multiple_of(2), 0);
            Cow::Owned(bytemuck::cast_slice(&bits).to_vec())
        }
    }
}

/// Host values `x` as a buffer of `storage` holds them: f32 as they are, f16 rounded (what the
/// kernels saw, for what the host computes beside them).
pub(crate) fn stored_values(x: &[f32], storage: Storage) -> Cow<'_, [f32]> {
    match storage {
        Storage::F32 => Cow::Borrowed(x),
        Storage::F16 => Cow::Owned(crate::storage::round_to_f16(x)),
    }
}

/// The first `len` values of `storage` in `words` (a buffer read back as 4-byte words),
/// widened to f32 (exactly).
pub(crate) fn widen(mut words: Vec<f32>, len: usize, storage: Storage) -> Vec<f32> {
    match storage {
        Storage::F32 => {
            words.truncate(len);
            words
        }
        Storage::F16 => {
            let bits: &[u16] = bytemuck::cast_slice(&words);
            crate::storage::from_f16_bits(&bits[..len])
        }
    }
}

/// Q, K, V, O and LSE buffers the library owns: those of host tensors (in a [`HostPool`],
/// reused by later calls), or one chunk of a split head (`gpu/fma/split.rs`, `gpu/dense/split.rs`).
/// Q, K, V take copies in (`COPY_DST`), O and the LSE copies out (`COPY_SRC`). Q, K, V, O
/// hold elements of `storage`.
pub(crate) struct HostBuffers {
    pub q: wgpu::Buffer,
    pub k: wgpu::Buffer,
    pub v: wgpu::Buffer,
    pub out: wgpu::Buffer,
    pub lse: wgpu::Buffer,
    pub storage: Storage,
}

impl HostBuffers {
    pub fn new(device: &wgpu::Device, shape: Shape, storage: Storage) -> Self {
        Self::with_bytes(device, Bytes::of(shape, 1, storage), storage)
    }

    fn with_bytes(device: &wgpu::Device, b: Bytes, storage: Storage) -> Self {
        let input = wgpu::BufferUsages::COPY_DST;
        let output = wgpu::BufferUsages::COPY_SRC;
        Self {
            q: super::buffers::storage(device, "q", b.q, input),
            k: super::buffers::storage(device, "k", b.kv, input),
            v: super::buffers::storage(device, "v", b.kv, input),
            out: super::buffers::storage(device, "out", b.q, output),
            lse: super::buffers::storage(device, "lse", b.lse, output),
            storage,
        }
    }

    /// Writes host Q, K, V (as this pool's storage: [`host_bytes`]).
    pub fn upload(&self, queue: &wgpu::Queue, q: &[f32], k: &[f32], v: &[f32]) {
        queue.write_buffer(&self.q, 0, &host_bytes(q, self.storage));
        queue.write_buffer(&self.k, 0, &host_bytes(k, self.storage));
        queue.write_buffer(&self.v, 0, &host_bytes(v, self.storage));
    }

    pub fn tensors(&self) -> GpuTensors<'_> {
        GpuTensors {
            q: &self.q,
            k: &self.k,
            v: &self.v,
            out: &self.out,
            lse: Some(&self.lse),
        }
    }
}

/// Bytes of each [`HostBuffers`] buffer: Q and O, K and V, the LSE.
#[derive(Clone, Copy, PartialEq, Eq)]
struct Bytes {
    q: u64,
    kv: u64,
    lse: u64,
}

impl Bytes {
    fn of(shape: Shape, lse_floats_per_row: u64, storage: Storage) -> Self {
        Self {
            q: tensor_bytes(shape.elements(), storage),
            kv: tensor_bytes(shape.kv_elements(), storage),
            lse: shape.rows() as u64 * 4 * lse_floats_per_row,
        }
    }

    fn holds(&self, need: &Bytes) -> bool {
        self.q >= need.q && self.kv >= need.kv && self.lse >= need.lse
    }
}

/// The buffers of host tensors, kept between calls and grown by capacity: a call whose shape
/// fits what is there (any shape no larger than one seen before) allocates nothing. Q, K, V, O
/// hold elements of the executor's storage.
#[derive(Default)]
pub(crate) struct HostPool {
    bufs: Option<(HostBuffers, Bytes)>,
}

impl HostPool {
    /// Buffers that hold `shape`'s tensors of `storage`, each at most `cap` bytes unless
    /// `shape` needs more (the plan has checked it does not).
    pub fn fit(
        &mut self,
        device: &wgpu::Device,
        shape: Shape,
        cap: u64,
        storage: Storage,
    ) -> &HostBuffers {
        let need = Bytes::of(shape, 1, storage);
        if !self
            .bufs
            .as_ref()
            .is_some_and(|(b, have)| b.storage == storage && have.holds(&need))
        {
            let have = self.bufs.take().map(|(_, b)| b);
            let grow =
                |old: Option<u64>, new: u64| old.map_or(new, |o| (o + o / 2).min(cap).max(new));
            let b = Bytes {
                q: grow(have.map(|h| h.q), need.q),
                kv: grow(have.map(|h| h.kv), need.kv),
                lse: grow(have.map(|h| h.lse), need.lse),
            };
            self.bufs = Some((HostBuffers::with_bytes(device, b, storage), b));
        }
        let (bufs, _) = self
            .bufs
            .get_or_insert_with(|| (HostBuffers::with_bytes(device, need, storage), need));
        bufs
    }
}

/// Validation and out-of-memory error scopes around the recording and submission of a forward
/// (thread-local in wgpu, so threads sharing a device do not see each other's errors).
pub(crate) struct Scopes {
    invalid: wgpu::ErrorScopeGuard,
    oom: wgpu::ErrorScopeGuard,
}

impl Scopes {
    pub fn push(ctx: &GpuContext) -> Result<Self> {
        ctx.check_alive()?;
        let oom = ctx.device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
        let invalid = ctx.device.push_error_scope(wgpu::ErrorFilter::Validation);
        Ok(Self { invalid, oom })
    }

    /// Pops both scopes (innermost first) and turns a captured error into [`FmaError::Gpu`].
    pub async fn pop(self, ctx: &GpuContext, stage: &str) -> Result<()> {
        let invalid = self.invalid.pop().await;
        let oom = self.oom.pop().await;
        // A loss explains whatever else went wrong: report it first.
        ctx.check_alive()?;
        match invalid.or(oom) {
            Some(e) => Err(scope_error(stage, e)),
            None => Ok(()),
        }
    }
}

/// The typed error of what an error scope caught during `stage`.
fn scope_error(stage: &str, e: wgpu::Error) -> FmaError {
    let (stage, message) = (stage.to_string(), e.to_string());
    match e {
        wgpu::Error::OutOfMemory { .. } => FmaError::OutOfMemory { stage, message },
        _ => FmaError::Gpu { stage, message },
    }
}

/// A staging buffer that receives O (and the LSE) in the same submit as the forward, so the
/// shared output buffers may be reused by another call as soon as that submit is queued. O
/// holds elements of `storage` (widened on [`Staged::read`]), the LSE f32 after O's words.
pub(crate) struct Staged {
    buffer: wgpu::Buffer,
    shape: Shape,
    want_lse: bool,
    storage: Storage,
}

impl Staged {
    /// The staging of an O of `storage`.
    pub fn of(device: &wgpu::Device, shape: Shape, want_lse: bool, storage: Storage) -> Self {
        let buffer = device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("readback"),
            size: Self::bytes(shape, want_lse, storage).max(4),
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        Self {
            buffer,
            shape,
            want_lse,
            storage,
        }
    }

    /// O's words, then the LSE's.
    fn bytes(shape: Shape, want_lse: bool, storage: Storage) -> u64 {
        tensor_bytes(shape.elements(), storage) + if want_lse { shape.rows() as u64 * 4 } else { 0 }
    }

    pub fn record(&self, enc: &mut wgpu::CommandEncoder, out: &wgpu::Buffer, lse: &wgpu::Buffer) {
        self.record_from(enc, out, lse, 0);
    }

    /// Like [`Staged::record`], for O and LSE buffers whose first `skip` rows are not part of
    /// the output (the halo of a chunk of a split head; f16 rows of an even head_dim, so the
    /// copy starts on a word: `fma::split` refuses an odd one).
    pub fn record_from(
        &self,
        enc: &mut wgpu::CommandEncoder,
        out: &wgpu::Buffer,
        lse: &wgpu::Buffer,
        skip: u64,
    ) {
        let o_bytes = tensor_bytes(self.shape.elements(), self.storage);
        let row = self.shape.head_dim as u64 * self.storage.bytes();
        enc.copy_buffer_to_buffer(out, skip * row, &self.buffer, 0, o_bytes);
        if self.want_lse {
            let lse_bytes = self.shape.rows() as u64 * 4;
            enc.copy_buffer_to_buffer(lse, skip * 4, &self.buffer, o_bytes, lse_bytes);
        }
    }

    pub async fn read(self, ctx: &GpuContext) -> Result<Output> {
        let bytes = Self::bytes(self.shape, self.want_lse, self.storage);
        // A lost device makes the readback fail: say that rather than how the mapping failed.
        let all = read_f32(&ctx.device, &self.buffer, bytes).await;
        ctx.check_alive()?;
        let mut all = all?;
        let o_words = (tensor_bytes(self.shape.elements(), self.storage) / 4) as usize;
        let lse = self.want_lse.then(|| all.split_off(o_words));
        let o = widen(all, self.shape.elements(), self.storage);
        Ok(Output { o, lse })
    }
}

/// Host-side result of a forward: O of shape (batch, heads, seq, head_dim) and, on request,
/// the per-row log-sum-exp of shape (batch, heads, seq).
#[derive(Clone, Debug)]
pub struct Output {
    /// Attention output, (batch, heads, seq, head_dim).
    pub o: Vec<f32>,
    /// LSE, (batch, heads, seq), when asked for.
    pub lse: Option<Vec<f32>>,
}

/// Gradient buffers of the learned weights, every level the sequence uses concatenated in
/// level order (the layout of the forward's weight buffers): `wk`, `wv` (and `wq`) hold each
/// level's (head_dim, p, w_l) gradient (2D grid: (head_dim, p, s_l, s_l)), `bk`, `bv` (and
/// `bq`) each level's (head_dim, p); f32, `STORAGE` usage. [`crate::gpu::Attention::backward_plan`]
/// gives the element counts (`weight_elements`, `bias_elements`).
#[derive(Clone, Copy, Debug)]
pub struct WeightGradTensors<'a> {
    /// dWK of levels 1..=L, written.
    pub wk: &'a wgpu::Buffer,
    /// dWV of levels 1..=L, written.
    pub wv: &'a wgpu::Buffer,
    /// dbK of levels 1..=L, written.
    pub bk: &'a wgpu::Buffer,
    /// dbV of levels 1..=L, written.
    pub bv: &'a wgpu::Buffer,
    /// Coarse queries: dWQ and dbQ of levels 1..=L, written (`None` skips them; fine queries
    /// have none and ignore this).
    pub queries: Option<(&'a wgpu::Buffer, &'a wgpu::Buffer)>,
}

/// Where a backward (FMA's or dense attention's) writes: dQ of Q's shape (batch, heads, seq,
/// head_dim), dK and dV of K's (batch, kv_heads, seq_kv, head_dim), f32 buffers with `STORAGE`
/// usage (f16 under [`crate::Storage::F16`]); in FMA's Learned mode (f32 always) optionally the weights' gradients (summed over batch and
/// heads). Every element is written (none is accumulated into).
#[derive(Clone, Copy, Debug)]
pub struct GradTensors<'a> {
    /// dL/dQ, written.
    pub dq: &'a wgpu::Buffer,
    /// dL/dK, written.
    pub dk: &'a wgpu::Buffer,
    /// dL/dV, written.
    pub dv: &'a wgpu::Buffer,
    /// dL/dW, dL/db of the learned weights (Learned mode only; `None` skips them).
    pub weights: Option<WeightGradTensors<'a>>,
}

/// What a backward needs of its forward, on the GPU: Q, K, V, O and the LSE. The FMA and the
/// dense executors' saved handles (`Saved`, `DenseSaved`) each hold one, beside their shape
/// and owner.
#[derive(Clone, Debug)]
pub(crate) struct SavedTensors {
    pub q: wgpu::Buffer,
    pub k: wgpu::Buffer,
    pub v: wgpu::Buffer,
    pub o: wgpu::Buffer,
    pub lse: wgpu::Buffer,
    /// The element type of Q, K, V and O.
    pub storage: Storage,
}

impl SavedTensors {
    /// Buffers for a forward of `shape` with host Q, K, V uploaded into them as `storage` (O
    /// and the LSE to be written by the forward and read back by
    /// [`SavedTensors::read_outputs`]).
    pub fn upload(
        ctx: &GpuContext,
        shape: Shape,
        (q, k, v): (&[f32], &[f32], &[f32]),
        storage: Storage,
    ) -> Self {
        let device = &ctx.device;
        let bytes = tensor_bytes(shape.elements(), storage);
        let kv_bytes = tensor_bytes(shape.kv_elements(), storage);
        let input = wgpu::BufferUsages::COPY_DST;
        let output = wgpu::BufferUsages::COPY_SRC;
        let buffer = super::buffers::storage;
        let saved = Self {
            q: buffer(device, "saved q", bytes, input),
            k: buffer(device, "saved k", kv_bytes, input),
            v: buffer(device, "saved v", kv_bytes, input),
            o: buffer(device, "saved o", bytes, output),
            lse: buffer(device, "saved lse", shape.rows() as u64 * 4, output),
            storage,
        };
        ctx.queue.write_buffer(&saved.q, 0, &host_bytes(q, storage));
        ctx.queue.write_buffer(&saved.k, 0, &host_bytes(k, storage));
        ctx.queue.write_buffer(&saved.v, 0, &host_bytes(v, storage));
        saved
    }

    /// The caller's buffers of a forward already run (`t.lse` must be the buffer that forward
    /// wrote the LSE into: without it there is nothing to differentiate from).
    /// Q, K, V and O hold elements of `storage`.
    pub fn from_buffers(t: GpuTensors<'_>, shape: Shape, storage: Storage) -> Result<Self> {
        t.check_as(shape, storage)?;
        let lse = t.lse.ok_or_else(|| {
            FmaError::NoSavedForward(
                "no LSE buffer: run forward_buffers with GpuTensors::lse set and pass the same \
                 buffers here"
                    .into(),
            )
        })?;
        Ok(Self {
            q: t.q.clone(),
            k: t.k.clone(),
            v: t.v.clone(),
            o: t.out.clone(),
            lse: lse.clone(),
            storage,
        })
    }

    /// The tensors as a forward's I/O.
    pub fn tensors(&self) -> GpuTensors<'_> {
        GpuTensors {
            q: &self.q,
            k: &self.k,
            v: &self.v,
            out: &self.o,
            lse: Some(&self.lse),
        }
    }

    /// Reads O and the LSE of `shape` back (one submit, waited for).
    pub async fn read_outputs(&self, ctx: &GpuContext, shape: Shape) -> Result<Output> {
        let staged = Staged::of(&ctx.device, shape, true, self.storage);
        let mut enc = ctx
            .device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                label: Some("forward_train readback"),
            });
        staged.record(&mut enc, &self.o, &self.lse);
        ctx.queue.submit([enc.finish()]);
        staged.read(ctx).await
    }
}
