//! The cache's buffers: sequence lengths (host mirror and GPU copy), the near-field ring and
//! the coarse slots of every row (fixed size), the history pages (allocated as sequences
//! grow, never copied), the dense decode's partials, and the host path's tensor buffers.

use crate::error::Result;
use crate::gpu::engine::buffers::storage;
use crate::gpu::engine::cache::Growing;
use crate::gpu::engine::context::GpuContext;
use crate::plan::DecodeLayout;

/// Keys and values of one history page of one group, (rows, T, d) each, of the layout's
/// storage.
pub(super) struct Page {
    pub k: wgpu::Buffer,
    pub v: wgpu::Buffer,
}

pub(super) struct State {
    /// Tokens per sequence as recorded so far (the GPU's copy advances in queue order).
    pub lens: Vec<usize>,
    /// (batch) u32.
    pub lens_gpu: wgpu::Buffer,
    /// (rows, ring_stride) of the layout's storage (f32 or f16).
    pub ring: wgpu::Buffer,
    /// (rows, coarse_stride) f32.
    pub coarse: wgpu::Buffer,
    /// Per group, its pages in order.
    pub pages: Vec<Vec<Page>>,
    /// (group, partial_stride) f32, made on the first dense step.
    pub partials: Option<wgpu::Buffer>,
    /// The host path's Q, K, V (rows, chunk, d), O and LSE.
    pub io: [Growing; 5],
    layout: DecodeLayout,
}

impl State {
    pub fn new(ctx: &GpuContext, layout: &DecodeLayout) -> Result<Self> {
        let dev = &ctx.device;
        let rows = layout.rows() as u64;
        let lens_gpu = storage(
            dev,
            "decode lens",
            layout.batch as u64 * 4,
            wgpu::BufferUsages::COPY_DST,
        );
        ctx.queue
            .write_buffer(&lens_gpu, 0, &vec![0u8; layout.batch * 4]);
        let copy = wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST;
        Ok(Self {
            lens: vec![0; layout.batch],
            lens_gpu,
            ring: storage(dev, "decode ring", rows * layout.ring_bytes(), copy),
            coarse: storage(
                dev,
                "decode coarse slots",
                rows * layout.coarse_stride as u64 * 4,
                copy,
            ),
            pages: layout.groups().iter().map(|_| Vec::new()).collect(),
            partials: None,
            io: [
                Growing::new("decode q", copy),
                Growing::new("decode k", copy),
                Growing::new("decode v", copy),
                Growing::new("decode o", copy),
                Growing::new("decode lse", copy),
            ],
            layout: layout.clone(),
        })
    }

    /// Makes sure every group has the pages for sequences of `len` tokens.
    pub fn grow_pages(&mut self, device: &wgpu::Device, len: usize) {
        let l = &self.layout;
        let want = l.pages_for(len);
        for (g, rows) in l.groups().iter().enumerate() {
            let bytes = (rows.len() * l.page_tokens * l.head_dim) as u64 * l.storage.bytes();
            while self.pages[g].len() < want {
                let label = "decode history";
                self.pages[g].push(Page {
                    k: storage(
                        device,
                        label,
                        bytes,
                        wgpu::BufferUsages::COPY_DST | wgpu::BufferUsages::COPY_SRC,
                    ),
                    v: storage(
                        device,
                        label,
                        bytes,
                        wgpu::BufferUsages::COPY_DST | wgpu::BufferUsages::COPY_SRC,
                    ),
                });
            }
        }
    }

    /// The partials buffer (made once).
    pub fn partials(&mut self, device: &wgpu::Device) -> &wgpu::Buffer {
        let l = &self.layout;
        let bytes = (l.group * l.qgroup() * l.partial_stride) as u64 * 4;
        self.partials.get_or_insert_with(|| {
            storage(
                device,
                "decode partials",
                bytes,
                wgpu::BufferUsages::empty(),
            )
        })
    }

    /// Bytes of every buffer allocated: cache, lengths, history, partials, step tensors.
    pub fn allocated_bytes(&self) -> u64 {
        let io: u64 = self.io.iter().map(Growing::allocated).sum();
        self.lens_gpu.size()
            + self.ring.size()
            + self.coarse.size()
            + self.history_bytes()
            + self.partials.as_ref().map_or(0, |p| p.size())
            + io
    }

    /// Bytes of history pages allocated.
    pub fn history_bytes(&self) -> u64 {
        self.pages
            .iter()
            .flatten()
            .map(|p| p.k.size() + p.v.size())
            .sum()
    }
}
