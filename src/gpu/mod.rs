//! The GPU path: a context (adapter, device, negotiated limits), WGSL passes, the per-level
//! scheduler and the executor that encodes a whole forward into one submit.

pub mod context;
pub(crate) mod params;
pub mod shaders;

pub use context::{list_adapters, AdapterReport, GpuContext};

use crate::config::FmaConfig;
use crate::error::{FmaError, Result};
use crate::shape::Shape;

/// Host-side result of a forward: O of shape (batch, heads, seq, head_dim) and, on request,
/// the per-row log-sum-exp of shape (batch, heads, seq).
#[derive(Clone, Debug)]
pub struct Output {
    /// Attention output, (batch, heads, seq, head_dim).
    pub o: Vec<f32>,
    /// LSE, (batch, heads, seq), when asked for.
    pub lse: Option<Vec<f32>>,
}

/// Fine-query FMA on the GPU (STUB: being written).
pub struct FmaAttention {
    _ctx: GpuContext,
    _cfg: FmaConfig,
}

impl FmaAttention {
    /// Builds the pipelines for `cfg` on `ctx`.
    pub fn new(ctx: &GpuContext, cfg: FmaConfig) -> Result<Self> {
        Ok(Self {
            _ctx: ctx.clone(),
            _cfg: cfg,
        })
    }
    /// Runs FMA on host tensors of shape `shape`; returns O and, if `want_lse`, the LSE.
    pub fn forward(
        &self,
        _q: &[f32],
        _k: &[f32],
        _v: &[f32],
        _shape: Shape,
        _want_lse: bool,
    ) -> Result<Output> {
        Err(FmaError::NoAdapter(" (stub)".into()))
    }
}

/// Exact dense attention on the GPU (STUB: being written).
pub struct DenseAttention {
    _ctx: GpuContext,
    _causal: bool,
}

impl DenseAttention {
    /// Builds the pipelines on `ctx`.
    pub fn new(ctx: &GpuContext, causal: bool) -> Result<Self> {
        Ok(Self {
            _ctx: ctx.clone(),
            _causal: causal,
        })
    }
    /// Runs dense attention on host tensors.
    pub fn forward(
        &self,
        _q: &[f32],
        _k: &[f32],
        _v: &[f32],
        _shape: Shape,
        _want_lse: bool,
    ) -> Result<Output> {
        Err(FmaError::NoAdapter(" (stub)".into()))
    }
}
