//! Moving tensors between the host and the GPU, and submitting one forward's commands inside
//! error scopes so validation failures and out-of-memory come back as typed errors.

use crate::error::{FmaError, Result};
use crate::gpu::readback::{read_f32, storage};
use crate::gpu::split::SplitIo;
use crate::gpu::{GpuContext, Output};
use crate::plan::KernelLimits;
use crate::plan_split::head_exceeds_binding;
use crate::shape::Shape;

/// Q, K, V, O and the LSE of one forward living in GPU buffers (the caller's own, or ones the
/// library allocated for host tensors). Q, K, V, O: (batch, heads, seq, head_dim) f32 with
/// `STORAGE` usage; LSE: (batch, heads, seq) f32.
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
    /// Checks every buffer is a storage buffer large enough for `shape`.
    pub fn check(&self, shape: Shape) -> Result<()> {
        let tensor = shape.elements() as u64 * 4;
        let rows = shape.rows() as u64 * 4;
        let mut all = vec![
            ("Q", self.q, tensor),
            ("K", self.k, tensor),
            ("V", self.v, tensor),
            ("O", self.out, tensor),
        ];
        if let Some(l) = self.lse {
            all.push(("LSE", l, rows));
        }
        for (name, buf, need) in all {
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
        }
        Ok(())
    }
}

/// Q, K, V, O and LSE buffers the library owns for one shape: those of host tensors (made
/// once per shape and reused by later calls), or one chunk of a split head (`gpu::split`).
/// Q, K, V take copies in (`COPY_DST`), O and the LSE copies out (`COPY_SRC`).
pub(crate) struct HostBuffers {
    pub q: wgpu::Buffer,
    pub k: wgpu::Buffer,
    pub v: wgpu::Buffer,
    pub out: wgpu::Buffer,
    pub lse: wgpu::Buffer,
}

impl HostBuffers {
    pub fn new(device: &wgpu::Device, shape: Shape) -> Self {
        Self::with_lse_floats(device, shape, 1)
    }

    /// With `per_row` floats per row in the LSE buffer (a split dense head keeps two there).
    pub fn with_lse_floats(device: &wgpu::Device, shape: Shape, per_row: u64) -> Self {
        let bytes = shape.elements() as u64 * 4;
        let input = wgpu::BufferUsages::COPY_DST;
        let output = wgpu::BufferUsages::COPY_SRC;
        Self {
            q: storage(device, "q", bytes, input),
            k: storage(device, "k", bytes, input),
            v: storage(device, "v", bytes, input),
            out: storage(device, "out", bytes, output),
            lse: storage(device, "lse", shape.rows() as u64 * 4 * per_row, output),
        }
    }

    pub fn upload(&self, queue: &wgpu::Queue, q: &[f32], k: &[f32], v: &[f32]) {
        queue.write_buffer(&self.q, 0, bytemuck::cast_slice(q));
        queue.write_buffer(&self.k, 0, bytemuck::cast_slice(k));
        queue.write_buffer(&self.v, 0, bytemuck::cast_slice(v));
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
/// shared output buffers may be reused by another call as soon as that submit is queued.
pub(crate) struct Staged {
    buffer: wgpu::Buffer,
    shape: Shape,
    want_lse: bool,
}

impl Staged {
    pub fn new(device: &wgpu::Device, shape: Shape, want_lse: bool) -> Self {
        let bytes = (shape.elements() + if want_lse { shape.rows() } else { 0 }) as u64 * 4;
        let buffer = device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("readback"),
            size: bytes.max(4),
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        Self {
            buffer,
            shape,
            want_lse,
        }
    }

    pub fn record(&self, enc: &mut wgpu::CommandEncoder, out: &wgpu::Buffer, lse: &wgpu::Buffer) {
        self.record_from(enc, out, lse, 0);
    }

    /// Like [`Staged::record`], for O and LSE buffers whose first `skip` rows are not part of
    /// the output (the halo of a chunk of a split head).
    pub fn record_from(
        &self,
        enc: &mut wgpu::CommandEncoder,
        out: &wgpu::Buffer,
        lse: &wgpu::Buffer,
        skip: u64,
    ) {
        let o_bytes = self.shape.elements() as u64 * 4;
        let row = self.shape.head_dim as u64 * 4;
        enc.copy_buffer_to_buffer(out, skip * row, &self.buffer, 0, o_bytes);
        if self.want_lse {
            let lse_bytes = self.shape.rows() as u64 * 4;
            enc.copy_buffer_to_buffer(lse, skip * 4, &self.buffer, o_bytes, lse_bytes);
        }
    }

    pub async fn read(self, ctx: &GpuContext) -> Result<Output> {
        let bytes =
            (self.shape.elements() + if self.want_lse { self.shape.rows() } else { 0 }) as u64 * 4;
        // A lost device makes the readback fail: say that rather than how the mapping failed.
        let all = read_f32(&ctx.device, &self.buffer, bytes).await;
        ctx.check_alive()?;
        let mut all = all?;
        let lse = self.want_lse.then(|| all.split_off(self.shape.elements()));
        Ok(Output { o: all, lse })
    }
}

/// Runs of whole heads `(first, count)` over batch*heads such that each run's shape passes
/// `fits` (a plan check): one run when the whole shape fits; otherwise the largest number of
/// heads whose tensors stay within the adapter's binding limits, so a tensor larger than one
/// storage binding is processed in pieces. A single head that does not fit is the error `fits`
/// gives for it (the FMA and dense fronts split such a head along its sequence before they
/// get here: `gpu::split`, `gpu::dense_split`).
fn head_chunks(shape: Shape, fits: impl Fn(Shape) -> Result<()>) -> Result<Vec<(usize, usize)>> {
    let bh = shape.batch_heads();
    match fits(shape) {
        Ok(()) => return Ok(vec![(0, bh)]),
        Err(FmaError::LimitExceeded { .. }) if bh > 1 => {}
        Err(e) => return Err(e),
    }
    let heads = |count| Shape::new(1, count, shape.seq, shape.head_dim);
    fits(heads(1))?;
    // Largest count that fits (the checks are monotone in the number of heads).
    let (mut lo, mut hi) = (1, bh);
    while lo < hi {
        let mid = (lo + hi).div_ceil(2);
        if fits(heads(mid)).is_ok() {
            lo = mid;
        } else {
            hi = mid - 1;
        }
    }
    Ok((0..bh)
        .step_by(lo)
        .map(|first| (first, lo.min(bh - first)))
        .collect())
}

/// Runs `run` on each run of heads of [`head_chunks`] and concatenates the outputs (heads are
/// independent, so the result is the one an unsplit run would give).
async fn forward_in_chunks<'a, F, Fut>(
    shape: Shape,
    chunks: &[(usize, usize)],
    q: &'a [f32],
    k: &'a [f32],
    v: &'a [f32],
    want_lse: bool,
    run: F,
) -> Result<Output>
where
    F: Fn(&'a [f32], &'a [f32], &'a [f32], Shape) -> Fut,
    Fut: std::future::Future<Output = Result<Output>>,
{
    let per_head = shape.seq * shape.head_dim;
    let mut o = Vec::with_capacity(shape.elements());
    let mut lse = Vec::with_capacity(if want_lse { shape.rows() } else { 0 });
    for &(first, count) in chunks {
        let r = first * per_head..(first + count) * per_head;
        let part = run(
            &q[r.clone()],
            &k[r.clone()],
            &v[r],
            Shape::new(1, count, shape.seq, shape.head_dim),
        )
        .await?;
        o.extend_from_slice(&part.o);
        if let Some(l) = part.lse {
            lse.extend_from_slice(&l);
        }
    }
    Ok(Output {
        o,
        lse: want_lse.then_some(lse),
    })
}

/// Checks the shape, and the lengths of host Q, K and V against it.
pub(crate) fn check_host(shape: Shape, q: &[f32], k: &[f32], v: &[f32]) -> Result<()> {
    shape.validate()?;
    shape.check_len("Q", q.len())?;
    shape.check_len("K", k.len())?;
    shape.check_len("V", v.len())
}

/// The host-tensor front of every forward: checks the shape and the slices' lengths, then
/// runs `split` when one head alone exceeds a binding (it cuts the head's sequence:
/// `gpu::split`, `gpu::dense_split`), else `run` once, or once per run of heads when the
/// tensors exceed a binding (see [`head_chunks`]).
#[allow(clippy::too_many_arguments)]
pub(crate) async fn forward_host<'a, F, Fut, S, SFut>(
    shape: Shape,
    q: &'a [f32],
    k: &'a [f32],
    v: &'a [f32],
    want_lse: bool,
    limits: &KernelLimits,
    fits: impl Fn(Shape) -> Result<()>,
    run: F,
    split: S,
) -> Result<Output>
where
    F: Fn(&'a [f32], &'a [f32], &'a [f32], Shape) -> Fut,
    Fut: std::future::Future<Output = Result<Output>>,
    S: FnOnce(SplitIo<'a>) -> SFut,
    SFut: std::future::Future<Output = Result<Output>>,
{
    check_host(shape, q, k, v)?;
    if head_exceeds_binding(shape, limits) {
        return split(SplitIo::Host { q, k, v, want_lse }).await;
    }
    let chunks = head_chunks(shape, fits)?;
    if chunks.len() == 1 {
        return run(q, k, v, shape).await;
    }
    forward_in_chunks(shape, &chunks, q, k, v, want_lse, run).await
}
