//! Gradients of FMA (algorithm.md §8), fine or coarse queries: what the backward pass returns,
//! in f64 from the CPU reference and in f32 from the GPU.

use crate::weights::LevelWeights;

/// Gradients of one coarse level's learned downsampling weights, summed over batch and heads
/// (the weights are shared by all heads), in the layout of [`crate::LevelWeights`]:
/// `wk`, `wv`, `wq`: (head_dim, p, w_l); `bk`, `bv`, `bq`: (head_dim, p), row-major. The query
/// weights' gradients are those of coarse queries (algorithm.md §6); fine queries do not use
/// the query weights, so theirs are zero.
#[derive(Clone, Debug, PartialEq)]
pub struct LevelGradients<T> {
    /// dL/dWK_l, (head_dim, p, w_l).
    pub wk: Vec<T>,
    /// dL/dbK_l, (head_dim, p).
    pub bk: Vec<T>,
    /// dL/dWV_l, (head_dim, p, w_l).
    pub wv: Vec<T>,
    /// dL/dbV_l, (head_dim, p).
    pub bv: Vec<T>,
    /// dL/dWQ_l, (head_dim, p, w_l): coarse queries; zero for fine queries.
    pub wq: Vec<T>,
    /// dL/dbQ_l, (head_dim, p): coarse queries; zero for fine queries.
    pub bq: Vec<T>,
}

impl<T: Clone + Default> LevelGradients<T> {
    /// All-zero gradients for a level of window `window`.
    pub fn zeros(head_dim: usize, rank: usize, window: usize) -> Self {
        let w = vec![T::default(); head_dim * rank * window];
        let b = vec![T::default(); head_dim * rank];
        Self {
            wk: w.clone(),
            bk: b.clone(),
            wv: w.clone(),
            bv: b.clone(),
            wq: w,
            bq: b,
        }
    }

    /// All-zero gradients shaped like `weights` (a level the sequence does not use: its
    /// gradient has the weights' shape, whatever (m, p) the index maps use for this sequence).
    pub fn zeros_like(weights: &LevelWeights) -> Self {
        Self {
            wk: vec![T::default(); weights.wk.len()],
            bk: vec![T::default(); weights.bk.len()],
            wv: vec![T::default(); weights.wv.len()],
            bv: vec![T::default(); weights.bv.len()],
            // Fine-query weights may leave the query weights empty: their gradient has the
            // key weights' shape either way.
            wq: vec![T::default(); weights.wk.len()],
            bq: vec![T::default(); weights.bk.len()],
        }
    }
}

/// Gradients of a scalar loss L with respect to FMA's inputs, given dO = dL/dO.
/// `dq`, `dk`, `dv`: (batch, heads, seq, head_dim), row-major like Q, K, V.
/// `weights`: in Learned mode, one entry per level of the configuration's weights (index 0 is
/// level 1; levels the sequence does not use get zeros); `None` in Average mode.
#[derive(Clone, Debug, PartialEq)]
pub struct Gradients<T> {
    /// dL/dQ, (batch, heads, seq, head_dim).
    pub dq: Vec<T>,
    /// dL/dK, (batch, heads, seq, head_dim): near-field keys plus every coarse key's share.
    pub dk: Vec<T>,
    /// dL/dV, (batch, heads, seq, head_dim).
    pub dv: Vec<T>,
    /// dL/dW and dL/db of every level's learned weights (Learned mode only).
    pub weights: Option<Vec<LevelGradients<T>>>,
    /// dL/dS of the attention sinks, (heads,), summed over batch and rows
    /// ([`crate::Variants::sinks`]); `None` without sinks.
    pub dsinks: Option<Vec<T>>,
}
