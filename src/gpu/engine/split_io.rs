//! What the split executors (one head over a storage binding, `fma::split`, `dense::split`)
//! share: where their tensors come from and go ([`SplitIo`]), the per-head submit loop
//! ([`per_head`]) and the check that the caller's buffers allow the copies they make.

use std::ops::Range;

use crate::error::{FmaError, Result};
use crate::gpu::engine::context::GpuContext;
use crate::gpu::engine::tensors::Output;
use crate::gpu::engine::tensors::{host_bytes, GpuTensors, Scopes, Staged};
use crate::shape::Shape;
use crate::storage::Storage;

/// Where a split forward's Q, K and V come from and where O and the LSE go.
#[derive(Clone, Copy)]
pub(crate) enum SplitIo<'a> {
    /// Host tensors (batch, heads, seq, head_dim); O (and the LSE) are read back.
    Host {
        q: &'a [f32],
        k: &'a [f32],
        v: &'a [f32],
        want_lse: bool,
    },
    /// The caller's buffers: Q, K, V need `COPY_SRC`, O and the LSE `COPY_DST` besides
    /// `STORAGE`; O (and the LSE when given) are written there.
    Device(GpuTensors<'a>),
}

impl SplitIo<'_> {
    /// Puts tokens `tokens` of query head `h` of Q, and of its K/V head `h / shape.group()` of
    /// K and V, into `dst` (Q, K, V, elements of `storage`): written through the queue (before
    /// the next submit) from host slices, or copied in `enc` from the caller's buffers (f16
    /// rows of an even head_dim: [`check_split_storage`]).
    pub(crate) fn fill(
        &self,
        queue: &wgpu::Queue,
        enc: &mut wgpu::CommandEncoder,
        (shape, h, storage): (Shape, usize, Storage),
        tokens: Range<usize>,
        dst: [&wgpu::Buffer; 3],
    ) {
        let (n, d) = (shape.seq, shape.head_dim);
        let rows_of = |head: usize| (head * n + tokens.start) * d..(head * n + tokens.end) * d;
        let ranges = [
            rows_of(h),
            rows_of(h / shape.group()),
            rows_of(h / shape.group()),
        ];
        match self {
            SplitIo::Host { q, k, v, .. } => {
                for ((src, dst), range) in [q, k, v].into_iter().zip(dst).zip(ranges) {
                    queue.write_buffer(dst, 0, &host_bytes(&src[range], storage));
                }
            }
            SplitIo::Device(t) => {
                for ((src, dst), range) in [t.q, t.k, t.v].into_iter().zip(dst).zip(ranges) {
                    let e = storage.bytes();
                    let (at, bytes) = (range.start as u64 * e, range.len() as u64 * e);
                    enc.copy_buffer_to_buffer(src, at, dst, 0, bytes);
                }
            }
        }
    }
}

/// Runs `head` for every head of `shape`, each inside error scopes (`head` records and
/// submits one head and returns its chunks' readbacks), and concatenates the host outputs
/// (an empty [`Output`] for [`SplitIo::Device`]).
pub(crate) async fn per_head(
    ctx: &GpuContext,
    io: SplitIo<'_>,
    shape: Shape,
    stage: &str,
    mut head: impl FnMut(usize) -> Result<Vec<Staged>>,
) -> Result<Output> {
    let want_lse = matches!(io, SplitIo::Host { want_lse: true, .. });
    let mut o = Vec::new();
    let mut lse = Vec::new();
    for h in 0..shape.batch_heads() {
        let scopes = Scopes::push(ctx)?;
        let staged = head(h)?;
        scopes.pop(ctx, stage).await?;
        for part in staged {
            let part = part.read(ctx).await?;
            o.extend_from_slice(&part.o);
            lse.extend(part.lse.into_iter().flatten());
        }
    }
    Ok(Output {
        o,
        lse: want_lse.then_some(lse),
    })
}

/// Checks the caller's buffers allow the copies a split forward makes.
pub(crate) fn check_copy_usage(t: &GpuTensors<'_>) -> Result<()> {
    let need = |name: &str, buf: &wgpu::Buffer, usage: wgpu::BufferUsages, flag: &str| {
        if buf.usage().contains(usage) {
            Ok(())
        } else {
            Err(FmaError::ShapeMismatch {
                what: format!("{name} buffer usage"),
                expected: format!(
                    "STORAGE | {flag}: tensors larger than one storage binding are copied in \
                     pieces"
                ),
                got: format!("{:?}", buf.usage()),
            })
        }
    };
    let (src, dst) = (wgpu::BufferUsages::COPY_SRC, wgpu::BufferUsages::COPY_DST);
    need("Q", t.q, src, "COPY_SRC")?;
    need("K", t.k, src, "COPY_SRC")?;
    need("V", t.v, src, "COPY_SRC")?;
    need("O", t.out, dst, "COPY_DST")?;
    t.lse.map_or(Ok(()), |l| need("LSE", l, dst, "COPY_DST"))
}

/// Checks that a split head of `shape` can copy rows of `storage`: f16 rows of an odd
/// head_dim start mid-word, which wgpu's copies (whole 4-byte words) cannot address.
pub(crate) fn check_split_storage(shape: Shape, storage: Storage) -> Result<()> {
    if storage == Storage::F32 || shape.head_dim.is_multiple_of(2) {
        return Ok(());
    }
    Err(FmaError::InvalidConfig {
        what: "head_dim",
        value: format!(
            "{} with f16 storage, one head split across bindings",
            shape.head_dim
        ),
        allowed: "an even head_dim for an f16 head longer than one storage binding (its chunks \
                  are copied in whole 4-byte words), or f32 storage, or shorter heads"
            .into(),
    })
}

/// Copies `rows` rows of a chunk's O (head_dim `d`, elements of `storage`) and LSE into the
/// caller's `dst` at row `first`, past the chunk's first `skip` (halo) rows.
pub(crate) fn copy_rows_out(
    enc: &mut wgpu::CommandEncoder,
    (out, lse): (&wgpu::Buffer, &wgpu::Buffer),
    dst: &GpuTensors<'_>,
    (first, skip, rows): (u64, u64, u64),
    (d, storage): (usize, Storage),
) {
    let row = d as u64 * storage.bytes();
    enc.copy_buffer_to_buffer(out, skip * row, dst.out, first * row, rows * row);
    if let Some(l) = dst.lse {
        enc.copy_buffer_to_buffer(lse, skip * 4, l, first * 4, rows * 4);
    }
}
