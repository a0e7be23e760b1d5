//! How a [`crate::Problem`] is attended: Fast Multipole Attention or exact dense attention.

use crate::config::FmaConfig;

/// The attention method. Both take the same [`crate::Problem`]s and tensors, on the GPU
/// (`gpu::Attention`) and in the f64 reference (`cpu::forward`, `cpu::backward`).
#[derive(Clone, Debug, PartialEq)]
pub enum Method {
    /// Fast Multipole Attention (algorithm.md): block m, rank p, downsampling, fine or coarse
    /// queries, optional 2D grid.
    Fma(FmaConfig),
    /// Exact softmax attention, softmax(Q K^T / sqrt(d)) V: the yardstick.
    Dense,
}

impl Method {
    /// The FMA configuration, or `None` for dense attention.
    pub fn fma(&self) -> Option<&FmaConfig> {
        match self {
            Method::Fma(cfg) => Some(cfg),
            Method::Dense => None,
        }
    }
}
