//! Device buffers of the coarse-query passes (algorithm.md §6) for one shape: the pooled
//! queries Q~ that `downsample.wgsl` writes, and the partial result of every coarse query
//! (o~, lse~) that `coarse_attention.wgsl` writes and `upsample_merge.wgsl` reads.

use crate::gpu::readback::storage;
use crate::plan::FmaPlan;

/// Q~ and the coarse queries' partial results of every level, per head in level order (the
/// rows of [K~_1; ...; K~_L]): `q`, `o`: (bh, coarse_rows, d); `lse`: (bh, coarse_rows).
/// With fine queries they are 16-byte placeholders (the downsample pass still binds `q`, but
/// pools only K and V).
pub(crate) struct CoarseQueryBuffers {
    pub q: wgpu::Buffer,
    pub o: wgpu::Buffer,
    pub lse: wgpu::Buffer,
}

impl CoarseQueryBuffers {
    pub fn new(device: &wgpu::Device, plan: &FmaPlan) -> Self {
        let ws = &plan.workspace;
        let (rows_bytes, lse_bytes) = if plan.merge.is_some() {
            (ws.coarse_bytes, ws.coarse_lse_bytes)
        } else {
            (0, 0)
        };
        let none = wgpu::BufferUsages::empty();
        Self {
            q: storage(device, "coarse_q", rows_bytes, none),
            o: storage(device, "coarse partial o", rows_bytes, none),
            lse: storage(device, "coarse partial lse", lse_bytes, none),
        }
    }
}
