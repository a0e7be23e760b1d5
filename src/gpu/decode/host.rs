//! The decoder's calls: steps of host tensors (uploaded into the cache's own buffers, one
//! submit, read back), steps recorded into the caller's encoder, and the prefill (the causal
//! forward's rows, then the cache filled a binding-sized chunk at a time).

use crate::error::{FmaError, Result};
use crate::gpu::engine::buffers::{read_f32, storage};
use crate::gpu::engine::front::check_host;
use crate::gpu::engine::io::{sealed::Sealed, Host};
use crate::gpu::engine::pipelines::poisoned;
use crate::gpu::engine::tensors::{check_storage, GpuTensors, Output, Scopes};
use crate::shape::Shape;
use crate::storage::{from_f16_bits, to_f16_bits, Storage};

use crate::plan::DenseCut;

use super::record::{Io, Work};
use super::{DecodeMode, Decoder};

/// The tensors of one step already on the GPU: Q of shape (batch, heads, C, head_dim), K, V of
/// (batch, kv_heads, C, head_dim), with `STORAGE` usage (K and V also `COPY_SRC` when the
/// cache keeps its history), O of Q's shape and the LSE (batch, heads, C). Q, K, V and O hold
/// elements of [`crate::DecodeConfig::storage`] (f32, or f16: 2 bytes each); the LSE is f32.
#[derive(Clone, Copy, Debug)]
pub struct StepTensors<'a> {
    /// Queries of the new tokens.
    pub q: &'a wgpu::Buffer,
    /// Their keys.
    pub k: &'a wgpu::Buffer,
    /// Their values.
    pub v: &'a wgpu::Buffer,
    /// Output rows, written.
    pub out: &'a wgpu::Buffer,
    /// Their LSE, written.
    pub lse: &'a wgpu::Buffer,
}

/// One step's tensors on the GPU recorded into the caller's encoder ([`Decoder::step`]):
/// `tokens` new tokens per sequence (C; the buffers may be larger).
#[derive(Debug)]
pub struct EncodeStep<'a> {
    /// The caller's encoder.
    pub encoder: &'a mut wgpu::CommandEncoder,
    /// Q, K, V of the new tokens, O and the LSE written.
    pub tensors: StepTensors<'a>,
    /// C, the new tokens per sequence.
    pub tokens: usize,
}

/// A step's tensors as one value.
pub(crate) enum StepArgs<'a> {
    Host(Host<'a>),
    Encode(EncodeStep<'a>),
}

/// The tensors of a decoding step: [`Host`] (returns [`Output`], the LSE always: `Host::lse`
/// does not apply to a step) or [`EncodeStep`] (`()`).
#[allow(private_interfaces)] // sealed: the args enum is the library's own business
pub trait StepIo<'a>: Sealed {
    /// What the step returns.
    type Out;
    #[doc(hidden)]
    fn args(self) -> StepArgs<'a>;
    #[doc(hidden)]
    fn out(out: Option<Output>) -> Self::Out;
}

impl Sealed for EncodeStep<'_> {}

#[allow(private_interfaces)]
impl<'a> StepIo<'a> for Host<'a> {
    type Out = Output;
    fn args(self) -> StepArgs<'a> {
        StepArgs::Host(self)
    }
    fn out(out: Option<Output>) -> Output {
        // The host path always returns its output (`Decoder::step_async`).
        out.unwrap_or(Output {
            o: Vec::new(),
            lse: None,
        })
    }
}

#[allow(private_interfaces)]
impl<'a> StepIo<'a> for EncodeStep<'a> {
    type Out = ();
    fn args(self) -> StepArgs<'a> {
        StepArgs::Encode(self)
    }
    fn out(_: Option<Output>) {}
}

/// `x` as the bytes of the cache's storage: f32 as it is, or rounded to f16 (a finite value
/// beyond f16's range is a typed error naming `name`), padded to whole 4-byte words (queue
/// writes and buffer copies move words).
fn stored_bytes(storage: Storage, name: &str, x: &[f32]) -> Result<Vec<u8>> {
    Ok(match storage {
        Storage::F32 => bytemuck::cast_slice(x).to_vec(),
        Storage::F16 => {
            let mut bits = to_f16_bits(name, x)?;
            bits.resize(bits.len().next_multiple_of(2), 0);
            bytemuck::cast_slice(&bits).to_vec()
        }
    })
}

/// Bytes of `elements` elements of `storage`, rounded up to whole 4-byte words.
fn words_bytes(storage: Storage, elements: usize) -> u64 {
    (elements as u64 * storage.bytes()).next_multiple_of(4)
}

/// A readback buffer that receives a host step's O (of the cache's storage, rounded up to
/// whole words) and its f32 LSE in the step's submit. The buffer is the decoder's kept staging
/// (a step) or a new one (the f16 prefill).
struct Readback {
    buffer: wgpu::Buffer,
    storage: Storage,
    o_elements: usize,
    o_bytes: u64,
    lse_bytes: u64,
}

impl Readback {
    /// Bytes the readback of a step of `shape` takes.
    fn bytes(storage: Storage, shape: Shape) -> u64 {
        words_bytes(storage, shape.elements()) + shape.rows() as u64 * 4
    }

    /// A readback into `buffer` (at least [`Readback::bytes`] long).
    fn new(buffer: wgpu::Buffer, storage: Storage, shape: Shape) -> Self {
        Self {
            buffer,
            storage,
            o_elements: shape.elements(),
            o_bytes: words_bytes(storage, shape.elements()),
            lse_bytes: shape.rows() as u64 * 4,
        }
    }

    /// A readback into a buffer of its own.
    fn fresh(device: &wgpu::Device, storage: Storage, shape: Shape) -> Self {
        let buffer = device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("decode readback"),
            size: Self::bytes(storage, shape).max(4),
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        Self::new(buffer, storage, shape)
    }

    fn record(&self, enc: &mut wgpu::CommandEncoder, out: &wgpu::Buffer, lse: &wgpu::Buffer) {
        enc.copy_buffer_to_buffer(out, 0, &self.buffer, 0, self.o_bytes);
        enc.copy_buffer_to_buffer(lse, 0, &self.buffer, self.o_bytes, self.lse_bytes);
    }

    /// O (widened from f16 where stored so) and the LSE; the buffer is unmapped again.
    async fn read(&self, ctx: &crate::gpu::engine::context::GpuContext) -> Result<Output> {
        let all = read_f32(&ctx.device, &self.buffer, self.o_bytes + self.lse_bytes).await;
        ctx.check_alive()?;
        let mut all = all?;
        let lse = all.split_off((self.o_bytes / 4) as usize);
        let o = match self.storage {
            Storage::F32 => all,
            Storage::F16 => {
                let bits: &[u16] = bytemuck::cast_slice(&all);
                from_f16_bits(&bits[..self.o_elements])
            }
        };
        Ok(Output { o, lse: Some(lse) })
    }
}

impl Decoder {
    fn step_shape(&self, chunk: usize) -> Shape {
        Shape::new(self.cfg.batch, self.cfg.heads, chunk, self.cfg.head_dim)
            .with_kv_heads(self.cfg.kv_heads)
    }

    /// Chunk length of host step tensors of `len` floats each.
    fn chunk_of(&self, len: usize) -> Result<usize> {
        let row = self.cfg.batch * self.cfg.heads * self.cfg.head_dim;
        if len == 0 || !len.is_multiple_of(row) {
            return Err(FmaError::ShapeMismatch {
                what: "step Q (batch, heads, C, head_dim)".into(),
                expected: format!("a positive multiple of {row} floats"),
                got: format!("{len} floats"),
            });
        }
        Ok(len / row)
    }

    /// Appends C tokens to every sequence and attends them to the cache, FMA or exact dense
    /// attention as `mode` says (async: works on the web). The step's tensors: Q (batch,
    /// heads, C, head_dim), K, V (batch, kv_heads, C, head_dim) as host slices ([`Host`]:
    /// returns O of Q's shape and the LSE (batch, heads, C)), or buffers recorded into the
    /// caller's encoder ([`EncodeStep`]: O and the LSE written when it submits).
    pub async fn step_async<'a, I: StepIo<'a>>(&self, mode: DecodeMode, io: I) -> Result<I::Out> {
        let out = match io.args() {
            StepArgs::Host(h) => Some(self.step_host(h.q, h.k, h.v, mode).await?),
            StepArgs::Encode(e) => {
                self.step_encode(e.encoder, e.tensors, e.tokens, mode)
                    .await?;
                None
            }
        };
        Ok(I::out(out))
    }

    /// Blocking [`Decoder::step_async`] (native only).
    #[cfg(not(target_arch = "wasm32"))]
    pub fn step<'a, I: StepIo<'a>>(&self, mode: DecodeMode, io: I) -> Result<I::Out> {
        pollster::block_on(self.step_async(mode, io))
    }

    /// A step of host tensors: upload, record, one submit, read back.
    async fn step_host(&self, q: &[f32], k: &[f32], v: &[f32], mode: DecodeMode) -> Result<Output> {
        self.ctx.check_alive()?;
        let chunk = self.chunk_of(q.len())?;
        let shape = self.step_shape(chunk);
        check_host(shape, q, k, v)?;
        let storage = self.cfg.storage;
        let bytes = words_bytes(storage, shape.elements());
        let kv_bytes = words_bytes(storage, shape.kv_elements());
        let cap = self.limits.binding_bytes();
        if bytes > cap {
            return Err(FmaError::LimitExceeded {
                what: "one step's Q, K or V".into(),
                requested: bytes,
                max: cap,
                unit: "bytes in one storage binding",
                advice: "append fewer tokens per step, or fewer sequences".into(),
            });
        }
        // Rounded before anything is recorded: a value beyond f16's range is a typed error.
        let (q, k, v) = (
            stored_bytes(storage, "Q", q)?,
            stored_bytes(storage, "K", k)?,
            stored_bytes(storage, "V", v)?,
        );
        let pipes = self.pipes().await?;
        let scopes = Scopes::push(&self.ctx)?;
        let staged;
        {
            let mut st = self.state.lock().map_err(poisoned)?;
            let dev = &self.ctx.device;
            // The step tensors and the readback are kept across steps (grown by capacity).
            let (bq, bk, bv) = (
                st.io_at_least(dev, 0, bytes, cap),
                st.io_at_least(dev, 1, kv_bytes, cap),
                st.io_at_least(dev, 2, kv_bytes, cap),
            );
            let (bo, bl) = (
                st.io_at_least(dev, 3, bytes, cap),
                st.io_at_least(dev, 4, shape.rows() as u64 * 4, cap),
            );
            let staging = st.take_staging(dev, Readback::bytes(storage, shape));
            staged = Readback::new(staging, storage, shape);
            self.ctx.queue.write_buffer(&bq, 0, &q);
            self.ctx.queue.write_buffer(&bk, 0, &k);
            self.ctx.queue.write_buffer(&bv, 0, &v);
            let mut enc = dev.create_command_encoder(&wgpu::CommandEncoderDescriptor {
                label: Some("decode step"),
            });
            let io = Io {
                q: Some(&bq),
                k: &bk,
                v: &bv,
                out: Some(&bo),
                lse: Some(&bl),
                chunk,
                in_rows: chunk,
                in_offset: 0,
                seqs: 0..self.cfg.batch,
            };
            let recorded = self.record(
                &mut enc,
                &mut st,
                &pipes,
                &io,
                Work::Attend(mode, DenseCut::default()),
            );
            if let Err(e) = recorded {
                st.return_staging(staged.buffer);
                return Err(e);
            }
            staged.record(&mut enc, &bo, &bl);
            self.ctx.queue.submit([enc.finish()]);
        }
        scopes.pop(&self.ctx, "a decoding step").await?;
        let out = staged.read(&self.ctx).await;
        self.lock()?.return_staging(staged.buffer);
        out
    }

    /// A step of tensors already on the GPU recorded into the caller's encoder (C is not
    /// guessed from the buffers' sizes: `chunk` says it). Checks run first; the step takes
    /// effect when the caller submits, and steps recorded one after another each see their own
    /// positions. A recorded step must be submitted (the decoder counts it as taken).
    async fn step_encode(
        &self,
        enc: &mut wgpu::CommandEncoder,
        t: StepTensors<'_>,
        chunk: usize,
        mode: DecodeMode,
    ) -> Result<()> {
        self.ctx.check_alive()?;
        let shape = self.step_shape(chunk.max(1));
        let eb = self.cfg.storage.bytes();
        let bytes = shape.elements() as u64 * eb;
        let kv_bytes = shape.kv_elements() as u64 * eb;
        for (name, buf, need) in [
            ("Q", t.q, bytes),
            ("K", t.k, kv_bytes),
            ("V", t.v, kv_bytes),
            ("O", t.out, bytes),
            ("LSE", t.lse, shape.rows() as u64 * 4),
        ] {
            check_storage(name, buf, need, shape)?;
        }
        if self.layout.page_tokens > 0 {
            for (name, buf) in [("K", t.k), ("V", t.v)] {
                if !buf.usage().contains(wgpu::BufferUsages::COPY_SRC) {
                    return Err(FmaError::ShapeMismatch {
                        what: format!("{name} buffer usage"),
                        expected:
                            "COPY_SRC as well (the cache copies keys and values into its history)"
                                .into(),
                        got: format!("{:?}", buf.usage()),
                    });
                }
            }
        }
        let pipes = self.pipes().await?;
        let mut st = self.state.lock().map_err(poisoned)?;
        let io = Io {
            q: Some(t.q),
            k: t.k,
            v: t.v,
            out: Some(t.out),
            lse: Some(t.lse),
            chunk,
            in_rows: chunk,
            in_offset: 0,
            seqs: 0..self.cfg.batch,
        };
        self.record(
            enc,
            &mut st,
            &pipes,
            &io,
            Work::Attend(mode, DenseCut::default()),
        )
    }

    /// Appends the first `lengths[b]` tokens of K, V (batch, kv_heads, P, head_dim) to sequence b,
    /// without queries or outputs: the cache of a prompt whose outputs are not needed (or were
    /// computed elsewhere). Sequences of length 0 are not touched. Long prompts go through in
    /// chunks that fit one storage binding; with a window only the last R tokens (the ring)
    /// are uploaded, since no later query reads the ones before.
    pub async fn extend_async(&self, k: &[f32], v: &[f32], lengths: &[usize]) -> Result<()> {
        self.ctx.check_alive()?;
        let (b_n, h, d) = (self.cfg.batch, self.cfg.kv_heads, self.cfg.head_dim);
        let p = self.check_prompt(k, v, lengths)?;
        let cap = self.limits.binding_bytes();
        // Runs of consecutive sequences with the same length go together.
        let mut b = 0;
        while b < b_n {
            let len = lengths[b];
            let mut e = b + 1;
            while e < b_n && lengths[e] == len {
                e += 1;
            }
            if len > 0 {
                let rows = (e - b) * h;
                let per_token = words_bytes(self.cfg.storage, rows * d);
                let chunk = ((cap / per_token) as usize).clamp(1, len);
                let mut off = self.skip_to_ring(b..e, len)?;
                while off < len {
                    let c = chunk.min(len - off);
                    let mut kc = Vec::with_capacity(rows * c * d);
                    let mut vc = Vec::with_capacity(rows * c * d);
                    for r in 0..rows {
                        let base = ((b * h + r) * p + off) * d;
                        kc.extend_from_slice(&k[base..base + c * d]);
                        vc.extend_from_slice(&v[base..base + c * d]);
                    }
                    self.ingest(&kc, &vc, c, b..e).await?;
                    off += c;
                }
            }
            b = e;
        }
        Ok(())
    }

    /// With a window: the first tokens of a prompt of `len` tokens for `seqs` that no later
    /// query reads (all but the ring's last R) advance the sequences' lengths without being
    /// uploaded, so neither the time nor the staging memory of a prompt grows with its length.
    /// Returns how many were skipped (0 without a window). Checks max_len first.
    fn skip_to_ring(&self, seqs: std::ops::Range<usize>, len: usize) -> Result<usize> {
        let l = &self.layout;
        if l.window.is_none() || len <= l.ring {
            return Ok(0);
        }
        let skip = len - l.ring;
        let mut st = self.lock()?;
        for b in seqs.clone() {
            let after = st.lens[b] + len;
            if after > l.max_len {
                return Err(FmaError::LimitExceeded {
                    what: format!("sequence {b} ({} tokens held, {len} appended)", st.lens[b]),
                    requested: after as u64,
                    max: l.max_len as u64,
                    unit: "tokens (the decoder's max_len)",
                    advice: "reset the sequence, or make a decoder with a larger max_len".into(),
                });
            }
        }
        // Every call before this one has submitted its work (host calls submit at once), so
        // the GPU's lengths equal the host's: written as absolute values (both halves).
        for b in seqs {
            let len = st.lens[b] + skip;
            st.write_len(&self.ctx.queue, b, len);
        }
        Ok(skip)
    }

    /// One binding-sized chunk of a prompt into the cache, one submit.
    async fn ingest(
        &self,
        k: &[f32],
        v: &[f32],
        chunk: usize,
        seqs: std::ops::Range<usize>,
    ) -> Result<()> {
        let cap = self.limits.binding_bytes();
        let storage = self.cfg.storage;
        let bytes = words_bytes(storage, k.len());
        let (k, v) = (
            stored_bytes(storage, "K", k)?,
            stored_bytes(storage, "V", v)?,
        );
        let pipes = self.pipes().await?;
        let scopes = Scopes::push(&self.ctx)?;
        {
            let mut st = self.state.lock().map_err(poisoned)?;
            let dev = &self.ctx.device;
            let (bk, bv) = (
                st.io_at_least(dev, 1, bytes, cap),
                st.io_at_least(dev, 2, bytes, cap),
            );
            self.ctx.queue.write_buffer(&bk, 0, &k);
            self.ctx.queue.write_buffer(&bv, 0, &v);
            let mut enc = dev.create_command_encoder(&wgpu::CommandEncoderDescriptor {
                label: Some("decode prefill"),
            });
            let io = Io {
                q: None,
                k: &bk,
                v: &bv,
                out: None,
                lse: None,
                chunk,
                in_rows: chunk,
                in_offset: 0,
                seqs,
            };
            self.record(&mut enc, &mut st, &pipes, &io, Work::Ingest)?;
            self.ctx.queue.submit([enc.finish()]);
        }
        scopes.pop(&self.ctx, "filling the decoding cache").await
    }

    /// Blocking [`Decoder::extend_async`] (native only).
    #[cfg(not(target_arch = "wasm32"))]
    pub fn extend(&self, k: &[f32], v: &[f32], lengths: &[usize]) -> Result<()> {
        pollster::block_on(self.extend_async(k, v, lengths))
    }

    /// The prompt's length P from K, V of (batch, kv_heads, P, head_dim), and the lengths
    /// checked.
    fn check_prompt(&self, k: &[f32], v: &[f32], lengths: &[usize]) -> Result<usize> {
        let (b_n, h, d) = (self.cfg.batch, self.cfg.kv_heads, self.cfg.head_dim);
        if lengths.len() != b_n {
            return Err(FmaError::ShapeMismatch {
                what: "prompt lengths".into(),
                expected: format!("one per sequence ({b_n})"),
                got: lengths.len().to_string(),
            });
        }
        let row = b_n * h * d;
        if !k.len().is_multiple_of(row) || k.len() != v.len() {
            return Err(FmaError::ShapeMismatch {
                what: "prompt K, V (batch, kv_heads, P, head_dim)".into(),
                expected: format!("equal lengths, multiples of {row} floats"),
                got: format!("K {} floats, V {} floats", k.len(), v.len()),
            });
        }
        let p = k.len() / row;
        if let Some((b, &len)) = lengths.iter().enumerate().find(|(_, &len)| len > p) {
            return Err(FmaError::ShapeMismatch {
                what: format!("prompt length of sequence {b}"),
                expected: format!("<= {p} (the tensors' length)"),
                got: len.to_string(),
            });
        }
        Ok(p)
    }

    /// The prompt's outputs and the cache: sequence b's first `lengths[b]` tokens of Q
    /// (batch, heads, P, head_dim), K, V (batch, kv_heads, P, head_dim) go through the causal
    /// forward (FMA, or exact dense attention with [`DecodeMode::Dense`]), and are appended to
    /// the cache as [`Decoder::extend_async`] does. O is (batch, heads, P, head_dim) with zero
    /// rows beyond a sequence's length (LSE -inf there). Sequences must be empty (fresh, or
    /// [`Decoder::reset`]) when prefilled.
    pub async fn prefill_async(
        &self,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        lengths: &[usize],
        mode: DecodeMode,
    ) -> Result<Output> {
        self.ctx.check_alive()?;
        let p = self.check_prompt(k, v, lengths)?;
        let (b_n, h, d) = (self.cfg.batch, self.cfg.heads, self.cfg.head_dim);
        let hk = self.cfg.kv_heads;
        if q.len() != k.len() * self.cfg.group() {
            return Err(FmaError::ShapeMismatch {
                what: "prompt Q (batch, heads, P, head_dim)".into(),
                expected: format!(
                    "{} floats, K's times heads / kv_heads",
                    k.len() * self.cfg.group()
                ),
                got: q.len().to_string(),
            });
        }
        if mode == DecodeMode::Fma {
            self.cfg.check_fma_window()?;
        }
        let lens = self.lens()?;
        if let Some(b) = (0..b_n).find(|&b| lengths[b] > 0 && lens[b] > 0) {
            return Err(FmaError::ShapeMismatch {
                what: format!("sequence {b} to prefill"),
                expected: "an empty sequence (reset it first)".into(),
                got: format!("{} tokens held", lens[b]),
            });
        }
        let mut o = vec![0f32; q.len()];
        let mut lse = vec![f32::NEG_INFINITY; b_n * h * p];
        for b in 0..b_n {
            let len = lengths[b];
            if len == 0 {
                continue;
            }
            // Sequence b's first len tokens of each of `heads` heads.
            let slice = |x: &[f32], heads: usize| -> Vec<f32> {
                (0..heads)
                    .flat_map(|r| {
                        let base = ((b * heads + r) * p) * d;
                        x[base..base + len * d].to_vec()
                    })
                    .collect()
            };
            let shape = Shape::new(1, h, len, d).with_kv_heads(hk);
            let (qs, ks, vs) = (slice(q, h), slice(k, hk), slice(v, hk));
            let out = match (self.cfg.storage, mode) {
                (Storage::F16, _) => self.prefill_half(&qs, &ks, &vs, shape, mode).await?,
                (_, DecodeMode::Fma) => self.fma.forward_async(&qs, &ks, &vs, shape, true).await?,
                (_, DecodeMode::Dense) => {
                    self.dense.forward_async(&qs, &ks, &vs, shape, true).await?
                }
            };
            let out_lse = out.lse.unwrap_or_default();
            for r in 0..h {
                let base = ((b * h + r) * p) * d;
                o[base..base + len * d].copy_from_slice(&out.o[r * len * d..(r + 1) * len * d]);
                lse[(b * h + r) * p..(b * h + r) * p + len]
                    .copy_from_slice(&out_lse[r * len..(r + 1) * len]);
            }
        }
        self.extend_async(k, v, lengths).await?;
        Ok(Output { o, lse: Some(lse) })
    }

    /// The causal forward of one sequence's prompt under f16 storage: the executors' f16 path
    /// is their resident one (their host calls upload f32), so Q, K, V are rounded into f16
    /// buffers here, the forward runs on them, and O (f16, widened) and the LSE are read back.
    async fn prefill_half(
        &self,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        shape: Shape,
        mode: DecodeMode,
    ) -> Result<Output> {
        let dev = &self.ctx.device;
        let (q, k, v) = (
            stored_bytes(Storage::F16, "Q", q)?,
            stored_bytes(Storage::F16, "K", k)?,
            stored_bytes(Storage::F16, "V", v)?,
        );
        let input = |label: &str, bytes: &[u8]| {
            let b = storage(dev, label, bytes.len() as u64, wgpu::BufferUsages::COPY_DST);
            self.ctx.queue.write_buffer(&b, 0, bytes);
            b
        };
        let (bq, bk, bv) = (
            input("prefill q", &q),
            input("prefill k", &k),
            input("prefill v", &v),
        );
        let out_usage = wgpu::BufferUsages::COPY_SRC;
        let bo = storage(
            dev,
            "prefill o",
            words_bytes(Storage::F16, shape.elements()),
            out_usage,
        );
        let bl = storage(dev, "prefill lse", shape.rows() as u64 * 4, out_usage);
        let t = GpuTensors {
            q: &bq,
            k: &bk,
            v: &bv,
            out: &bo,
            lse: Some(&bl),
        };
        match mode {
            DecodeMode::Fma => self.fma.forward_buffers_async(t, shape).await?,
            DecodeMode::Dense => self.dense.forward_buffers_async(t, shape).await?,
        }
        let staged = Readback::fresh(dev, Storage::F16, shape);
        let mut enc = dev.create_command_encoder(&wgpu::CommandEncoderDescriptor {
            label: Some("decode prefill readback"),
        });
        staged.record(&mut enc, &bo, &bl);
        self.ctx.queue.submit([enc.finish()]);
        staged.read(&self.ctx).await
    }

    /// Blocking [`Decoder::prefill_async`] (native only).
    #[cfg(not(target_arch = "wasm32"))]
    pub fn prefill(
        &self,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        lengths: &[usize],
        mode: DecodeMode,
    ) -> Result<Output> {
        pollster::block_on(self.prefill_async(q, k, v, lengths, mode))
    }
}
