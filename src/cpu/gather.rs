//! The key list of one query (algorithm.md §3), written as plainly as possible: the CPU
//! reference attends to exactly these keys, and the tiling test checks they cover 0..n once.

use crate::levels::{far_list, near_blocks, sub_window, Levels};

/// One key a query sees.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SeenKey {
    /// Fine key at token position t (level 0).
    Fine(usize),
    /// Coarse key j of window `window` at coarse level `level` (>= 1); it stands for the
    /// tokens of sub-window S(level, window, j), which is never empty here.
    Coarse {
        /// Level l >= 1.
        level: usize,
        /// Window a at that level.
        window: usize,
        /// Sub-window (basis) index j < p.
        j: usize,
    },
}

/// Every key query `i` sees, fine keys first, then level 1..=L; empty sub-windows are absent.
pub fn seen_keys(levels: &Levels, causal: bool, i: usize) -> Vec<SeenKey> {
    let (n, m, p) = (levels.n, levels.m, levels.p);
    let a0 = i / m;
    let mut keys = Vec::new();
    for b in near_blocks(a0, causal, levels.fine_blocks()) {
        for t in b * m..((b + 1) * m).min(n) {
            if !causal || t <= i {
                keys.push(SeenKey::Fine(t));
            }
        }
    }
    for lv in &levels.levels {
        let a = i / lv.window;
        for b in far_list(a, causal, lv.windows) {
            for j in 0..p {
                if !sub_window(n, m, p, lv.level, b, j).is_empty() {
                    keys.push(SeenKey::Coarse {
                        level: lv.level,
                        window: b,
                        j,
                    });
                }
            }
        }
    }
    keys
}

/// How many times each token position 0..n is covered by the keys query `i` sees
/// (a coarse key covers its whole sub-window). The tiling property says: all ones
/// (causal: ones up to i, zeros after).
pub fn coverage(levels: &Levels, causal: bool, i: usize) -> Vec<u32> {
    let mut cov = vec![0u32; levels.n];
    for key in seen_keys(levels, causal, i) {
        match key {
            SeenKey::Fine(t) => cov[t] += 1,
            SeenKey::Coarse { level, window, j } => {
                for t in sub_window(levels.n, levels.m, levels.p, level, window, j) {
                    cov[t] += 1;
                }
            }
        }
    }
    cov
}
