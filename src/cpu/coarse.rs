//! Coarse queries (algorithm.md §6) in the CPU reference: at every coarse level the queries are
//! pooled like the keys (Average, or Learned with `wq`, `bq`), and a token attends to that
//! level's far-list coarse keys through the coarse query of the sub-window that holds it.
//!
//! §6 describes the computation as per-level partial results (max, sum, weighted value sum)
//! of each coarse query, repeated onto the tokens of its sub-window and merged with the near
//! field by the log-sum-exp rule. Merging partials of disjoint key sets that way is exactly one
//! softmax over their union, so the reference writes it as that one softmax per token (see
//! `cpu::fma_forward`): the near field with q_i, level l's far list with the token's coarse query.
//! The GPU computes the partials and the merge (`shaders/coarse_attention.wgsl`,
//! `shaders/upsample_merge.wgsl`); agreement of the two is the check that the merge is right.

use super::downsample::{downsample_one, Pooled};
use crate::config::Downsample;
use crate::geometry::Geometry;

/// One head's coarse queries: per level l = 1..=L a (level_rows, d) row-major tensor, row r
/// pooling the queries of the tokens row r stands for (1D: row a*p + u pools S(l, a, u)).
pub struct CoarseQueries<'g, G: Geometry + ?Sized> {
    geometry: &'g G,
    per_level: Vec<Vec<f64>>,
    d: usize,
}

impl<'g, G: Geometry + ?Sized> CoarseQueries<'g, G> {
    /// Pools one head's queries `q` of shape (n, d) at every level of `geometry`.
    pub fn new(q: &[f64], d: usize, geometry: &'g G, mode: &Downsample) -> Self {
        Self {
            geometry,
            per_level: downsample_one(q, d, geometry, mode, Pooled::Queries),
            d,
        }
    }

    /// The coarse query token `i` takes at coarse level `level` (>= 1): that of the row whose
    /// tokens hold i (1D: S(l, a, u), a = floor(i / w_l), u = floor((i mod w_l) / (w_l / p))).
    /// This is the upsampling by repetition of §6.
    pub fn of_token(&self, level: usize, i: usize) -> &[f64] {
        let row = self.geometry.row_of_token(level, i);
        &self.per_level[level - 1][row * self.d..(row + 1) * self.d]
    }
}
