// The 2D index maps of algorithm.md §9: tokens on an H x W grid in raster order (t = y W + x,
// H = n / W), fine cells of m x m (m is the cell side r), coarse cells of side w = m 2^lvl at
// level index lvl, p horizontal bands of w / p grid rows per cell, cells aligned at (0, 0) and
// clipped at the bottom and right edges. The geometry interface of shared/geometry.wgsl (its
// second half, same names and signatures), which the composer imports as `geometry` for a 2D
// plan. CPU mirror: `src/geometry/grid.rs` (`GridGeometry`); `tests/gpu/grid.rs` compares the
// forward through these maps with the CPU reference. Pure functions of their arguments; `cols`
// is W. A group is a cell, row-major (A * columns + B); coarse row (A * columns + B) p + j.
// Not causal: the `causal` arguments are ignored.

// Groups of w tokens that cover n tokens, as in 1D (the cells per side below use it).
fn window_count(n: u32, w: u32) -> u32 {
    return (n + w - 1u) / w;
}

// (rows, columns) of cells of side w.
fn cells_of(n: u32, cols: u32, w: u32) -> vec2<u32> {
    return vec2<u32>(window_count(n / cols, w), window_count(cols, w));
}

// The fine cells of the tokens [lo, hi): (first, count), row-major. [lo, hi) is the whole grid,
// or a split head's chunk (plan/split.rs): whole rows of fine cells (lo a multiple of m W, hi
// too or n), whose cells are consecutive.
fn chunk_blocks(lo: u32, hi: u32, m: u32, cols: u32) -> vec2<u32> {
    let g = chunk_groups(lo, hi, m, cols);
    return vec2<u32>(g.x, g.y - g.x);
}

// Grid rows and columns of cell a of side w: vec4(y0, y1, x0, x1), clipped.
fn cell_box(n: u32, cols: u32, w: u32, a: u32) -> vec4<u32> {
    let c = cells_of(n, cols, w);
    let ya = (a / c.y) * w;
    let xa = (a % c.y) * w;
    return vec4<u32>(ya, min(ya + w, n / cols), xa, min(xa + w, cols));
}

fn block_size(n: u32, m: u32, cols: u32, a0: u32) -> u32 {
    let b = cell_box(n, cols, m, a0);
    return (b.y - b.x) * (b.w - b.z);
}

// Query q of the cell in raster order within the cell.
fn block_token(n: u32, m: u32, cols: u32, a0: u32, q: u32) -> u32 {
    let b = cell_box(n, cols, m, a0);
    let bw = b.w - b.z;
    return (b.x + q / bw) * cols + b.z + q % bw;
}

// The 3 x 3 fine cells around a0: one run of up to 3 m tokens per grid row.
fn near_runs(n: u32, m: u32, cols: u32, a0: u32) -> u32 {
    let c = cells_of(n, cols, m);
    let a = a0 / c.y;
    let y0 = select(0u, (a - 1u) * m, a > 0u);
    return min((a + 2u) * m, n / cols) - y0;
}

fn near_run(n: u32, m: u32, cols: u32, a0: u32, causal: bool, run: u32) -> vec2<u32> {
    let c = cells_of(n, cols, m);
    let a = a0 / c.y;
    let b = a0 % c.y;
    let y = select(0u, (a - 1u) * m, a > 0u) + run;
    let x0 = select(0u, (b - 1u) * m, b > 0u);
    let x1 = min((b + 2u) * m, cols);
    return vec2<u32>(y * cols + x0, y * cols + x1);
}

// The level-lvl cell (side m 2^lvl) holding fine cell a0: (A0 >> lvl, B0 >> lvl).
fn level_group(n: u32, m: u32, cols: u32, a0: u32, lvl: u32) -> u32 {
    let c0 = cells_of(n, cols, m);
    let cl = cells_of(n, cols, m << lvl);
    return ((a0 / c0.y) >> lvl) * cl.y + ((a0 % c0.y) >> lvl);
}

// The far list of a cell is the children of its parent's 3 x 3 (6 x 6 cells) minus its own
// 3 x 3: per row of the 6, one run, or two (left and right of the own 3 x 3) in the own rows.
const FAR_RUNS: u32 = 12u;

// Run `run`: row run / 2 of the 6 (from the top), piece run % 2; cell indices (row-major) of
// the level's cells, clipped to the grid; empty runs are (0, 0).
fn level_far_run(n: u32, m: u32, cols: u32, lvl: u32, a: u32, groups: u32, causal: bool,
                 run: u32) -> vec2<u32> {
    let cl = cells_of(n, cols, m << lvl);
    let ca = a / cl.y;
    let cb = a % cl.y;
    let yy = 2u * (ca / 2u) + run / 2u; // the row plus 2
    if (yy < 2u || yy - 2u >= cl.x) {
        return vec2<u32>(0u, 0u);
    }
    let y = yy - 2u;
    let xlo = select(0u, 2u * (cb / 2u) - 2u, cb >= 2u);
    let xhi = min(2u * (cb / 2u) + 4u, cl.y);
    let own = y + 1u >= ca && y <= ca + 1u;
    var first = xlo;
    var end = xhi;
    if (!own) {
        if (run % 2u == 1u) {
            return vec2<u32>(0u, 0u);
        }
    } else if (run % 2u == 0u) {
        end = max(xlo, select(0u, cb - 1u, cb >= 1u));
    } else {
        first = min(cb + 2u, xhi);
    }
    return vec2<u32>(y * cl.y + first, y * cl.y + max(first, end));
}

// The cells of side w holding tokens of [lo, hi): (first, end), row-major, the cells of the
// grid rows lo / cols .. ceil(hi / cols). All of them for [0, n); for a split head's chunk
// (whole rows of fine cells) at w = m, its level-1 cells, which no other chunk holds.
fn chunk_groups(lo: u32, hi: u32, w: u32, cols: u32) -> vec2<u32> {
    let per_row = window_count(cols, w);
    let y1 = window_count(hi, cols);
    return vec2<u32>((lo / cols / w) * per_row, window_count(y1, w) * per_row);
}

// Grid rows of band j of cell a (side w), and its columns: vec4(y0, y1, x0, x1), clipped.
fn band_box(n: u32, w: u32, p: u32, cols: u32, row: u32) -> vec4<u32> {
    let b = cell_box(n, cols, w, row / p);
    let band = w / p;
    let y0 = min(b.x + (row % p) * band, b.y);
    return vec4<u32>(y0, min(y0 + band, b.y), b.z, b.w);
}

fn row_count(n: u32, w: u32, p: u32, cols: u32, row: u32) -> u32 {
    let b = band_box(n, w, p, cols, row);
    return (b.y - b.x) * (b.w - b.z);
}

// Token t of band `row` in raster order.
fn row_token(n: u32, w: u32, p: u32, cols: u32, row: u32, t: u32) -> u32 {
    let b = band_box(n, w, p, cols, row);
    let bw = b.w - b.z;
    return (b.x + t / bw) * cols + b.z + t % bw;
}

// The band holding token t at cell side w: (A columns + B) p + (y mod w) / (w / p).
fn row_of(n: u32, w: u32, p: u32, cols: u32, t: u32) -> u32 {
    let c = cells_of(n, cols, w);
    let y = t / cols;
    let x = t % cols;
    return ((y / w) * c.y + x / w) * p + (y % w) / (w / p);
}

// Band j of a cell is 2 bands of the level below (rows) times 2 cells (columns).
const CHILDREN: u32 = 4u;

// Child h: column 2B + h % 2, band 2j + h / 2 counted from the cell's top in bands of the
// level below (cell row 2A + that / p, band that % p).
fn row_child(n: u32, w: u32, p: u32, cols: u32, a: u32, j: u32, h: u32) -> vec2<u32> {
    let cl = cells_of(n, cols, w);
    let half = w / 2u;
    let cc = cells_of(n, cols, half);
    let jj = 2u * j + h / 2u;
    let y = 2u * (a / cl.y) + jj / p;
    let x = 2u * (a % cl.y) + h % 2u;
    if (y >= cc.x || x >= cc.y) {
        return vec2<u32>(0u, 0u);
    }
    let row = (y * cc.y + x) * p + jj % p;
    return vec2<u32>(row, row_count(n, half, p, cols, row));
}

fn kernel_len(w: u32) -> u32 {
    return w * w;
}

fn group_taps(n: u32, w: u32, cols: u32, a: u32) -> u32 {
    let b = cell_box(n, cols, w, a);
    return (b.y - b.x) * (b.w - b.z);
}

// Tap t of cell a in raster order: (token, kernel index dy w + dx).
fn group_tap(n: u32, w: u32, cols: u32, a: u32, t: u32) -> vec2<u32> {
    let b = cell_box(n, cols, w, a);
    let bw = b.w - b.z;
    let dy = t / bw;
    let dx = t % bw;
    return vec2<u32>((b.x + dy) * cols + b.z + dx, dy * w + dx);
}

// ---- The inverse maps of the backward passes. In 2D both relations are symmetric (cells'
// Chebyshev distance: near <= 1; far > 1 with parents at <= 1), so each inverse is the map
// itself; `geometry::grid` tests the symmetry on GridGeometry.

// The query tokens whose near field holds fine cell b: the 3 x 3 cells around b.
fn near_query_runs(n: u32, m: u32, cols: u32, b: u32) -> u32 {
    return near_runs(n, m, cols, b);
}

fn near_query_run(n: u32, m: u32, cols: u32, b: u32, causal: bool, run: u32) -> vec2<u32> {
    return near_run(n, m, cols, b, causal, run);
}

// The cells whose far list holds cell b: b's far list.
fn level_far_readers(n: u32, m: u32, cols: u32, lvl: u32, b: u32, groups: u32, causal: bool,
                     run: u32) -> vec2<u32> {
    return level_far_run(n, m, cols, lvl, b, groups, causal, run);
}

// The kernel index dy w + dx of token t = (y, x) in its cell of side w.
fn tap_of(n: u32, w: u32, cols: u32, t: u32) -> u32 {
    return ((t / cols) % w) * w + (t % cols) % w;
}

// The token at kernel index k = dy w + dx of cell a, or NO_TOKEN beyond the grid.
const NO_TOKEN: u32 = 0xffffffffu;

fn tap_token(n: u32, w: u32, cols: u32, a: u32, k: u32) -> u32 {
    let b = cell_box(n, cols, w, a);
    let y = b.x + k / w;
    let x = b.z + k % w;
    return select(NO_TOKEN, y * cols + x, y < b.y && x < b.w);
}
