//! The key list of one query (algorithm.md §3, §9), written as plainly as possible from the
//! [`Geometry`]: the CPU reference attends to exactly these keys, and the tiling test checks
//! they cover every token the query may see once.

use crate::geometry::{Geometry, Line};
use crate::levels::Levels;

/// One key a query sees.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SeenKey {
    /// Fine key at token position t (level 0).
    Fine(usize),
    /// Coarse key j of window (1D) or cell (2D) `window` at coarse level `level` (>= 1), row
    /// `window * p + j` of the level; it stands for the tokens of that row (1D: sub-window
    /// S(level, window, j)), which are never none here.
    Coarse {
        /// Level l >= 1.
        level: usize,
        /// Window a (cell) at that level.
        window: usize,
        /// Sub-window (basis) index j < p.
        j: usize,
    },
}

/// Every key query `i` sees in the 1D geometry of `levels`, fine keys first, then level
/// 1..=L; empty sub-windows are absent. [`seen_keys_in`] on a [`Line`].
pub fn seen_keys(levels: &Levels, causal: bool, i: usize) -> Vec<SeenKey> {
    seen_keys_in(&Line::from_levels(levels.clone(), causal), i)
}

/// Every key query `i` sees in `geometry`: its fine keys in increasing order, then the coarse
/// rows of level 1..=L in the geometry's order.
pub fn seen_keys_in<G: Geometry + ?Sized>(geometry: &G, i: usize) -> Vec<SeenKey> {
    let p = geometry.rank();
    let mut keys: Vec<SeenKey> = geometry
        .fine_keys(i)
        .into_iter()
        .flatten()
        .map(SeenKey::Fine)
        .collect();
    for level in 1..=geometry.num_levels() {
        keys.extend(
            geometry
                .coarse_rows(i, level)
                .into_iter()
                .map(|row| SeenKey::Coarse {
                    level,
                    window: row / p,
                    j: row % p,
                }),
        );
    }
    keys
}

/// How many times each token position 0..n is covered by the keys query `i` sees in the 1D
/// geometry of `levels` (a coarse key covers its whole sub-window). [`coverage_in`] on a
/// [`Line`].
pub fn coverage(levels: &Levels, causal: bool, i: usize) -> Vec<u32> {
    coverage_in(&Line::from_levels(levels.clone(), causal), i)
}

/// How many times each token 0..n is covered by the keys query `i` sees in `geometry` (a coarse
/// key covers every token it stands for). The tiling property says: all ones (causal: ones up
/// to i, zeros after).
pub fn coverage_in<G: Geometry + ?Sized>(geometry: &G, i: usize) -> Vec<u32> {
    let mut cov = vec![0u32; geometry.tokens()];
    for key in seen_keys_in(geometry, i) {
        match key {
            SeenKey::Fine(t) => cov[t] += 1,
            SeenKey::Coarse { level, window, j } => {
                let row = window * geometry.rank() + j;
                for t in geometry.row_tokens(level, row).into_iter().flatten() {
                    cov[t] += 1;
                }
            }
        }
    }
    cov
}
