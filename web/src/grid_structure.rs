//! What the page's 2D view draws: which pixels one query of an H x W grid sees at full
//! resolution and which bands it sees as one coarse key per level, taken from the library's 2D
//! geometry (`GridGeometry`'s near keys, far rows and their tokens; algorithm.md §9), not
//! re-derived here.

use multipole_attn::geometry::{cell_side, Geometry, GridGeometry};
use multipole_attn::FmaError;
use serde::Serialize;
use std::ops::Range;
use wasm_bindgen::prelude::*;

use crate::options::Options;

/// Pixels [y0, y1) x [x0, x1) of the grid.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Rect {
    /// First grid row.
    pub y0: usize,
    /// First grid column.
    pub x0: usize,
    /// One past the last grid row.
    pub y1: usize,
    /// One past the last grid column.
    pub x1: usize,
}

impl Rect {
    /// Pixels in the rectangle.
    pub fn area(&self) -> usize {
        (self.y1 - self.y0) * (self.x1 - self.x0)
    }
}

/// One coarse key the query sees: band `j` (s_l / p grid rows of a cell of side s_l) of cell
/// `cell` (row-major among level `level`'s cells).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct GridBand {
    /// Coarse level l >= 1.
    pub level: usize,
    /// The cell, row-major among the level's cells.
    pub cell: usize,
    /// The band (coarse key) j < p of the cell.
    pub j: usize,
    /// The band's pixels (clipped at the grid's bottom and right edges).
    pub rect: Rect,
}

/// The cells of one level.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct GridLevel {
    /// 0 = fine cells; l >= 1 = coarse level l.
    pub level: usize,
    /// Cell side (r at levels 0 and 1, r 2^(l-1) at level l).
    pub side: usize,
    /// Cell rows ceil(H / side).
    pub rows: usize,
    /// Cell columns ceil(W / side).
    pub cols: usize,
}

/// One query's view of the grid.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct GridStructure {
    /// Grid rows H.
    pub h: usize,
    /// Grid columns W.
    pub w: usize,
    /// The query token t = y W + x.
    pub query: usize,
    /// Level 0 (fine cells) then coarse levels 1..=L.
    pub levels: Vec<GridLevel>,
    /// The keys seen at full resolution: the 3 x 3 fine cells around the query's cell (clipped).
    pub near: Rect,
    /// Every coarse key the query sees, level 1 first; with `near` they cover the grid exactly
    /// once.
    pub far: Vec<GridBand>,
    /// Keys the query attends to (fine plus coarse), against H W for dense attention.
    pub keys: usize,
}

/// The smallest rectangle holding the token runs `runs` of a grid of width `w` (each run
/// within one grid row).
fn bounding(runs: &[Range<usize>], w: usize) -> Rect {
    let mut r = Rect {
        y0: usize::MAX,
        x0: usize::MAX,
        y1: 0,
        x1: 0,
    };
    for run in runs.iter().filter(|run| !run.is_empty()) {
        let y = run.start / w;
        r.y0 = r.y0.min(y);
        r.y1 = r.y1.max(y + 1);
        r.x0 = r.x0.min(run.start % w);
        r.x1 = r.x1.max((run.end - 1) % w + 1);
    }
    r
}

/// The view of query `query` for the 2D options `opts` (`grid` required).
pub fn grid_structure_of(opts: &Options, query: usize) -> Result<GridStructure, JsError> {
    let cfg = opts.config()?;
    let Some(grid) = cfg.grid else {
        return Err(FmaError::InvalidConfig {
            what: "grid",
            value: "none".into(),
            allowed: "[H, W] with H W = n (gridStructure is the 2D view; structure is 1D)".into(),
        }
        .into());
    };
    if query >= opts.n {
        return Err(FmaError::ShapeMismatch {
            what: "query index".into(),
            expected: format!("< n = {}", opts.n),
            got: query.to_string(),
        }
        .into());
    }
    // The CPU reference's geometry (the GPU's `effective_cell` has the same index maps).
    let geometry = GridGeometry::new(grid, cfg.block, cfg.rank);
    let p = geometry.rank();
    let levels = (0..=geometry.num_levels())
        .map(|l| {
            let (rows, cols) = geometry.cells(l);
            GridLevel {
                level: l,
                side: if l == 0 {
                    cfg.block
                } else {
                    cell_side(cfg.block, l)
                },
                rows,
                cols,
            }
        })
        .collect();
    let near_runs = geometry.fine_keys(query);
    let mut keys: usize = near_runs.iter().map(|r| r.len()).sum();
    let near = bounding(&near_runs, grid.w);
    let mut far = Vec::new();
    for level in 1..=geometry.num_levels() {
        for row in geometry.coarse_rows(query, level) {
            far.push(GridBand {
                level,
                cell: row / p,
                j: row % p,
                rect: bounding(&geometry.row_tokens(level, row), grid.w),
            });
            keys += 1;
        }
    }
    Ok(GridStructure {
        h: grid.h,
        w: grid.w,
        query,
        levels,
        near,
        far,
        keys,
    })
}

/// JS `gridStructure(options, query)` for options with `grid: [H, W]` and the query token
/// t = y W + x: `{ h, w, query, levels: [{ level, side, rows, cols }], near: { y0, x0, y1, x1 },
/// far: [{ level, cell, j, rect: { y0, x0, y1, x1 } }], keys }`.
#[wasm_bindgen(js_name = gridStructure, unchecked_return_type = "GridStructure")]
pub fn grid_structure(
    #[wasm_bindgen(unchecked_param_type = "FmaOptions")] options: JsValue,
    query: u32,
) -> Result<JsValue, JsError> {
    let s = grid_structure_of(&Options::from_js(options)?, query as usize)?;
    serde_wasm_bindgen::to_value(&s).map_err(|e| JsError::new(&e.to_string()))
}
