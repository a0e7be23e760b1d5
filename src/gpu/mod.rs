//! The GPU path, in two layers (docs/architecture.md): the engine (`engine`: context, pass
//! descriptors, buffers, scopes, caches, the host front and the record loop) and, on top, the
//! executors that turn a plan (`crate::plan`) into recorded work: [`FmaAttention`] (forward,
//! split heads, backward) and [`DenseAttention`].
//!
//! ```no_run
//! use multipole_attn::{gpu::{FmaAttention, GpuContext}, FmaConfig, Shape};
//! let ctx = GpuContext::new()?;                       // honours WGPU_BACKEND
//! let fma = FmaAttention::new(&ctx, FmaConfig::new(64, 2).causal(true))?;
//! let shape = Shape::new(1, 4, 8192, 64);             // (batch, heads, seq, head_dim)
//! let q = vec![0.1f32; shape.elements()];
//! let out = fma.forward(&q, &q, &q, shape, true)?;    // O: (1, 4, 8192, 64), LSE: (1, 4, 8192)
//! # Ok::<(), multipole_attn::FmaError>(())
//! ```

mod attention;
mod decode;
mod dense;
pub mod engine;
mod fma;

pub use attention::{
    Attention, BackwardIo, Encode, ForwardIo, Host, HostGrad, Plan, Resident, ResidentGrad,
    Saved as TrainSaved, TrainIo,
};
pub use decode::{DecodeMode, Decoder, StepTensors};
pub use dense::{DenseAttention, DenseSaved};
pub use engine::context::{
    adapter_support, compute_support, negotiate_features, negotiate_limits, AdapterReport,
    ContextOptions, GpuContext,
};
#[cfg(not(target_arch = "wasm32"))]
pub use engine::context::{all_adapters, list_adapters};
pub use engine::shaders;
pub use engine::tensors::{GpuTensors, Output};
pub use fma::backward::{GradTensors, Saved, WeightGradTensors};
pub use fma::FmaAttention;
