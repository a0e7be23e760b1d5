//! The GPU path: [`Attention`], the one entry point (a [`crate::Problem`] by a
//! [`crate::Method`]: forward, training forward, backward), over two layers
//! (docs/architecture.md): the engine (`engine`: context, pass descriptors, buffers, scopes,
//! caches, the host front and the record loop) and the executors that turn a plan
//! (`crate::plan`) into recorded work (FMA's forward, split heads and backward; dense
//! attention's), and the decoder ([`Decoder`]).
//!
//! ```no_run
//! use multipole_attn::gpu::{Attention, GpuContext, Host};
//! use multipole_attn::{FmaConfig, Problem, Shape};
//! let ctx = GpuContext::new()?;                       // honours WGPU_BACKEND
//! let fma = Attention::fma(&ctx, FmaConfig::new(64, 2))?;
//! let p = Problem::new(Shape::new(1, 4, 8192, 64)).causal(true); // (batch, heads, seq, d)
//! let q = vec![0.1f32; p.shape.elements()];
//! let out = fma.forward(&p, Host::new(&q, &q, &q))?; // O: (1, 4, 8192, 64), LSE: (1, 4, 8192)
//! # Ok::<(), multipole_attn::FmaError>(())
//! ```

mod attention;
mod decode;
mod dense;
mod engine;
mod fma;

pub use attention::{Attention, Plan, Saved};
pub use decode::{DecodeMode, Decoder, EncodeStep, ObjectsMade, StepIo, StepTensors};
pub use engine::context::{
    adapter_support, compute_support, negotiate_features, negotiate_limits, AdapterSummary,
    ContextOptions, GpuContext,
};
#[cfg(not(target_arch = "wasm32"))]
pub use engine::context::{all_adapters, list_adapters};
pub use engine::coop::{describe_shapes, fitting_shape, CoopMode, CoopOffer, CoopShape};
pub use engine::io::{
    BackwardIo, Encode, ForwardIo, Host, HostGrad, Resident, ResidentGrad, TrainIo,
};
pub use engine::profile::{format_table, summarize, PassTime};
pub use engine::shaders;
pub use engine::tensors::{GpuTensors, Output};
pub use fma::backward::{GradTensors, WeightGradTensors};
