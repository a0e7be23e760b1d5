//! The GPU engine: what every executor uses and none owns. The context (adapter, device,
//! limits, the device's layouts and pipeline cache), the pass descriptors and WGSL
//! composition, buffers and readback, error scopes, the shape cache and growing buffers, the
//! host-tensor front and split I/O, the learned weights' buffers, and the one record loop. Nothing here imports an executor
//! (`gpu::fma`, `gpu::dense`).

pub(crate) mod buffers;
pub(crate) mod cache;
pub mod context;
pub mod coop;
pub(crate) mod front;
pub mod io;
pub(crate) mod params;
pub mod passes;
pub(crate) mod pipelines;
pub mod profile;
pub(crate) mod record;
pub mod shaders;
pub(crate) mod split_io;
pub(crate) mod storage_types;
pub(crate) mod tensors;
pub(crate) mod varlen_io;
pub(crate) mod weights;
