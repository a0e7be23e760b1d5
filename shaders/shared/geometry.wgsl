// The 1D index maps of algorithm.md §2-3 and their inverses (§8), the only place the WGSL
// spells them out. CPU mirror: `src/levels.rs` (`near_blocks`, `far_list`, `sub_window`,
// `Levels`); `tests/gpu/geometry.rs` compares the two for many (n, m, p).
// Pure functions of their arguments (no params, no bindings), so the file stands alone in a
// test shader, and a 2D geometry can sit beside it with the same function names.
// Token and window ranges are half-open vec2(first, end) with first <= end (Rust's Range).

// Windows (or fine blocks) of w tokens that cover n tokens: ceil(n / w).
fn window_count(n: u32, w: u32) -> u32 {
    return (n + w - 1u) / w;
}

// Tokens of window a of size w, clipped to n.
fn window_range(n: u32, w: u32, a: u32) -> vec2<u32> {
    let first = a * w;
    return vec2<u32>(first, min(first + w, n));
}

// The window at level index lvl (level l = lvl + 1, w_l = m 2^lvl) holding fine block a0:
// the same for every token of the block (algorithm.md §3, block uniformity).
fn block_window(a0: u32, lvl: u32) -> u32 {
    return a0 >> lvl;
}

// S(l, a, j): the tokens of sub-window j of window a (size w, p sub-windows), clipped to n
// (empty at the end of the sequence).
fn sub_window(n: u32, w: u32, p: u32, a: u32, j: u32) -> vec2<u32> {
    let s = w / p;
    let first = a * w + j * s;
    return vec2<u32>(min(first, n), min(first + s, n));
}

// |S(l, a, j)|: real tokens of the sub-window (0 for an empty one).
fn sub_window_count(n: u32, w: u32, p: u32, a: u32, j: u32) -> u32 {
    let r = sub_window(n, w, p, a, j);
    return r.y - r.x;
}

// (a, j) of the sub-window holding token t, at window size w with p sub-windows.
fn sub_window_of(w: u32, p: u32, t: u32) -> vec2<u32> {
    return vec2<u32>(t / w, (t % w) / (w / p));
}

// Child h (0 or 1) of S(l, a, j) at level l - 1 (window size w_l / 2), as (window, sub-window):
// S(l, a, j) is the union of the two consecutive level l-1 sub-windows 2j and 2j + 1 counted
// from window 2a, since its sub-windows are twice as long.
fn sub_window_child(p: u32, a: u32, j: u32, h: u32) -> vec2<u32> {
    let jj = 2u * j + h;
    return vec2<u32>(2u * a + jj / p, jj % p);
}

// Level 0: the key tokens a query of fine block a0 sees at full resolution (blocks a0-1, a0,
// a0+1; causal a0-1 and a0, of which the query's own block only up to the query itself).
fn near_keys(n: u32, m: u32, a0: u32, causal: bool) -> vec2<u32> {
    let first = select(0u, (a0 - 1u) * m, a0 > 0u);
    let last_block = select(a0 + 1u, a0, causal);
    return vec2<u32>(first, min((last_block + 1u) * m, n));
}

// The inverse of near_keys: the query tokens whose near field holds fine block b (every
// query of blocks b-1 .. b+1; causal b and b+1, each query only for keys t <= i).
fn near_queries(n: u32, m: u32, b: u32, causal: bool) -> vec2<u32> {
    let first_block = select(select(0u, b - 1u, b > 0u), b, causal);
    return vec2<u32>(first_block * m, min((b + 2u) * m, n));
}

// A far list and its inverse come as FAR_RUNS runs of consecutive windows (far_run's `run`):
// callers loop over the runs, not over the rule, so a 2D geometry may have more of them.
const FAR_RUNS: u32 = 2u;

// Run `run` of the far list of window a, of the `windows` windows of its level: run 0 the
// windows before a, run 1 those after (algorithm.md §3):
//   bidirectional: a even {a-2}, {a+2, a+3}; a odd {a-3, a-2}, {a+2};
//   causal: run 0 only (the windows after a hold the future).
// It is the children of the parent's neighbours minus one's own neighbours.
fn far_run(a: u32, windows: u32, causal: bool, run: u32) -> vec2<u32> {
    let odd = a & 1u;
    if (run == 0u) {
        let first = select(0u, a - 2u - odd, a >= 2u + odd);
        let end = select(0u, a - 1u, a >= 1u);
        return vec2<u32>(first, end);
    }
    if (causal) {
        return vec2<u32>(0u, 0u);
    }
    return vec2<u32>(min(a + 2u, windows), min(a + 4u - odd, windows));
}

// Windows in the far list of window a (0: this level gives the queries of window a no key).
fn far_count(a: u32, windows: u32, causal: bool) -> u32 {
    let before = far_run(a, windows, causal, 0u);
    let after = far_run(a, windows, causal, 1u);
    return (before.y - before.x) + (after.y - after.x);
}

// The inverse of far_run: run `run` (0 before b, 1 after, in increasing order) of the windows
// whose far list holds window b. The bidirectional list is symmetric (b in far(a) if and only
// if a in far(b)); causally, b is read only by later windows, which are bidirectional far_run's
// run 1: b+2, plus b+3 if b is even.
fn inverse_far_run(b: u32, windows: u32, causal: bool, run: u32) -> vec2<u32> {
    if (causal && run == 0u) {
        return vec2<u32>(0u, 0u);
    }
    return far_run(b, windows, false, run);
}

// ---- The geometry interface of the passes that run in 1D and 2D (fine_attention with
// near_field and far_field, downsample): the same names and signatures in
// shared/geometry_grid.wgsl (the 2D grid of algorithm.md §9), which the composer imports as
// `geometry` instead for a 2D plan (`Specialization::grid`). `cols` is the grid width W, unused
// here. A "group" is a window here (a cell in 2D); a query block is a fine block (a fine cell).
// Here each is the 1D map above, so the 1D passes compute what they computed before, in the
// same order.

// The query blocks of the tokens [lo, hi): (first block, count).
fn chunk_blocks(lo: u32, hi: u32, m: u32, cols: u32) -> vec2<u32> {
    return vec2<u32>(lo / m, window_count(hi - lo, m));
}

// Queries of block a0.
fn block_size(n: u32, m: u32, cols: u32, a0: u32) -> u32 {
    let r = window_range(n, m, a0);
    return r.y - r.x;
}

// The token of query q (< block_size) of block a0.
fn block_token(n: u32, m: u32, cols: u32, a0: u32, q: u32) -> u32 {
    return a0 * m + q;
}

// Runs of consecutive near keys of block a0: near_run(.., run) for run < near_runs.
fn near_runs(n: u32, m: u32, cols: u32, a0: u32) -> u32 {
    return 1u;
}

fn near_run(n: u32, m: u32, cols: u32, a0: u32, causal: bool, run: u32) -> vec2<u32> {
    return near_keys(n, m, a0, causal);
}

// The group at level index lvl (groups of m 2^lvl tokens) holding block a0.
fn level_group(n: u32, m: u32, cols: u32, a0: u32, lvl: u32) -> u32 {
    return block_window(a0, lvl);
}

// Run `run` (< FAR_RUNS) of the far list of group a at level index lvl, of `groups` groups:
// consecutive group indices.
fn level_far_run(n: u32, m: u32, cols: u32, lvl: u32, a: u32, groups: u32, causal: bool,
                 run: u32) -> vec2<u32> {
    return far_run(a, groups, causal, run);
}

// The groups of the tokens [lo, hi) at group size w: (first, end).
fn chunk_groups(lo: u32, hi: u32, w: u32, cols: u32) -> vec2<u32> {
    return vec2<u32>(lo / w, window_count(hi, w));
}

// |S| of coarse row `row` (group row / p, basis row % p) at group size w: its real tokens.
fn row_count(n: u32, w: u32, p: u32, cols: u32, row: u32) -> u32 {
    return sub_window_count(n, w, p, row / p, row % p);
}

// Token t (< row_count) of coarse row `row`.
fn row_token(n: u32, w: u32, p: u32, cols: u32, row: u32, t: u32) -> u32 {
    return sub_window(n, w, p, row / p, row % p).x + t;
}

// The coarse row of group size w holding token t (the coarse query t takes, §6).
fn row_of(n: u32, w: u32, p: u32, cols: u32, t: u32) -> u32 {
    let s = sub_window_of(w, p, t);
    return s.x * p + s.y;
}

// A coarse row is the union of CHILDREN rows of the level below (group size w / 2).
const CHILDREN: u32 = 2u;

// Child h (< CHILDREN) of coarse row (a, j) at group size w: (row of the level below, its
// count; 0 when it lies beyond the tokens).
fn row_child(n: u32, w: u32, p: u32, cols: u32, a: u32, j: u32, h: u32) -> vec2<u32> {
    let child = sub_window_child(p, a, j, h);
    return vec2<u32>(child.x * p + child.y, sub_window_count(n, w / 2u, p, child.x, child.y));
}

// Taps of a learned kernel at group size w (w in 1D, w^2 in 2D).
fn kernel_len(w: u32) -> u32 {
    return w;
}

// Tokens of group a (clipped), which its learned kernel reads.
fn group_taps(n: u32, w: u32, cols: u32, a: u32) -> u32 {
    let r = window_range(n, w, a);
    return r.y - r.x;
}

// Tap t (< group_taps) of group a: (token, kernel index).
fn group_tap(n: u32, w: u32, cols: u32, a: u32, t: u32) -> vec2<u32> {
    return vec2<u32>(a * w + t, t);
}

// ---- The inverse maps of the backward passes (algorithm.md §8: gather, not scatter), the same
// names and signatures in shared/geometry_grid.wgsl.

// Runs of consecutive query tokens whose near field holds fine block b: near_query_run(..,
// run) for run < near_query_runs. Here one run, near_queries.
fn near_query_runs(n: u32, m: u32, cols: u32, b: u32) -> u32 {
    return 1u;
}

fn near_query_run(n: u32, m: u32, cols: u32, b: u32, causal: bool, run: u32) -> vec2<u32> {
    return near_queries(n, m, b, causal);
}

// Run `run` (< FAR_RUNS) of the groups at level index lvl whose far list holds group b:
// inverse_far_run.
fn level_far_readers(n: u32, m: u32, cols: u32, lvl: u32, b: u32, groups: u32, causal: bool,
                     run: u32) -> vec2<u32> {
    return inverse_far_run(b, groups, causal, run);
}

// The kernel index (< kernel_len(w)) of token t within its group at group size w: t - a w.
fn tap_of(n: u32, w: u32, cols: u32, t: u32) -> u32 {
    return t % w;
}

// The token at kernel index k of group a at group size w, or NO_TOKEN beyond the tokens.
const NO_TOKEN: u32 = 0xffffffffu;

fn tap_token(n: u32, w: u32, cols: u32, a: u32, k: u32) -> u32 {
    let t = a * w + k;
    return select(NO_TOKEN, t, t < n);
}
