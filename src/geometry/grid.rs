//! The 2D geometry of algorithm.md §9: tokens on an H x W grid in raster order (t = y W + x),
//! fine cells of r x r, coarse cells of side s_l = r 2^(l-1) at level l, each summarised by p
//! coarse keys covering p horizontal bands of s_l / p grid rows. Cells are aligned at (0, 0)
//! and clipped at the bottom and right edges (real token counts). Not causal.
//!
//! Which cells a query of fine cell (A0, B0) sees at level l, with (a, b) = (A0, B0) >> (l-1)
//! its cell at that level: the children of the parent (a/2, b/2)'s 3 x 3 neighbourhood (a
//! 6 x 6 block of level-l cells, clipped to the grid) minus the own 3 x 3 neighbourhood
//! (at most 27 cells), in raster order of the cells. Level 0 is the 3 x 3 fine cells around
//! (A0, B0) at full resolution. Levels stop at the smallest L >= 0 with ceil(H / (r 2^L)) <= 2
//! and ceil(W / (r 2^L)) <= 2: then the parents of level L form at most 2 x 2 cells, all
//! neighbours of each other, so the far lists of level L reach every remaining cell.

use std::ops::Range;

use super::{Geometry, KernelRun};
use crate::levels::{Level, Levels};

/// The shape of a 2D token grid: `h` rows of `w` tokens, in raster order (token t = y w + x).
/// Tensors over a grid have `h * w` rows (the sequence axis).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Grid {
    /// Grid rows H (>= 1).
    pub h: usize,
    /// Grid columns W (>= 1).
    pub w: usize,
}

impl Grid {
    /// A grid of `h` rows and `w` columns.
    pub fn new(h: usize, w: usize) -> Self {
        Self { h, w }
    }

    /// Tokens H W.
    pub fn tokens(&self) -> usize {
        self.h * self.w
    }

    /// Coarse levels L of cells r x r on this grid: the smallest L >= 0 with
    /// ceil(H / (r 2^L)) <= 2 and ceil(W / (r 2^L)) <= 2 (algorithm.md §9).
    pub fn num_levels(&self, r: usize) -> usize {
        let side = self.h.max(self.w);
        let mut l = 0;
        while side.div_ceil(r.saturating_mul(1usize << l.min(62))) > 2 {
            l += 1;
        }
        l
    }
}

impl std::fmt::Display for Grid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}x{}", self.h, self.w)
    }
}

/// Cell side s_l = r 2^(l-1) of coarse level `level` >= 1 (s_1 = r, the fine cell).
pub fn cell_side(r: usize, level: usize) -> usize {
    debug_assert!(level >= 1);
    r << (level - 1)
}

/// The (r, p) the GPU plans a grid with, asked for with cell side `r` and rank `p`: (r, p)
/// itself when r < max(H, W); (max(H, W), 1) when r >= max(H, W). A cell of at least the grid's
/// longer side puts every token in cell (0, 0), so L = 0, the near field is the whole grid and
/// p is used nowhere: every such r has the index maps of r = max(H, W) (as
/// `levels::effective_block` in 1D), and no size the plans compute grows with r beyond that.
pub fn effective_cell(grid: Grid, r: usize, p: usize) -> (usize, usize) {
    let side = grid.h.max(grid.w).max(1);
    if r >= side {
        (side, 1)
    } else {
        (r, p)
    }
}

/// The 2D geometry: a [`Grid`], cell side r and rank p (p divides r).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GridGeometry {
    grid: Grid,
    r: usize,
    p: usize,
    levels: usize,
    /// First row of each level 1..=L in the concatenated coarse buffer, and the total last.
    offsets: Vec<usize>,
}

impl GridGeometry {
    /// The geometry of `grid` with fine cells of `r` x `r` and `p` coarse keys per cell
    /// (r >= 1, p >= 1 divides r; `FmaConfig::validate` checks both).
    pub fn new(grid: Grid, r: usize, p: usize) -> Self {
        assert!(
            r >= 1 && p >= 1 && r.is_multiple_of(p),
            "cell side r = {r} and rank p = {p}"
        );
        let levels = grid.num_levels(r);
        let mut offsets = vec![0];
        for l in 1..=levels {
            let s = cell_side(r, l);
            let last = offsets.last().copied().unwrap_or(0);
            offsets.push(last + grid.h.div_ceil(s) * grid.w.div_ceil(s) * p);
        }
        Self {
            grid,
            r,
            p,
            levels,
            offsets,
        }
    }

    /// The grid.
    pub fn grid(&self) -> Grid {
        self.grid
    }

    /// The fine cell side r.
    pub fn cell(&self) -> usize {
        self.r
    }

    /// Queries of the largest fine cell: min(r, H) min(r, W) (a GPU workgroup's rows).
    pub fn block_queries(&self) -> usize {
        self.r.min(self.grid.h) * self.r.min(self.grid.w)
    }

    /// The levels as the GPU plans and parameter blocks use them (`Levels`, read in 2D terms):
    /// `n` = H W, `m` = r, `p`, and per level l the cell side s_l as `window`, the cells
    /// ceil(H / s_l) ceil(W / s_l) as `windows`, and the first row of the level. Its
    /// `fine_blocks()` is the 1D count; the fine cells are `cells(0)`.
    pub fn plan_levels(&self) -> Levels {
        let levels = (1..=self.levels)
            .map(|l| {
                let (rows, cols) = self.cells(l);
                Level {
                    level: l,
                    window: cell_side(self.r, l),
                    windows: rows * cols,
                    row_offset: self.offsets[l - 1],
                }
            })
            .collect();
        Levels {
            n: self.grid.tokens(),
            m: self.r,
            p: self.p,
            levels,
        }
    }

    /// Cells (rows, columns) of level `level` (0: the fine cells; l >= 1: cells of side s_l).
    pub fn cells(&self, level: usize) -> (usize, usize) {
        let s = self.side(level);
        (self.grid.h.div_ceil(s), self.grid.w.div_ceil(s))
    }

    fn side(&self, level: usize) -> usize {
        if level == 0 {
            self.r
        } else {
            cell_side(self.r, level)
        }
    }

    /// (y, x) of token t.
    fn yx(&self, t: usize) -> (usize, usize) {
        (t / self.grid.w, t % self.grid.w)
    }

    /// The far cells (row-major cell indices of the level) of the level-`level` cell (a, b):
    /// children of the parent's 3 x 3 minus the own 3 x 3, in raster order.
    pub fn far_cells(&self, level: usize, a: usize, b: usize) -> Vec<usize> {
        let (rows, cols) = self.cells(level);
        let span =
            |c: usize, count: usize| (2 * (c / 2)).saturating_sub(2)..(2 * (c / 2) + 4).min(count);
        let mut out = Vec::new();
        for y in span(a, rows) {
            for x in span(b, cols) {
                if y.abs_diff(a) > 1 || x.abs_diff(b) > 1 {
                    out.push(y * cols + x);
                }
            }
        }
        out
    }

    /// Grid rows [y0, y1) of band j of a level-`level` cell in cell row a (clipped to H).
    fn band_rows(&self, level: usize, a: usize, j: usize) -> Range<usize> {
        let s = self.side(level);
        let band = s / self.p;
        let y0 = (a * s + j * band).min(self.grid.h);
        y0..(a * s + (j + 1) * band).min(self.grid.h)
    }

    /// Grid columns of a level-`level` cell in cell column b (clipped to W).
    fn cell_cols(&self, level: usize, b: usize) -> Range<usize> {
        let s = self.side(level);
        (b * s).min(self.grid.w)..((b + 1) * s).min(self.grid.w)
    }
}

impl Geometry for GridGeometry {
    fn tokens(&self) -> usize {
        self.grid.tokens()
    }

    fn rank(&self) -> usize {
        self.p
    }

    fn num_levels(&self) -> usize {
        self.levels
    }

    fn level_rows(&self, level: usize) -> usize {
        self.offsets[level] - self.offsets[level - 1]
    }

    fn row_offset(&self, level: usize) -> usize {
        self.offsets[level - 1]
    }

    fn total_rows(&self) -> usize {
        self.offsets.last().copied().unwrap_or(0)
    }

    fn causal(&self) -> bool {
        false
    }

    fn query_blocks(&self) -> usize {
        let (rows, cols) = self.cells(0);
        rows * cols
    }

    fn block_of(&self, i: usize) -> usize {
        let (y, x) = self.yx(i);
        (y / self.r) * self.cells(0).1 + x / self.r
    }

    /// The 3 x 3 fine cells around the query's cell: one run of up to 3r tokens per grid row.
    fn fine_keys(&self, i: usize) -> Vec<Range<usize>> {
        let (y, x) = self.yx(i);
        let (a, b) = (y / self.r, x / self.r);
        let w = self.grid.w;
        let x0 = b.saturating_sub(1) * self.r;
        let x1 = ((b + 2) * self.r).min(w);
        let y0 = a.saturating_sub(1) * self.r;
        let y1 = ((a + 2) * self.r).min(self.grid.h);
        (y0..y1).map(|yy| yy * w + x0..yy * w + x1).collect()
    }

    /// The far cells of the query's level-`level` cell, each cell's p bands in order of j,
    /// empty bands left out.
    fn coarse_rows(&self, i: usize, level: usize) -> Vec<usize> {
        let (y, x) = self.yx(i);
        let s = self.side(level);
        let cols = self.cells(level).1;
        let p = self.p;
        self.far_cells(level, y / s, x / s)
            .into_iter()
            .flat_map(|c| c * p..(c + 1) * p)
            .filter(|&row| !self.band_rows(level, row / p / cols, row % p).is_empty())
            .collect()
    }

    /// Band j of cell (A, B), row (A ncols_l + B) p + j: one token run per grid row of the band.
    fn row_tokens(&self, level: usize, row: usize) -> Vec<Range<usize>> {
        let cols = self.cells(level).1;
        let (cell, j) = (row / self.p, row % self.p);
        let xs = self.cell_cols(level, cell % cols);
        let w = self.grid.w;
        self.band_rows(level, cell / cols, j)
            .map(|y| y * w + xs.start..y * w + xs.end)
            .collect()
    }

    fn row_count(&self, level: usize, row: usize) -> usize {
        let cols = self.cells(level).1;
        let (cell, j) = (row / self.p, row % self.p);
        self.band_rows(level, cell / cols, j).len() * self.cell_cols(level, cell % cols).len()
    }

    /// (y / s_l * ncols_l + x / s_l) p + (y mod s_l) / (s_l / p).
    fn row_of_token(&self, level: usize, i: usize) -> usize {
        let (y, x) = self.yx(i);
        let s = self.side(level);
        let cols = self.cells(level).1;
        ((y / s) * cols + x / s) * self.p + (y % s) / (s / self.p)
    }

    fn kernel_len(&self, level: usize) -> usize {
        let s = cell_side(self.r, level);
        s * s
    }

    /// The whole cell of the row (every band reads it), one run per grid row; kernel index
    /// dy s_l + dx for the token at (A s_l + dy, B s_l + dx).
    fn kernel_taps(&self, level: usize, row: usize) -> Vec<KernelRun> {
        let s = self.side(level);
        let cols = self.cells(level).1;
        let cell = row / self.p;
        let (a, b) = (cell / cols, cell % cols);
        let xs = self.cell_cols(level, b);
        let w = self.grid.w;
        ((a * s).min(self.grid.h)..((a + 1) * s).min(self.grid.h))
            .map(|y| KernelRun {
                tokens: y * w + xs.start..y * w + xs.end,
                kernel: (y - a * s) * s,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_stop_when_the_parent_grid_is_at_most_two_by_two() {
        for (h, w) in [(1, 1), (7, 5), (33, 20), (45, 70), (64, 64), (1, 200)] {
            for r in [1, 2, 4, 8] {
                let g = Grid::new(h, w);
                let l = g.num_levels(r);
                let fits = |l: usize| h.div_ceil(r << l) <= 2 && w.div_ceil(r << l) <= 2;
                assert!(fits(l), "{g} r={r} L={l}");
                assert!(l == 0 || !fits(l - 1), "{g} r={r} L={l} not smallest");
            }
        }
        assert_eq!(Grid::new(64, 64).num_levels(8), 2);
        assert_eq!(Grid::new(16, 16).num_levels(8), 0);
    }

    #[test]
    fn an_inner_cell_has_27_far_cells() {
        let g = GridGeometry::new(Grid::new(64, 64), 4, 2);
        // Level 1 cell (5, 6) of a 16 x 16 cell grid: parent (2, 3), its 3x3 spans children
        // rows 2..8, cols 4..10: 36 cells minus the own 3x3.
        let far = g.far_cells(1, 5, 6);
        assert_eq!(far.len(), 27);
        assert!(far.contains(&(2 * 16 + 4)) && !far.contains(&(5 * 16 + 6)));
        // A corner cell sees the 4 x 4 block minus its 2 x 2 neighbourhood.
        assert_eq!(g.far_cells(1, 0, 0).len(), 12);
    }

    /// The GPU backward gathers with the inverse maps, and in 2D it takes each as the map
    /// itself (`near_query_run` = `near_run`, `level_far_readers` = `level_far_run` in
    /// geometry_grid.wgsl): key t is in the near field of query i if and only if i is in
    /// t's, and cell b is in the far list of cell a if and only if a is in b's, on the awkward
    /// grids of `geometry::cases` for every r and p.
    #[test]
    fn near_and_far_relations_are_symmetric() {
        for (h, w) in [(1, 1), (7, 5), (33, 20), (45, 70), (64, 64)] {
            for r in [1, 2, 4, 8] {
                let g = GridGeometry::new(Grid::new(h, w), r, 1);
                let n = g.tokens();
                // sees[i * n + t]: query i sees key t at full resolution.
                let mut sees = vec![false; n * n];
                for i in 0..n {
                    for t in g.fine_keys(i).into_iter().flatten() {
                        assert!(!sees[i * n + t], "{h}x{w} r={r}: key {t} twice for {i}");
                        sees[i * n + t] = true;
                    }
                }
                for i in 0..n {
                    for t in 0..i {
                        assert_eq!(
                            sees[i * n + t],
                            sees[t * n + i],
                            "{h}x{w} r={r}: near field of queries {i} and {t}"
                        );
                    }
                }
                for level in 1..=g.num_levels() {
                    let (rows, cols) = g.cells(level);
                    for a in 0..rows * cols {
                        for b in g.far_cells(level, a / cols, a % cols) {
                            assert!(
                                g.far_cells(level, b / cols, b % cols).contains(&a),
                                "{h}x{w} r={r} level {level}: {b} in far({a}), not {a} in far({b})"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn bands_are_horizontal_runs_of_the_cell() {
        // 14 x 5 grid, r = 4, p = 2 (L = 1, 4 x 2 cells): cell (1, 1) covers rows 4..8, cols
        // 4..5, band 0 rows 4..6; cell (3, 1) covers row 12..14 (clipped), band 1 is empty.
        let g = GridGeometry::new(Grid::new(14, 5), 4, 2);
        assert_eq!(g.num_levels(), 1);
        assert_eq!(g.row_tokens(1, 3 * 2), vec![24..25, 29..30]);
        assert_eq!(g.row_tokens(1, 3 * 2 + 1), vec![34..35, 39..40]);
        assert_eq!(g.row_tokens(1, 7 * 2), vec![64..65, 69..70]);
        assert_eq!(g.row_count(1, 7 * 2 + 1), 0);
        assert_eq!(g.row_of_token(1, 69), 7 * 2);
    }
}
