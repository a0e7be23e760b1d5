//! Finding an adapter and making a device (STUB signatures; being written).

use crate::error::{FmaError, Result};

/// A wgpu device and queue with the limits and features the library negotiated.
#[derive(Clone)]
pub struct GpuContext {
    /// The device.
    pub device: wgpu::Device,
    /// Its queue.
    pub queue: wgpu::Queue,
    /// The adapter's description.
    pub info: wgpu::AdapterInfo,
}

impl GpuContext {
    /// Finds an adapter (honouring `WGPU_BACKEND`) and creates a device. Blocking (native).
    pub fn new() -> Result<Self> {
        Err(FmaError::NoAdapter(" (stub)".into()))
    }
}

/// What `multipole-attn info` prints about one adapter.
#[derive(Clone, Debug)]
pub struct AdapterReport {
    /// Name, backend, device type, driver.
    pub info: wgpu::AdapterInfo,
    /// The adapter's limits.
    pub limits: wgpu::Limits,
    /// The adapter's features.
    pub features: wgpu::Features,
}

impl std::fmt::Display for AdapterReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({:?})", self.info.name, self.info.backend)
    }
}

/// Every adapter wgpu finds on every backend.
pub fn list_adapters() -> Vec<AdapterReport> {
    Vec::new()
}
