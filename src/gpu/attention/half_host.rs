//! Host tensors under f16 storage (issue 29): Q, K, V rounded to f16 on the host and uploaded
//! into f16 buffers, the forward run on them as resident tensors, O read back as f16 and
//! widened to f32 (exact), the LSE read back as the f32 it is; likewise dO and the gradients
//! of a backward. The executors then have one f16
//! path, the resident one; their f32 host paths (buffer pools, runs of heads) stay as they were.
//!
//! Buffers are made per call (no pool): f16 host calls are the CLI's and the tests' use, where
//! an allocation per call is noise next to the upload.

use wgpu::util::DeviceExt;

use crate::error::Result;
use crate::gpu::engine::buffers::{read_f32, storage};
use crate::gpu::engine::context::GpuContext;
use crate::gpu::engine::io::Host;
use crate::gpu::engine::tensors::{GpuTensors, GradTensors, Output};
use crate::gradients::Gradients;
use crate::shape::Shape;
use crate::storage::{from_f16_bits, to_f16_bits};

/// f16 Q, K, V, O and the f32 LSE of one host call.
pub(super) struct HalfHost {
    q: wgpu::Buffer,
    k: wgpu::Buffer,
    v: wgpu::Buffer,
    out: wgpu::Buffer,
    lse: wgpu::Buffer,
}

/// An f16 storage buffer holding `bits`, padded to whole 4-byte words (wgpu copies words).
fn upload(device: &wgpu::Device, label: &str, bits: &[u16]) -> wgpu::Buffer {
    let mut words = bits.to_vec();
    // At least 16 bytes, as every storage buffer of the library (`buffers::storage`).
    words.resize(bits.len().next_multiple_of(2).max(8), 0);
    device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
        label: Some(label),
        contents: bytemuck::cast_slice(&words),
        usage: wgpu::BufferUsages::STORAGE,
    })
}

impl HalfHost {
    /// Rounds `h`'s tensors to f16 (a finite value beyond f16's range is a typed error, before
    /// anything is uploaded) and uploads them; O and the LSE get buffers of `shape`.
    pub fn new(ctx: &GpuContext, shape: Shape, h: &Host<'_>) -> Result<Self> {
        shape.check_len("Q", h.q.len())?;
        shape.check_kv_len("K", h.k.len())?;
        shape.check_kv_len("V", h.v.len())?;
        let (q, k, v) = (
            to_f16_bits("Q", h.q)?,
            to_f16_bits("K", h.k)?,
            to_f16_bits("V", h.v)?,
        );
        let d = &ctx.device;
        let out_usage = wgpu::BufferUsages::COPY_SRC;
        Ok(Self {
            q: upload(d, "q f16", &q),
            k: upload(d, "k f16", &k),
            v: upload(d, "v f16", &v),
            out: storage(d, "out f16", shape.elements() as u64 * 2, out_usage),
            lse: storage(d, "lse", shape.rows() as u64 * 4, out_usage),
        })
    }

    /// The tensors as resident I/O.
    pub fn tensors(&self) -> GpuTensors<'_> {
        GpuTensors {
            q: &self.q,
            k: &self.k,
            v: &self.v,
            out: &self.out,
            lse: Some(&self.lse),
        }
    }

    /// O (widened to f32) and, when `want_lse`, the LSE of `shape`, after the forward was
    /// submitted (one more submit, waited for).
    pub async fn read(&self, ctx: &GpuContext, shape: Shape, want_lse: bool) -> Result<Output> {
        let lse = if want_lse { Some(&self.lse) } else { None };
        let mut words = read_words(ctx, [Some(&self.out), lse]).await?;
        Ok(Output {
            o: f16_values(&words[0], shape.elements()),
            lse: want_lse.then(|| words.swap_remove(1)[..shape.rows()].to_vec()),
        })
    }
}

/// The whole of each given buffer as 4-byte words (one copy each into one staging buffer, one
/// submit, waited for); an empty vector for `None`.
async fn read_words<const N: usize>(
    ctx: &GpuContext,
    bufs: [Option<&wgpu::Buffer>; N],
) -> Result<Vec<Vec<f32>>> {
    let sizes = bufs.map(|b| b.map_or(0, |b| b.size()));
    let total: u64 = sizes.iter().sum();
    let staging = ctx.device.create_buffer(&wgpu::BufferDescriptor {
        label: Some("f16 readback"),
        size: total.max(4),
        usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
        mapped_at_creation: false,
    });
    let mut enc = ctx
        .device
        .create_command_encoder(&wgpu::CommandEncoderDescriptor {
            label: Some("f16 readback"),
        });
    let mut at = 0;
    for (b, size) in bufs.iter().zip(sizes) {
        if let Some(b) = b {
            enc.copy_buffer_to_buffer(b, 0, &staging, at, size);
        }
        at += size;
    }
    ctx.queue.submit([enc.finish()]);
    let words = read_f32(&ctx.device, &staging, total).await?;
    let mut out = Vec::with_capacity(N);
    let mut at = 0;
    for size in sizes {
        let n = (size / 4) as usize;
        out.push(words[at..at + n].to_vec());
        at += n;
    }
    Ok(out)
}

/// The first `len` f16 values packed in `words` (two per word, little-endian), widened.
fn f16_values(words: &[f32], len: usize) -> Vec<f32> {
    let bits: &[u16] = bytemuck::cast_slice(words);
    from_f16_bits(&bits[..len])
}

/// dO and the gradient buffers of one host backward under f16 storage.
pub(super) struct HalfGrad {
    dout: wgpu::Buffer,
    dq: wgpu::Buffer,
    dk: wgpu::Buffer,
    dv: wgpu::Buffer,
}

impl HalfGrad {
    /// Rounds `dout` (O's shape) to f16 and uploads it; dQ (Q's shape), dK and dV (K's) get
    /// f16 buffers.
    pub fn new(ctx: &GpuContext, shape: Shape, dout: &[f32]) -> Result<Self> {
        shape.check_len("dO", dout.len())?;
        let bits = to_f16_bits("dO", dout)?;
        let d = &ctx.device;
        let usage = wgpu::BufferUsages::COPY_SRC;
        let (q, kv) = (shape.elements() as u64 * 2, shape.kv_elements() as u64 * 2);
        Ok(Self {
            dout: upload(d, "dout f16", &bits),
            dq: storage(d, "dq f16", q, usage),
            dk: storage(d, "dk f16", kv, usage),
            dv: storage(d, "dv f16", kv, usage),
        })
    }

    /// dO and the gradients as resident backward I/O (no weight gradients).
    pub fn tensors(&self) -> (&wgpu::Buffer, GradTensors<'_>) {
        let g = GradTensors {
            dq: &self.dq,
            dk: &self.dk,
            dv: &self.dv,
            weights: None,
        };
        (&self.dout, g)
    }

    /// dQ, dK, dV widened to f32, after the backward was submitted.
    pub async fn read(&self, ctx: &GpuContext, shape: Shape) -> Result<Gradients<f32>> {
        let w = read_words(ctx, [Some(&self.dq), Some(&self.dk), Some(&self.dv)]).await?;
        let (q, kv) = (shape.elements(), shape.kv_elements());
        Ok(Gradients {
            dq: f16_values(&w[0], q),
            dk: f16_values(&w[1], kv),
            dv: f16_values(&w[2], kv),
            weights: None,
            dsinks: None,
        })
    }
}
