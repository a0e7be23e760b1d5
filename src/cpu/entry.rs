//! The reference's one entry point, the mirror of `gpu::Attention`: a [`Problem`] by a
//! [`Method`], forward or backward, whatever the batch (whole or variable-length sequences).

use super::{dense_attention_varlen_with, dense_attention_with, dense_backward_varlen_with};
use super::{dense_backward_with, fma_backward, fma_backward_varlen, fma_forward};
use super::{fma_forward_varlen, Reference};
use crate::config::FmaConfig;
use crate::error::Result;
use crate::gradients::Gradients;
use crate::method::Method;
use crate::problem::Problem;

/// The forward of `p` by `method` in f64: O (batch, heads, seq, head_dim) and the LSE
/// (batch, heads, seq) of `q`, `k`, `v` in the layouts of [`Problem`].
pub fn forward(method: &Method, p: &Problem, q: &[f64], k: &[f64], v: &[f64]) -> Result<Reference> {
    p.validate()?;
    match (method, &p.sequences) {
        (Method::Fma(cfg), None) => fma_forward(q, k, v, p.shape, &with_mask(cfg, p)),
        (Method::Fma(cfg), Some(seqs)) => {
            fma_forward_varlen(q, k, v, p.shape, seqs, &with_mask(cfg, p))
        }
        (Method::Dense, None) => dense_attention_with(q, k, v, p.shape, p.causal, &p.variants),
        (Method::Dense, Some(seqs)) => {
            dense_attention_varlen_with(q, k, v, p.shape, seqs, p.causal, &p.variants)
        }
    }
}

/// Gradients of `L = sum(dO * O)` with O = [`forward`]'s: dQ of Q's shape, dK and dV of K's
/// (grouped K/V heads sum their group's), and FMA's learned weights' gradients.
pub fn backward(
    method: &Method,
    p: &Problem,
    (q, k, v): (&[f64], &[f64], &[f64]),
    dout: &[f64],
) -> Result<Gradients<f64>> {
    p.validate()?;
    match (method, &p.sequences) {
        (Method::Fma(cfg), None) => fma_backward(q, k, v, dout, p.shape, &with_mask(cfg, p)),
        (Method::Fma(cfg), Some(seqs)) => {
            fma_backward_varlen((q, k, v, dout), p.shape, seqs, &with_mask(cfg, p))
        }
        (Method::Dense, None) => dense_backward_with(q, k, v, dout, p.shape, p.causal, &p.variants),
        (Method::Dense, Some(seqs)) => {
            dense_backward_varlen_with((q, k, v, dout), p.shape, seqs, p.causal, &p.variants)
        }
    }
}

/// `cfg` with the problem's mask and variants (the lower functions read them from the
/// configuration).
fn with_mask(cfg: &FmaConfig, p: &Problem) -> FmaConfig {
    cfg.clone().causal(p.causal).variants(p.variants.clone())
}
