//! Host tensors under f16 storage (issue 29): Q, K, V rounded to f16 on the host and uploaded
//! into f16 buffers, the forward run on them as resident tensors, O read back as f16 and
//! widened to f32 (exact), the LSE read back as the f32 it is. The executors then have one f16
//! path, the resident one; their f32 host paths (buffer pools, runs of heads) stay as they were.
//!
//! Buffers are made per call (no pool): f16 host calls are the CLI's and the tests' use, where
//! an allocation per call is noise next to the upload.

use wgpu::util::DeviceExt;

use crate::error::Result;
use crate::gpu::engine::buffers::{read_f32, storage};
use crate::gpu::engine::context::GpuContext;
use crate::gpu::engine::io::Host;
use crate::gpu::engine::tensors::{GpuTensors, Output};
use crate::shape::Shape;
use crate::storage::to_f16_bits;

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
        let o_bytes = self.out.size();
        let lse_bytes = if want_lse { self.lse.size() } else { 0 };
        let staging = ctx.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("f16 readback"),
            size: o_bytes + lse_bytes,
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        let mut enc = ctx
            .device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                label: Some("f16 readback"),
            });
        enc.copy_buffer_to_buffer(&self.out, 0, &staging, 0, o_bytes);
        if want_lse {
            enc.copy_buffer_to_buffer(&self.lse, 0, &staging, o_bytes, lse_bytes);
        }
        ctx.queue.submit([enc.finish()]);
        // Read as 4-byte words: O's f16 pairs, then the LSE's f32s.
        let words = read_f32(&ctx.device, &staging, o_bytes + lse_bytes).await?;
        let (o_words, lse) = words.split_at((o_bytes / 4) as usize);
        let bits: &[u16] = bytemuck::cast_slice(o_words);
        Ok(Output {
            o: crate::storage::from_f16_bits(&bits[..shape.elements()]),
            lse: want_lse.then(|| lse[..shape.rows()].to_vec()),
        })
    }
}
