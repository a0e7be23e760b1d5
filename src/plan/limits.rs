//! The adapter limits every plan respects, read from the device once.

use crate::error::{FmaError, Result};

/// The unit of a storage binding's size in [`FmaError::LimitExceeded`].
pub(crate) const BINDING_BYTES: &str = "bytes in one storage binding";

/// The adapter limits a plan must respect.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KernelLimits {
    /// Invocations per workgroup the kernels may use (<= 256, the browser's limit).
    pub max_workgroup: u32,
    /// Bytes of workgroup memory per workgroup.
    pub workgroup_storage: u32,
    /// Workgroups per dispatch dimension.
    pub max_workgroups_per_dim: u32,
    /// Bytes per storage binding.
    pub max_binding: u64,
    /// Bytes per buffer.
    pub max_buffer: u64,
}

impl KernelLimits {
    /// The limits of a device.
    pub fn from_wgpu(l: &wgpu::Limits) -> Self {
        Self {
            max_workgroup: l
                .max_compute_invocations_per_workgroup
                .min(l.max_compute_workgroup_size_x)
                .min(256),
            workgroup_storage: l.max_compute_workgroup_storage_size,
            max_workgroups_per_dim: l.max_compute_workgroups_per_dimension,
            max_binding: l.max_storage_buffer_binding_size,
            max_buffer: l.max_buffer_size,
        }
    }

    /// A discrete GPU's limits as wgpu reports them over Vulkan (an NVIDIA H200:
    /// `../shared/design/gpu.md`): 256 invocations per workgroup (this library's cap), 48 KiB
    /// of workgroup memory, 2 GiB per storage binding, 4 GiB per buffer. The default of
    /// `multipole-attn plan`.
    pub fn discrete_gpu() -> Self {
        Self {
            max_workgroup: 256,
            workgroup_storage: 48 << 10,
            max_workgroups_per_dim: 65535,
            max_binding: 2 << 30,
            max_buffer: 4 << 30,
        }
    }

    /// WebGPU's default limits (what a browser grants without asking).
    pub fn webgpu_default() -> Self {
        Self::from_wgpu(&wgpu::Limits::default())
    }

    /// These limits with at most `bytes` per storage binding.
    pub fn capped(mut self, bytes: u64) -> Self {
        self.max_binding = self.max_binding.min(bytes);
        self
    }

    /// Bytes one storage binding may hold: the binding limit, or the buffer limit if lower.
    pub fn binding_bytes(&self) -> u64 {
        self.max_binding.min(self.max_buffer)
    }

    /// Checks that `bytes` of `what` fit one storage binding; `advice` says what to change
    /// when they do not.
    pub(crate) fn check_binding(&self, what: &str, bytes: u64, advice: &str) -> Result<()> {
        let max = self.binding_bytes();
        if bytes > max {
            return Err(FmaError::LimitExceeded {
                what: what.into(),
                requested: bytes,
                max,
                unit: BINDING_BYTES,
                advice: advice.into(),
            });
        }
        Ok(())
    }
}

/// Whether `e` is a storage-binding limit (a tensor or scratch buffer too large for one
/// binding), not another adapter limit (workgroup memory, workgroups per dimension).
pub fn exceeds_binding(e: &FmaError) -> bool {
    matches!(e, FmaError::LimitExceeded { unit, .. } if *unit == BINDING_BYTES)
}

#[cfg(test)]
impl KernelLimits {
    /// lavapipe's limits (32 KiB of workgroup memory, 128 MiB bindings), for the plans' tests.
    pub(crate) fn lavapipe() -> Self {
        Self {
            workgroup_storage: 32768,
            ..Self::with_binding(128 << 20)
        }
    }

    /// A desktop adapter's limits but for `binding` bytes per storage binding (unit tests of
    /// the split plans).
    pub(crate) fn with_binding(binding: u64) -> Self {
        Self {
            max_workgroup: 256,
            workgroup_storage: 16384,
            max_workgroups_per_dim: 65535,
            max_binding: binding,
            max_buffer: 1 << 30,
        }
    }
}
