//! Buffers: creation helpers and reading a buffer back to the host (async, so the same code
//! runs in the browser, where `map_async` resolves only when the event loop turns).

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

use crate::error::{FmaError, Result};

/// A storage buffer of at least 16 bytes (zero-sized bindings are invalid in WebGPU).
pub(crate) fn storage(
    device: &wgpu::Device,
    label: &str,
    bytes: u64,
    extra: wgpu::BufferUsages,
) -> wgpu::Buffer {
    device.create_buffer(&wgpu::BufferDescriptor {
        label: Some(label),
        size: bytes.max(16).next_multiple_of(4),
        usage: wgpu::BufferUsages::STORAGE | extra,
        mapped_at_creation: false,
    })
}

/// A uniform buffer holding `bytes` (written through the queue, before the next submit).
pub(crate) fn uniform(
    device: &wgpu::Device,
    queue: &wgpu::Queue,
    label: &str,
    bytes: &[u8],
) -> wgpu::Buffer {
    let buf = device.create_buffer(&wgpu::BufferDescriptor {
        label: Some(label),
        size: bytes.len().max(16).next_multiple_of(4) as u64,
        usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
        mapped_at_creation: false,
    });
    queue.write_buffer(&buf, 0, bytes);
    buf
}

#[derive(Default)]
struct MapState {
    result: Option<std::result::Result<(), wgpu::BufferAsyncError>>,
    waker: Option<Waker>,
}

/// Resolves when a `map_async` callback has fired.
struct MapFuture(Arc<Mutex<MapState>>);

impl Future for MapFuture {
    type Output = std::result::Result<(), wgpu::BufferAsyncError>;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let Ok(mut s) = self.0.lock() else {
            return Poll::Ready(Err(wgpu::BufferAsyncError));
        };
        match s.result.take() {
            Some(r) => Poll::Ready(r),
            None => {
                s.waker = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }
}

/// Maps `buffer` (MAP_READ) and copies `[0, bytes)` out as f32. On native it blocks on
/// `device.poll`; on the web it awaits the browser.
pub(crate) async fn read_f32(
    device: &wgpu::Device,
    buffer: &wgpu::Buffer,
    bytes: u64,
) -> Result<Vec<f32>> {
    // Mapping fails with a validation error (not a panic) when the device is being lost.
    let scope = device.push_error_scope(wgpu::ErrorFilter::Validation);
    let state = Arc::new(Mutex::new(MapState::default()));
    let cb_state = state.clone();
    let slice = buffer.slice(0..bytes.max(4));
    slice.map_async(wgpu::MapMode::Read, move |r| {
        if let Ok(mut s) = cb_state.lock() {
            s.result = Some(r);
            if let Some(w) = s.waker.take() {
                w.wake();
            }
        }
    });
    #[cfg(not(target_arch = "wasm32"))]
    device
        .poll(wgpu::PollType::wait_indefinitely())
        .map_err(|e| FmaError::Readback(e.to_string()))?;
    if let Some(e) = scope.pop().await {
        return Err(FmaError::Readback(e.to_string()));
    }
    MapFuture(state)
        .await
        .map_err(|e| FmaError::Readback(e.to_string()))?;
    let out = {
        let view = slice
            .get_mapped_range()
            .map_err(|e| FmaError::Readback(e.to_string()))?;
        bytemuck::cast_slice::<u8, f32>(&view[..bytes as usize]).to_vec()
    };
    buffer.unmap();
    Ok(out)
}

/// The sequence table of a variable-length batch (`plan::SeqTable`) as a storage buffer.
pub(crate) fn sequence_table(device: &wgpu::Device, table: &crate::plan::SeqTable) -> wgpu::Buffer {
    use wgpu::util::DeviceExt;
    device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
        label: Some("sequence table"),
        contents: bytemuck::cast_slice(&table.words),
        usage: wgpu::BufferUsages::STORAGE,
    })
}
