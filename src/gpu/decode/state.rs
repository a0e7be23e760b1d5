//! The cache's buffers: sequence lengths (host mirror and GPU copy), the near-field ring and
//! the coarse slots of every row (fixed size), the history pages (allocated as sequences
//! grow, never copied), the dense decode's partials, and the host path's tensor buffers and
//! readback staging (grown by capacity, kept across steps). Every buffer made is counted
//! ([`State::buffers_made`]), so a test can prove that steady-state steps make none.

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
    /// (2, batch) u32: a record reads half `parity` and writes the other
    /// (`shaders/shared/decode_params.wgsl`).
    pub lens_gpu: wgpu::Buffer,
    /// The half of `lens_gpu` the next record reads (0 or 1); flips with every record.
    pub parity: usize,
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
    /// The host path's readback of O and the LSE (`MAP_READ`), grown by capacity; taken out
    /// while a step reads it back (a concurrent step then makes its own, which is kept if
    /// larger).
    pub staging: Option<wgpu::Buffer>,
    /// Buffers made so far (the cache, pages, partials, step tensors, staging).
    pub buffers_made: u64,
    layout: DecodeLayout,
}

impl State {
    pub fn new(ctx: &GpuContext, layout: &DecodeLayout) -> Result<Self> {
        let dev = &ctx.device;
        let rows = layout.rows() as u64;
        let lens_gpu = storage(
            dev,
            "decode lens",
            2 * layout.batch as u64 * 4,
            wgpu::BufferUsages::COPY_DST,
        );
        ctx.queue
            .write_buffer(&lens_gpu, 0, &vec![0u8; 2 * layout.batch * 4]);
        let copy = wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST;
        Ok(Self {
            lens: vec![0; layout.batch],
            lens_gpu,
            parity: 0,
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
            staging: None,
            // The lengths, the ring, the coarse slots.
            buffers_made: 3,
            layout: layout.clone(),
        })
    }

    /// Writes sequence `b`'s length `len` into both halves of the GPU's lengths, through the
    /// queue (so before the next submit's commands).
    pub fn write_len(&mut self, queue: &wgpu::Queue, b: usize, len: usize) {
        self.lens[b] = len;
        let bytes = (len as u32).to_le_bytes();
        for half in 0..2 {
            let at = (half * self.layout.batch + b) as u64 * 4;
            queue.write_buffer(&self.lens_gpu, at, &bytes);
        }
    }

    /// Step tensor `i` (Q, K, V, O, LSE) at least `bytes` long, counting a new buffer.
    pub fn io_at_least(
        &mut self,
        device: &wgpu::Device,
        i: usize,
        bytes: u64,
        cap: u64,
    ) -> wgpu::Buffer {
        let before = self.io[i].allocated();
        let buf = self.io[i].at_least(device, bytes, cap).clone();
        if self.io[i].allocated() != before {
            self.buffers_made += 1;
        }
        buf
    }

    /// A readback buffer of at least `bytes` bytes: the kept one taken out (grown by half
    /// again when too small), or a new one; give it back with [`State::return_staging`].
    pub fn take_staging(&mut self, device: &wgpu::Device, bytes: u64) -> wgpu::Buffer {
        let have = self.staging.as_ref().map_or(0, |b| b.size());
        match self.staging.take() {
            Some(b) if have >= bytes => b,
            _ => {
                self.buffers_made += 1;
                device.create_buffer(&wgpu::BufferDescriptor {
                    label: Some("decode readback"),
                    size: (have + have / 2).max(bytes).max(4).next_multiple_of(4),
                    usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
                    mapped_at_creation: false,
                })
            }
        }
    }

    /// Keeps `buf` as the readback staging (unless a larger one is kept already).
    pub fn return_staging(&mut self, buf: wgpu::Buffer) {
        if self.staging.as_ref().is_none_or(|b| b.size() < buf.size()) {
            self.staging = Some(buf);
        }
    }

    /// Makes sure every group has the pages for sequences of `len` tokens.
    pub fn grow_pages(&mut self, device: &wgpu::Device, len: usize) {
        let l = &self.layout;
        let want = l.pages_for(len);
        for (g, rows) in l.groups().iter().enumerate() {
            let bytes = (rows.len() * l.page_tokens * l.head_dim) as u64 * l.storage.bytes();
            while self.pages[g].len() < want {
                let label = "decode history";
                self.buffers_made += 2;
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
        if self.partials.is_none() {
            self.buffers_made += 1;
        }
        self.partials.get_or_insert_with(|| {
            storage(
                device,
                "decode partials",
                bytes,
                wgpu::BufferUsages::empty(),
            )
        })
    }

    /// Bytes of every buffer allocated: cache, lengths, history, partials, step tensors and
    /// their readback.
    pub fn allocated_bytes(&self) -> u64 {
        let io: u64 = self.io.iter().map(Growing::allocated).sum();
        self.staging.as_ref().map_or(0, |b| b.size())
            + self.lens_gpu.size()
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
