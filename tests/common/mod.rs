//! GPU test helpers: one shared context per test binary, the closeness check (the library's),
//! learned weights that differ from the box, NaN-poisoned outputs and buffer read-back.
#![allow(dead_code)]

pub mod gradients;
pub mod split;

use std::sync::OnceLock;

use multipole_attn::gpu::{ContextOptions, GpuContext};
use multipole_attn::plan::{DenseKernel, FmaKernel};

/// Both dense forward kernels: the tests run each whatever the adapter would pick.
pub const DENSE_KERNELS: [DenseKernel; 2] = [DenseKernel::Rows, DenseKernel::Tiled];
/// Both kernels of FMA's fused fine-query pass, likewise.
pub const FMA_KERNELS: [FmaKernel; 2] = [FmaKernel::Rows, FmaKernel::Tiled];

/// The shared context, or `None` (test skipped) when no adapter exists locally. Under CI
/// (`CI=true`) a missing adapter is a failure, so GPU tests can never pass by not running.
pub fn gpu() -> Option<&'static GpuContext> {
    static CTX: OnceLock<Option<GpuContext>> = OnceLock::new();
    CTX.get_or_init(|| open(ContextOptions::default())).as_ref()
}

/// A context that asks only for what a browser grants (256 invocations, 16 KiB workgroup memory).
pub fn browser_like_gpu() -> Option<&'static GpuContext> {
    static CTX: OnceLock<Option<GpuContext>> = OnceLock::new();
    CTX.get_or_init(|| {
        open(ContextOptions {
            browser_limits: true,
            ..Default::default()
        })
    })
    .as_ref()
}

/// A context whose subgroup kernels are composed for subgroups of another size than the
/// adapter's (`ContextOptions::subgroup_size`: twice its smallest), so that no subgroup has
/// exactly that many lanes and every kernel takes its per-invocation fallback, as on a device
/// whose subgroups are wider than its minimum. `None` (skipped) where the adapter has no
/// subgroups: there every device runs the plain variant, which the other tests cover.
pub fn mismatched_subgroup_gpu() -> Option<&'static GpuContext> {
    static CTX: OnceLock<Option<GpuContext>> = OnceLock::new();
    CTX.get_or_init(|| {
        let Some(size) = gpu()?.subgroup_kernels() else {
            eprintln!("skipping: the adapter has no subgroups");
            return None;
        };
        let other = if size == 128 { 64 } else { 2 * size };
        let ctx = open(ContextOptions {
            subgroup_size: Some(other),
            ..Default::default()
        })?;
        assert_eq!(ctx.subgroup_kernels(), Some(other));
        Some(ctx)
    })
    .as_ref()
}

fn open(options: ContextOptions) -> Option<GpuContext> {
    let _ = env_logger::builder().is_test(true).try_init();
    match GpuContext::with_options(options) {
        Ok(ctx) => {
            eprintln!("adapter: {} ({:?})", ctx.info.name, ctx.info.backend);
            Some(ctx)
        }
        Err(e) if std::env::var("CI").is_ok_and(|v| v == "true" || v == "1") => {
            panic!("CI=true but no GPU adapter: {e}")
        }
        Err(e) => {
            eprintln!("skipping GPU test: {e}");
            None
        }
    }
}

/// The library's closeness check, |gpu - ref| <= atol + rtol |ref| with NaN failing, shared
/// with the doctor's conformance suite and the browser tests. (Not every test binary uses it.)
#[allow(unused_imports)]
pub use multipole_attn::closeness::{closeness, Closeness};

use multipole_attn::gpu::GpuTensors;
use multipole_attn::{LearnedWeights, Shape};
use wgpu::util::DeviceExt;

/// Box-initialised learned weights plus N(0, 0.5/w_l) noise and N(0, 0.1) biases (keys, values
/// and queries), so that the learned path differs from Average and a wrong index into the
/// weights shows.
pub fn random_learned(
    seed: u64,
    head_dim: usize,
    m: usize,
    p: usize,
    seq: usize,
) -> LearnedWeights {
    let mut w = LearnedWeights::box_init_for(head_dim, m, p, seq);
    for (l, lw) in w.levels.iter_mut().enumerate() {
        let win = m << l;
        let s = seed + 100 * l as u64;
        for (buf, off, scale) in [
            (&mut lw.wk, 1, 0.5 / win as f32),
            (&mut lw.wv, 2, 0.5 / win as f32),
            (&mut lw.bk, 3, 0.1),
            (&mut lw.bv, 4, 0.1),
            (&mut lw.wq, 5, 0.5 / win as f32),
            (&mut lw.bq, 6, 0.1),
        ] {
            let noise = multipole_attn::random::normal_tensor(s + off, buf.len());
            buf.iter_mut().zip(noise).for_each(|(x, e)| *x += scale * e);
        }
    }
    w
}

/// Output buffers filled with NaN before a run, so an element the kernel forgot to write fails
/// the comparison.
pub struct Poisoned {
    pub q: wgpu::Buffer,
    pub k: wgpu::Buffer,
    pub v: wgpu::Buffer,
    pub out: wgpu::Buffer,
    pub lse: wgpu::Buffer,
}

impl Poisoned {
    pub fn new(ctx: &GpuContext, q: &[f32], k: &[f32], v: &[f32], shape: Shape) -> Self {
        Self::with_usage(ctx, q, k, v, shape, wgpu::BufferUsages::empty())
    }

    /// Like [`Poisoned::new`], every buffer with `usage` besides.
    pub fn with_usage(
        ctx: &GpuContext,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        shape: Shape,
        usage: wgpu::BufferUsages,
    ) -> Self {
        let init = |label, data: &[f32], extra| {
            ctx.device
                .create_buffer_init(&wgpu::util::BufferInitDescriptor {
                    label: Some(label),
                    contents: bytemuck::cast_slice(data),
                    usage: wgpu::BufferUsages::STORAGE | usage | extra,
                })
        };
        let nan_o = vec![f32::NAN; shape.elements()];
        let nan_l = vec![f32::NAN; shape.rows()];
        Self {
            q: init("q", q, wgpu::BufferUsages::empty()),
            k: init("k", k, wgpu::BufferUsages::empty()),
            v: init("v", v, wgpu::BufferUsages::empty()),
            out: init("out", &nan_o, wgpu::BufferUsages::COPY_SRC),
            lse: init("lse", &nan_l, wgpu::BufferUsages::COPY_SRC),
        }
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

    /// Reads O and the LSE back.
    pub fn read(&self, ctx: &GpuContext) -> (Vec<f32>, Vec<f32>) {
        (read_buffer(ctx, &self.out), read_buffer(ctx, &self.lse))
    }
}

pub fn read_buffer(ctx: &GpuContext, buf: &wgpu::Buffer) -> Vec<f32> {
    let staging = ctx.device.create_buffer(&wgpu::BufferDescriptor {
        label: Some("test readback"),
        size: buf.size(),
        usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
        mapped_at_creation: false,
    });
    let mut enc = ctx.device.create_command_encoder(&Default::default());
    enc.copy_buffer_to_buffer(buf, 0, &staging, 0, buf.size());
    ctx.queue.submit([enc.finish()]);
    let slice = staging.slice(..);
    slice.map_async(wgpu::MapMode::Read, |r| r.expect("map"));
    ctx.device
        .poll(wgpu::PollType::wait_indefinitely())
        .expect("poll");
    let data = bytemuck::cast_slice::<u8, f32>(&slice.get_mapped_range().expect("mapped")).to_vec();
    staging.unmap();
    data
}

/// A device on the default adapter with WebGPU's default limits but for the storage-binding
/// size, `binding` bytes: a small one makes the library split tensors as it must for large
/// inputs on a real limit.
pub fn gpu_with_binding_limit(binding: u64) -> GpuContext {
    pollster::block_on(async {
        let instance =
            wgpu::Instance::new(wgpu::InstanceDescriptor::new_without_display_handle_from_env());
        let adapter = instance
            .request_adapter(&Default::default())
            .await
            .expect("adapter");
        let limits = wgpu::Limits {
            max_storage_buffer_binding_size: binding,
            ..wgpu::Limits::default()
        };
        let (device, queue) = adapter
            .request_device(&wgpu::DeviceDescriptor {
                required_limits: limits,
                ..Default::default()
            })
            .await
            .expect("device");
        GpuContext::from_device(adapter.get_info(), device, queue)
    })
}
