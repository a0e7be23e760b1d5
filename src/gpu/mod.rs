//! The GPU path: a context (adapter, device, negotiated limits), WGSL passes, the per-level
//! scheduler's plans executed as one submit per forward.
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

mod backward;
mod backward_bindings;
mod coarse;
pub mod context;
mod dense;
mod dense_split;
mod fma;
mod io;
pub(crate) mod params;
pub(crate) mod pipelines;
mod readback;
pub mod shaders;
mod split;

pub use backward::{GradTensors, Saved, WeightGradTensors};
#[cfg(not(target_arch = "wasm32"))]
pub use context::{all_adapters, list_adapters};
pub use context::{
    negotiate_features, negotiate_limits, AdapterReport, ContextOptions, GpuContext,
};
pub use dense::DenseAttention;
pub use fma::FmaAttention;
pub use io::GpuTensors;

/// Host-side result of a forward: O of shape (batch, heads, seq, head_dim) and, on request,
/// the per-row log-sum-exp of shape (batch, heads, seq).
#[derive(Clone, Debug)]
pub struct Output {
    /// Attention output, (batch, heads, seq, head_dim).
    pub o: Vec<f32>,
    /// LSE, (batch, heads, seq), when asked for.
    pub lse: Option<Vec<f32>>,
}
