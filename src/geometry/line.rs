//! The 1D geometry of algorithm.md §2-3: a sequence of n tokens, fine blocks of m, windows
//! w_l = m 2^(l-1), p sub-windows per window, causal or bidirectional. The arithmetic is that of
//! [`crate::levels`]; this only answers the [`Geometry`] questions with it.

use std::ops::Range;

use super::{Geometry, KernelRun};
use crate::levels::{far_list, near_blocks, sub_window, window, Level, Levels};

/// A 1D sequence: the [`Levels`] of (n, m, p) and the causal mask.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Line {
    levels: Levels,
    causal: bool,
}

impl Line {
    /// The geometry of `n` tokens with block size `m` and rank `p` (m >= 1, p divides m).
    pub fn new(n: usize, m: usize, p: usize, causal: bool) -> Self {
        Self::from_levels(Levels::new(n, m, p), causal)
    }

    /// The geometry of an existing level structure.
    pub fn from_levels(levels: Levels, causal: bool) -> Self {
        Self { levels, causal }
    }

    /// The level structure (n, m, p, windows per level).
    pub fn levels(&self) -> &Levels {
        &self.levels
    }

    fn level(&self, level: usize) -> &Level {
        &self.levels.levels[level - 1]
    }

    /// Sub-window S(l, a, j) of row a p + j.
    fn sub_window_of_row(&self, level: usize, row: usize) -> Range<usize> {
        let Levels { n, m, p, .. } = self.levels;
        sub_window(n, m, p, level, row / p, row % p)
    }
}

impl Geometry for Line {
    fn tokens(&self) -> usize {
        self.levels.n
    }

    fn rank(&self) -> usize {
        self.levels.p
    }

    fn num_levels(&self) -> usize {
        self.levels.count()
    }

    fn level_rows(&self, level: usize) -> usize {
        self.level(level).rows(self.levels.p)
    }

    fn row_offset(&self, level: usize) -> usize {
        self.level(level).row_offset
    }

    fn total_rows(&self) -> usize {
        self.levels.total_rows()
    }

    fn causal(&self) -> bool {
        self.causal
    }

    fn query_blocks(&self) -> usize {
        self.levels.fine_blocks()
    }

    fn block_of(&self, i: usize) -> usize {
        i / self.levels.m
    }

    /// One range per near block; in causal mode the query's own block stops at i.
    fn fine_keys(&self, i: usize) -> Vec<Range<usize>> {
        let (n, m) = (self.levels.n, self.levels.m);
        let last = if self.causal { i + 1 } else { n };
        near_blocks(i / m, self.causal, self.levels.fine_blocks())
            .map(|b| b * m..((b + 1) * m).min(last))
            .collect()
    }

    /// The far list of window floor(i / w_l), each window's p sub-windows in order of j.
    fn coarse_rows(&self, i: usize, level: usize) -> Vec<usize> {
        let lv = self.level(level);
        let p = self.levels.p;
        far_list(i / lv.window, self.causal, lv.windows)
            .into_iter()
            .flat_map(|b| b * p..(b + 1) * p)
            .filter(|&row| !self.sub_window_of_row(level, row).is_empty())
            .collect()
    }

    /// The sub-window S(l, a, j) of row a p + j, as one range (none when it is empty).
    fn row_tokens(&self, level: usize, row: usize) -> Vec<Range<usize>> {
        let s = self.sub_window_of_row(level, row);
        if s.is_empty() {
            Vec::new()
        } else {
            vec![s]
        }
    }

    fn row_count(&self, level: usize, row: usize) -> usize {
        self.sub_window_of_row(level, row).len()
    }

    /// a p + u with a = floor(i / w_l), u = floor((i mod w_l) / (w_l / p)).
    fn row_of_token(&self, level: usize, i: usize) -> usize {
        let w = self.level(level).window;
        let p = self.levels.p;
        (i / w) * p + (i % w) / (w / p)
    }

    fn kernel_len(&self, level: usize) -> usize {
        window(self.levels.m, level)
    }

    /// The whole window a of row a p + j, kernel index t = token - a w_l.
    fn kernel_taps(&self, level: usize, row: usize) -> Vec<KernelRun> {
        let w = self.level(level).window;
        let (n, a) = (self.levels.n, row / self.levels.p);
        vec![KernelRun {
            tokens: (a * w).min(n)..((a + 1) * w).min(n),
            kernel: 0,
        }]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The key lists of algorithm.md §3 spelled out with the functions of `levels` (the CPU
    /// reference's lists before the trait): the geometry must give them in the same order,
    /// since the reference sums in that order.
    #[test]
    fn line_lists_the_keys_of_section_3_in_order() {
        for &(n, m, p) in &[
            (1, 4, 2),
            (97, 8, 2),
            (1000, 16, 4),
            (1025, 6, 3),
            (300, 1, 1),
        ] {
            let levels = Levels::new(n, m, p);
            for causal in [false, true] {
                let g = Line::new(n, m, p, causal);
                for i in 0..n {
                    let mut fine = Vec::new();
                    for b in near_blocks(i / m, causal, levels.fine_blocks()) {
                        fine.extend((b * m..((b + 1) * m).min(n)).filter(|&t| !causal || t <= i));
                    }
                    let got: Vec<usize> = g.fine_keys(i).into_iter().flatten().collect();
                    assert_eq!(got, fine, "n={n} m={m} p={p} causal={causal} i={i}");
                    for lv in &levels.levels {
                        let mut rows = Vec::new();
                        for b in far_list(i / lv.window, causal, lv.windows) {
                            for j in 0..p {
                                if !sub_window(n, m, p, lv.level, b, j).is_empty() {
                                    rows.push(b * p + j);
                                }
                            }
                        }
                        assert_eq!(g.coarse_rows(i, lv.level), rows, "n={n} i={i}");
                    }
                }
            }
        }
    }
}
