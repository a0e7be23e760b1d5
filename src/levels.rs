//! The index maps of algorithm.md §2-3: levels, windows, sub-windows, near blocks, far lists.
//!
//! Everything here is pure integer arithmetic on (n, m, p), the home of the 1D index maps: the
//! scheduler (`plan*.rs`) uses these functions directly, the CPU reference through the
//! [`Geometry`](crate::geometry::Geometry) trait that [`Line`](crate::geometry::Line) implements
//! with them, and the GPU passes mirror them in WGSL in `shaders/shared/geometry.wgsl` (being
//! written with the shader restructuring on its own branch).
//!
//! Which keys a query in fine block `a0 = 6` sees, bidirectional, n = 16 m (each coarse window
//! stands for p coarse keys, one per sub-window; every position is covered exactly once):
//!
//! ```text
//! fine block   0  1  2  3  4  5  6  7  8  9  10 11 12 13 14 15
//! level 0                     F  F  F                          near field of a0 = 6, key by key
//! level 1                  1           1  1                    w = m:  windows 4, 8, 9
//! level 2      2---2 2---2                   2---2             w = 2m: windows 0, 1, 5
//! level 3                                          3---------3 w = 4m: window 3
//! ```
//! Causal: level 0 keeps blocks 5 and 6 (keys t <= i), level 1 window 4, level 2 windows 0, 1.
//! Every key position is covered exactly once (the tiling property, tested in `cpu::tests`).

use std::ops::Range;

/// The number of coarse levels L: the smallest L >= 0 with ceil(n / (m * 2^L)) <= 2.
pub fn num_levels(n: usize, m: usize) -> usize {
    let mut l = 0;
    while n.div_ceil(m.saturating_mul(1usize << l.min(62))) > 2 {
        l += 1;
    }
    l
}

/// The (m, p) the index maps use for a sequence of `n` tokens asked for with block size `m`
/// and rank `p`: (m, p) itself when m < n; (n, 1) when m >= n. A block size of at least n puts
/// every token in fine block 0, so L = 0, the near field is the whole sequence and p is used
/// nowhere: every such m has the same index maps, those of m = n. Clamping here keeps every
/// size computed from m (query tiles, dispatches, loops, u32 token arithmetic in the shaders)
/// bounded by n, so m = 2^31 - 1 costs what m = n does and gives the same bits.
pub fn effective_block(n: usize, m: usize, p: usize) -> (usize, usize) {
    let n = n.max(1);
    if m >= n {
        (n, 1)
    } else {
        (m, p)
    }
}

/// Window size w_l = m * 2^(l-1) at coarse level `l >= 1` (w_1 = m).
pub fn window(m: usize, level: usize) -> usize {
    debug_assert!(level >= 1);
    m << (level - 1)
}

/// Token range of sub-window `j` of window `a` at level `l`, clipped to [0, n) (may be empty).
pub fn sub_window(n: usize, m: usize, p: usize, level: usize, a: usize, j: usize) -> Range<usize> {
    let w = window(m, level);
    let s = w / p;
    let start = (a * w + j * s).min(n);
    let end = (a * w + (j + 1) * s).min(n);
    start..end
}

/// Fine blocks a query of block `a0` sees at level 0 (clipped to the blocks that exist).
/// Bidirectional: a0-1, a0, a0+1. Causal: a0-1, a0 (and within a0 only keys t <= i).
pub fn near_blocks(a0: usize, causal: bool, num_blocks: usize) -> Range<usize> {
    let lo = a0.saturating_sub(1);
    let hi = if causal { a0 + 1 } else { a0 + 2 };
    lo..hi.min(num_blocks)
}

/// The far list of window `a` at a coarse level, as windows that exist (0 <= b < num_windows).
/// Bidirectional: a even {a-2, a+2, a+3}, a odd {a-3, a-2, a+2}. Causal: a even {a-2}, a odd
/// {a-3, a-2}. It is the children of the parent's neighbours minus one's own neighbours.
pub fn far_list(a: usize, causal: bool, num_windows: usize) -> Vec<usize> {
    let a = a as isize;
    let cand: &[isize] = match (causal, a % 2 == 0) {
        (false, true) => &[-2, 2, 3],
        (false, false) => &[-3, -2, 2],
        (true, true) => &[-2],
        (true, false) => &[-3, -2],
    };
    cand.iter()
        .map(|off| a + off)
        .filter(|&b| b >= 0 && (b as usize) < num_windows)
        .map(|b| b as usize)
        .collect()
}

/// One coarse level's geometry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Level {
    /// Level number l >= 1.
    pub level: usize,
    /// Window size w_l = m * 2^(l-1).
    pub window: usize,
    /// Windows at this level: ceil(n / w_l).
    pub windows: usize,
    /// First row of this level in the concatenated coarse buffer [K~_1; ...; K~_L].
    pub row_offset: usize,
}

impl Level {
    /// Coarse rows of this level: windows * p (row a*p + j is coarse key j of window a).
    pub fn rows(&self, p: usize) -> usize {
        self.windows * p
    }
}

/// The whole level structure for (n, m, p).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Levels {
    /// Sequence length.
    pub n: usize,
    /// Fine block size as the index maps use it: the configured m, or n when m >= n
    /// ([`effective_block`]).
    pub m: usize,
    /// Coarse rank: the configured p, or 1 when m >= n (no coarse level uses it).
    pub p: usize,
    /// Coarse levels 1..=L, in order.
    pub levels: Vec<Level>,
}

impl Levels {
    /// The level structure of a sequence of `n` tokens, block size `m`, rank `p` (m >= n is
    /// stored as (n, 1), see [`effective_block`]).
    pub fn new(n: usize, m: usize, p: usize) -> Self {
        let (m, p) = effective_block(n, m, p);
        let l_count = num_levels(n, m);
        let mut levels = Vec::with_capacity(l_count);
        let mut row_offset = 0;
        for l in 1..=l_count {
            let w = window(m, l);
            let windows = n.div_ceil(w);
            levels.push(Level {
                level: l,
                window: w,
                windows,
                row_offset,
            });
            row_offset += windows * p;
        }
        Self { n, m, p, levels }
    }

    /// Number of coarse levels L.
    pub fn count(&self) -> usize {
        self.levels.len()
    }

    /// Number of fine blocks ceil(n / m).
    pub fn fine_blocks(&self) -> usize {
        self.n.div_ceil(self.m)
    }

    /// Rows of the concatenated coarse buffer over all levels.
    pub fn total_rows(&self) -> usize {
        self.levels
            .last()
            .map_or(0, |l| l.row_offset + l.rows(self.p))
    }
}

impl Levels {
    /// Keys seen by all n queries together (fine keys, plus coarse keys of non-empty
    /// sub-windows): the work of the fused pass is about 4 d times this many flops
    /// (q.k and p v, a multiply and an add each).
    pub fn keys_seen_total(&self, causal: bool) -> u64 {
        let (n, m, p) = (self.n, self.m, self.p);
        let mut total = 0u64;
        for a0 in 0..self.fine_blocks() {
            let queries = (((a0 + 1) * m).min(n) - a0 * m) as u64;
            let near = near_blocks(a0, causal, self.fine_blocks());
            let near_keys = (((near.end) * m).min(n) - near.start * m) as u64;
            total += if causal {
                // Query i sees block a0-1 whole and keys a0*m ..= i of its own block.
                let before = (a0 * m - near.start * m) as u64;
                queries * before + queries * (queries + 1) / 2
            } else {
                queries * near_keys
            };
            for lv in &self.levels {
                let coarse: usize = far_list(a0 * m / lv.window, causal, lv.windows)
                    .into_iter()
                    .map(|b| {
                        (0..p)
                            .filter(|&j| !sub_window(n, m, p, lv.level, b, j).is_empty())
                            .count()
                    })
                    .sum();
                total += queries * coarse as u64;
            }
        }
        total
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_match_the_worked_example() {
        // algorithm.md §2: n = 4096, m = 64 gives L = 5, windows 64 .. 1024.
        let lv = Levels::new(4096, 64, 2);
        assert_eq!(lv.count(), 5);
        let w: Vec<_> = lv.levels.iter().map(|l| l.window).collect();
        assert_eq!(w, vec![64, 128, 256, 512, 1024]);
        assert_eq!(lv.levels[4].windows, 4);
    }

    #[test]
    fn level_count_is_smallest_with_at_most_two_parents() {
        for m in [1, 3, 4, 16, 64] {
            for n in 1..600 {
                let l = num_levels(n, m);
                assert!(n.div_ceil(m << l) <= 2, "n={n} m={m} L={l}");
                if l > 0 {
                    assert!(
                        n.div_ceil(m << (l - 1)) > 2,
                        "n={n} m={m} L={l} not smallest"
                    );
                }
            }
        }
        assert_eq!(num_levels(1, 64), 0);
        assert_eq!(num_levels(128, 64), 0);
        assert_eq!(num_levels(129, 64), 1);
    }

    #[test]
    fn a_block_of_at_least_n_is_the_block_of_n() {
        for n in [1, 7, 64, 97, 1000] {
            let whole = Levels::new(n, n, 1);
            assert_eq!((whole.m, whole.p, whole.count()), (n, 1, 0));
            for (m, p) in [
                (n, 1),
                (n + 1, 1),
                (2 * n, 2),
                ((1 << 31) - 1, 1),
                ((1 << 31) - 1, (1 << 31) - 1),
                (usize::MAX, 1),
            ] {
                assert_eq!(Levels::new(n, m, p), whole, "n={n} m={m} p={p}");
            }
            // Below n the configured block stays.
            if n > 2 {
                assert_eq!(Levels::new(n, n - 1, 1).m, n - 1);
            }
        }
    }

    #[test]
    fn causal_far_windows_end_before_the_query_window() {
        for a in 0..40 {
            for b in far_list(a, true, 100) {
                assert!(
                    b + 2 <= a,
                    "window {b} is not strictly before {a}'s neighbour"
                );
            }
        }
    }

    #[test]
    fn sub_windows_partition_the_window() {
        let (n, m, p) = (1000, 12, 3);
        for l in 1..=num_levels(n, m) {
            let w = window(m, l);
            for a in 0..n.div_ceil(w) {
                let mut next = (a * w).min(n);
                for j in 0..p {
                    let r = sub_window(n, m, p, l, a, j);
                    assert_eq!(r.start, next);
                    next = r.end;
                }
                assert_eq!(next, ((a + 1) * w).min(n));
            }
        }
    }
}
