//! The geometry of FMA as a type: which keys a query sees, and which tokens a coarse key stands
//! for. Everything else in the algorithm (downsampling, the count correction, the single
//! softmax, the backward pass) is the same for every geometry, so the CPU reference
//! (`crate::cpu`) reads the geometry only through the [`Geometry`] trait.
//!
//! [`Line`] is the 1D sequence of algorithm.md §2-3 (causal or not), built on the arithmetic of
//! [`crate::levels`]. [`GridGeometry`] is the 2D grid of §9 (cells r x r, 3x3 near field, far
//! lists of up to 27 cells, p horizontal bands per cell, learned weights (d, p, s_l, s_l)), a
//! second implementation of the same trait, not a fork of the reference:
//!
//! | trait method      | 1D [`Line`]                               | 2D grid (§9)                                   |
//! |-------------------|-------------------------------------------|------------------------------------------------|
//! | `fine_keys`       | near blocks a0-1..=a0+1, causal mask      | the 3 x 3 cells, one token run per grid row    |
//! | `coarse_rows`     | far list of window floor(i / w_l), x p    | the up to 27 far cells of the query's cell, x p |
//! | `row_tokens`      | sub-window S(l, a, j): one range          | band j of a cell: s_l / p grid rows, one run each |
//! | `kernel_taps`     | window a, kernel index t = 0..w_l         | the s_l x s_l cell, kernel index dy s_l + dx    |
//! | `kernel_len`      | w_l                                       | s_l^2                                          |
//!
//! Token sets are lists of increasing, disjoint half-open ranges of token indices: a 2D cell in
//! raster order is not one range but a run per grid row, and a list of runs says both.
//!
//! Conventions shared by every geometry (so the reference can index buffers without asking):
//! coarse levels are numbered 1..=L; row `r` of a level is coarse key (basis) `j = r % p` of
//! group `r / p` (window a in 1D, cell (A, B) as A * ncols_l + B in 2D); learned weights of a
//! level are (d, p, `kernel_len(l)`) row-major, so the weight of channel c, basis j, kernel
//! index k is `w[(c * p + j) * kernel_len(l) + k]`, and biases are (d, p).

#[cfg(test)]
pub(crate) mod cases;
mod grid;
mod line;
#[cfg(test)]
mod tests;

pub use grid::{cell_side, effective_cell, Grid, GridGeometry};
pub use line::Line;

use std::ops::Range;

/// A run of consecutive tokens that a learned kernel reads, and the kernel index of its first
/// token (the next token of the run has kernel index `kernel + 1`, and so on).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KernelRun {
    /// The tokens, clipped to [0, n).
    pub tokens: Range<usize>,
    /// Kernel index of `tokens.start` within the level's kernel of `kernel_len` taps.
    pub kernel: usize,
}

/// Which keys each query sees and what each coarse key stands for: the index maps of
/// algorithm.md §3 (1D) or §9 (2D), as the CPU reference needs them.
///
/// Levels are `1..=num_levels()`; rows of a level are `0..level_rows(level)`. Methods that
/// take a query `i` or token `t` expect `i < tokens()`. Every implementation must satisfy the
/// laws that the tests in `geometry::tests` and `cpu::tests` check on the geometries of
/// `geometry::cases` (add a new geometry there to get them):
/// - tiling: the fine keys of query i plus the tokens of every coarse row it sees cover each
///   token it may see exactly once (all n; causal: 0..=i);
/// - block uniformity: queries of one block see the same coarse rows;
/// - the non-empty rows of a level partition the tokens, and `row_of_token` names the row
///   holding a token;
/// - a row's kernel taps cover its tokens (a coarse key pools the tokens it stands for).
///
/// Object safe: the reference takes `G: Geometry + ?Sized`, so `&dyn Geometry` works too.
pub trait Geometry {
    /// Number of tokens n (1D: the sequence length; 2D: H W, in raster order).
    fn tokens(&self) -> usize;

    /// Coarse rank p: coarse keys per window (1D) or cell (2D) at every coarse level.
    fn rank(&self) -> usize;

    /// Number of coarse levels L.
    fn num_levels(&self) -> usize;

    /// Coarse rows of level `level` (1..=L): windows (or cells) of the level times p.
    fn level_rows(&self, level: usize) -> usize;

    /// First row of level `level` in the concatenated coarse buffer [K~_1; ...; K~_L].
    fn row_offset(&self, level: usize) -> usize {
        (1..level).map(|l| self.level_rows(l)).sum()
    }

    /// Rows of the concatenated coarse buffer over all levels.
    fn total_rows(&self) -> usize {
        (1..=self.num_levels()).map(|l| self.level_rows(l)).sum()
    }

    /// The causal mask: query i sees tokens 0..=i only (1D causal). Then query i may see only
    /// tokens t <= i, and no coarse row it sees may stand for a later token.
    fn causal(&self) -> bool;

    /// Number of query blocks: groups of queries that share one coarse key set (1D: the fine
    /// blocks of m tokens; 2D: the r x r cells). The GPU gives each block one workgroup.
    fn query_blocks(&self) -> usize;

    /// The query block of token `i`.
    fn block_of(&self, i: usize) -> usize;

    /// The fine (level 0) keys query `i` sees, one by one: increasing, disjoint token ranges,
    /// the causal mask already applied.
    fn fine_keys(&self, i: usize) -> Vec<Range<usize>>;

    /// The coarse rows query `i` sees at level `level`, rows of empty groups left out, in the
    /// order of the far list then the basis j (the order the reference sums them in). The same
    /// for every query of a block.
    fn coarse_rows(&self, i: usize, level: usize) -> Vec<usize>;

    /// The tokens coarse row `row` of level `level` stands for: increasing, disjoint ranges;
    /// none when the row's sub-window (band) lies beyond the tokens.
    fn row_tokens(&self, level: usize, row: usize) -> Vec<Range<usize>>;

    /// |S|, the number of tokens row `row` of level `level` stands for: what Average mode
    /// divides by and the count correction takes the log of (algorithm.md §5).
    fn row_count(&self, level: usize, row: usize) -> usize {
        self.row_tokens(level, row).iter().map(|r| r.len()).sum()
    }

    /// The row of level `level` whose tokens hold token `i` (§6: the coarse query token i takes,
    /// the upsampling by repetition).
    fn row_of_token(&self, level: usize, i: usize) -> usize;

    /// Taps of level `level`'s learned kernel (1D: w_l; 2D: s_l^2). Defined for every level
    /// >= 1, also beyond L: weights may hold more levels than a sequence uses.
    fn kernel_len(&self, level: usize) -> usize;

    /// The tokens the learned kernel of row `row` reads, with their kernel indices (§4: kernel
    /// = stride, so every basis of a window or cell reads the whole window or cell; tokens
    /// beyond the sequence or grid count as zero and are left out).
    fn kernel_taps(&self, level: usize, row: usize) -> Vec<KernelRun>;
}

/// Makes K and V (rows of width `d` per token, one head) constant on the tokens of every coarse
/// row query `i` sees, the first token's row copied over the rest: then each coarse key stands
/// exactly for the keys it summarises and FMA (Average mode) is exact for query `i`
/// (algorithm.md §5). Inputs for exactness checks: the CPU tests and the conformance suite.
pub fn flatten_far_field<T: Copy, G: Geometry + ?Sized>(
    k: &mut [T],
    v: &mut [T],
    geometry: &G,
    d: usize,
    i: usize,
) {
    for level in 1..=geometry.num_levels() {
        for row in geometry.coarse_rows(i, level) {
            let mut tokens = geometry.row_tokens(level, row).into_iter().flatten();
            let Some(first) = tokens.next() else {
                continue;
            };
            for t in tokens {
                for c in 0..d {
                    k[t * d + c] = k[first * d + c];
                    v[t * d + c] = v[first * d + c];
                }
            }
        }
    }
}
