//! The geometries every generic test runs on: the geometry laws (`geometry::tests`) and the
//! tiling property of the reference's key lists (`cpu::tests`). A new geometry adds its cases
//! here and gets those tests without touching them.

use super::{Geometry, Grid, GridGeometry, Line};

/// (m, p) pairs of the 1D cases: m = 1 (no sub-windows to split), p = 1, p = m, p odd, large m.
const LINE_BLOCKS: [(usize, usize); 6] = [(1, 1), (2, 1), (4, 2), (6, 3), (16, 4), (64, 2)];

/// Sequence lengths of the 1D cases (algorithm.md §7): tiny, odd, prime, powers of two and
/// one past them, partial last blocks, windows and sub-windows.
const LINE_LENGTHS: [usize; 10] = [1, 2, 3, 7, 31, 97, 128, 200, 1000, 1025];

/// Grids of the 2D cases (algorithm.md §9): one token, odd sides, partial cells at the bottom
/// and right edges, non-square both ways, a power of two.
const GRIDS: [(usize, usize); 5] = [(1, 1), (7, 5), (33, 20), (45, 70), (64, 64)];

/// (r, p) pairs of the 2D cases: r in {2, 4, 8}, p in {1, 2, 4} where p divides r.
const GRID_CELLS: [(usize, usize); 8] = [
    (2, 1),
    (2, 2),
    (4, 1),
    (4, 2),
    (4, 4),
    (8, 1),
    (8, 2),
    (8, 4),
];

/// Every test geometry with a label for failure messages.
pub(crate) fn all() -> Vec<(String, Box<dyn Geometry>)> {
    let mut out: Vec<(String, Box<dyn Geometry>)> = Vec::new();
    for (m, p) in LINE_BLOCKS {
        for n in LINE_LENGTHS {
            for causal in [false, true] {
                out.push((
                    format!("line n={n} m={m} p={p} causal={causal}"),
                    Box::new(Line::new(n, m, p, causal)),
                ));
            }
        }
    }
    for (h, w) in GRIDS {
        for (r, p) in GRID_CELLS {
            out.push((
                format!("grid {h}x{w} r={r} p={p}"),
                Box::new(GridGeometry::new(Grid::new(h, w), r, p)),
            ));
        }
    }
    out
}
