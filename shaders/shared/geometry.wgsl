// The 1D index maps of algorithm.md §2-3 and their inverses (§8), the only place the WGSL
// spells them out. CPU mirror: `src/levels.rs` (`near_blocks`, `far_list`, `sub_window`,
// `Levels`); `tests/gpu_geometry.rs` compares the two for many (n, m, p).
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
