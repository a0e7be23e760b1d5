// Backward, dK~ and dV~ of one level's coarse keys (algorithm.md §8), by gather: one workgroup
// = up to PR coarse rows of one window b and one chunk of their readers: the queries whose far
// list holds b (the static inverse of the far lists, `level_far_readers` in geometry.wgsl; 2D:
// the far list itself, in geometry_grid.wgsl), for every query head of the K/V head, in one
// sequence cut into chunks of sel.arg1 queries, sel.arg0 chunks per row. At level l the
// readers are 3 w_l queries: O(n) at the top level, so one workgroup walking them all was the
// backward's longest serial chain on a GPU (115x the forward at n = 65536 on an H200, issue
// 27). With one chunk the workgroup writes dK~, dV~; with more, its chunk's partial sums after
// them (params.partials_at), which backward_dkv_combine.wgsl adds in a fixed tree.
// Per tile of BK queries, phase A computes P and dS for every (row, query) pair into workgroup
// memory, and phase B has each invocation sum them for its own (row, channel vec4) of dK~ and dV~:
// dK~_r = sum_i dS_ir q_i / sqrt(d), dV~_r = sum_i P_ir dO_i, in a fixed order, no atomics.
// Rows of empty sub-windows are never seen: their P is 0 and they get zeros.
// On a device with subgroups the rows take another path instead of the two phases
// (`shared/dkv_coarse_rows_subgroup.wgsl`: lanes are channels, queries are read without staging,
// the same sums in the same order over the queries).
// With coarse queries (params.coarse_queries; the pass `backward_dkv_coarse_q`, which binds
// Q~, G and (R, H) of backward_coarse_stats.wgsl as q, dout and stats) the queries of a reader
// window are its p coarse-query rows, each standing for the tokens of its sub-window.
// CPU mirror: the `Slot::Coarse` sums in `cpu::backward::fma_backward_in`.

#import params
#import geometry
#import level_select
#import sequences
#import variants

@group(0) @binding(1) var<storage, read> q: array<f32>;                  // (bh, n, d) (coarse queries: Q~)
@group(0) @binding(2) var<storage, read> coarse_k: array<f32>;           // (bh / kv_group, coarse_rows, d)
@group(0) @binding(3) var<storage, read> coarse_v: array<f32>;           // (bh / kv_group, coarse_rows, d)
@group(0) @binding(4) var<storage, read> dout: array<f32>;               // (bh, n, d) (coarse queries: G)
@group(0) @binding(5) var<storage, read> stats: array<f32>;              // (bh, n, 2): LSE, D (coarse: R, H)
@group(0) @binding(6) var<storage, read_write> dcoarse_k: array<f32>;    // (bh / kv_group, coarse_rows, d)
@group(0) @binding(7) var<storage, read_write> dcoarse_v: array<f32>;    // (bh / kv_group, coarse_rows, d)

#import backward_queries

// Coarse rows per workgroup: as many as give every invocation one (row, vec4) output.
// Rust mirror: `plan::coarse_rows_per_workgroup`.
const PR: u32 = max(1u, WG / D4);
// (row, vec4) outputs per invocation (1 unless D4 > WG).
const OUTS: u32 = (PR * D4 + WG - 1u) / WG;

var<workgroup> rows_k: array<vec4<f32>, PR * D4>;   // pre-scaled by 1/sqrt(d)
var<workgroup> rows_v: array<vec4<f32>, PR * D4>;
var<workgroup> rows_bias: array<f32, PR>;
var<workgroup> pair_p: array<f32, PR * BK>;         // P of (row r, staged query i) at r * BK + i
var<workgroup> pair_ds: array<f32, PR * BK>;        // dS of the same pair

var<private> dk_acc: array<vec4<f32>, OUTS>;
var<private> dv_acc: array<vec4<f32>, OUTS>;

// Phase A then phase B for `count` staged queries (call in uniform control flow). Only the
// nrows real rows: with p < PR (p = 2, d = 8: 2 of 32) the rest would be most of the work.
fn consume_queries(count: u32, nrows: u32, lid: u32) {
    for (var idx = lid; idx < nrows * BK; idx += WG) {
        let r = idx / BK;
        let i = idx % BK;
        var pr = 0.0;
        var ds = 0.0;
        if (r < nrows && i < count && rows_bias[r] > ABSENT * 0.5) {
            var s4 = vec4<f32>(0.0);
            var g4 = vec4<f32>(0.0);
            for (var c4 = 0u; c4 < D4; c4++) {
                s4 += tile_q[i * D4 + c4] * rows_k[r * D4 + c4];
                g4 += tile_do[i * D4 + c4] * rows_v[r * D4 + c4];
            }
            // Softcap: the cap before the count correction (bias), dS through its slope.
            let raw = s4.x + s4.y + s4.z + s4.w;
            pr = exp(capped(raw) + rows_bias[r] - tile_lse[i]);
            ds = pr * (g4.x + g4.y + g4.z + g4.w - tile_delta[i]) * cap_slope(raw);
        }
        pair_p[idx] = pr;
        pair_ds[idx] = ds;
    }
    workgroupBarrier();
    for (var o = 0u; o < OUTS; o++) {
        let idx = lid + o * WG;
        if (idx < nrows * D4) {
            let r = idx / D4;
            let c4 = idx % D4;
            for (var i = 0u; i < count; i++) {
                dk_acc[o] += pair_ds[r * BK + i] * tile_q[i * D4 + c4];
                dv_acc[o] += pair_p[r * BK + i] * tile_do[i * D4 + c4];
            }
        }
    }
}

// The queries whose far list holds group b of level index `lvl` (group size w), gathered into
// one sequence: the reader groups in run order (level_far_readers), each group's tokens in
// order (1D: a window's tokens; 2D: a cell's in raster order, s_l runs of s_l tokens). Staged
// BK at a time across groups, so a tile is full even when a group's rows are short (2D cells
// of side 2 would otherwise stage 2 queries per barrier). Each dK~/dV~ sum still runs over the
// queries in this order, so the tiling does not change a bit. n: the problem's tokens.
// Queries of reader group a: its tokens, or with coarse queries its p coarse-query rows.
fn reader_size(n: u32, w: u32, cols: u32, a: u32) -> u32 {
    if (params.coarse_queries != 0u) {
        return params.p;
    }
    return group_taps(n, w, cols, a);
}

fn reader_total(n: u32, b: u32, lvl: u32, windows: u32, w: u32, causal: bool) -> u32 {
    let cols = params.grid_w;
    var total = 0u;
    for (var run = 0u; run < FAR_RUNS; run++) {
        let readers = level_far_readers(n, params.m, cols, lvl, b, windows, causal, run);
        for (var a = readers.x; a < readers.y; a++) {
            total += reader_size(n, w, cols, a);
        }
    }
    return total;
}

// The g-th query (< reader_total) of that sequence: a token, or with coarse queries a coarse
// row of the level.
fn reader_token(n: u32, b: u32, lvl: u32, windows: u32, w: u32, causal: bool, g: u32) -> u32 {
    let cols = params.grid_w;
    var rest = g;
    for (var run = 0u; run < FAR_RUNS; run++) {
        let readers = level_far_readers(n, params.m, cols, lvl, b, windows, causal, run);
        for (var a = readers.x; a < readers.y; a++) {
            let size = reader_size(n, w, cols, a);
            if (rest < size) {
                if (params.coarse_queries != 0u) {
                    return a * params.p + rest;
                }
                return group_tap(n, w, cols, a, rest).x;
            }
            rest -= size;
        }
    }
    return 0u; // not reached for g < reader_total
}

// The LSE staged for a query outside the chunk: exp(s - OUTSIDE_LSE) is 0 for any finite s.
const OUTSIDE_LSE: f32 = 3.0e38;

// The token of each staged query row (stage_query_tokens).
var<workgroup> query_token: array<u32, BK>;

// The row of staged query r in q, dout and stats: its token's in the problem, or with coarse
// queries its coarse row's at this level.
fn query_row(pr: Problem, r: u32) -> u32 {
    return token_row(pr, query_token[r]);
}

// The row of query `token` (a token, or with coarse queries a coarse row of the level) in q,
// dout and stats.
fn token_row(pr: Problem, token: u32) -> u32 {
    if (params.coarse_queries != 0u) {
        return coarse_row(pr.q_crow, sel.level, pr.s, token);
    }
    // A split head's bindings start at global row row_base (0 unsplit).
    return pr.q_row + token - params.row_base;
}

// Whether query `token` is in this dispatch's chunk of a split head, [chunk_lo, chunk_hi) (0
// and n unsplit: every query). Each chunk's dispatch sums only its own queries and adds the sum
// to the earlier chunks' (`accumulates`), in chunk order.
fn in_chunk(token: u32) -> bool {
    return params.coarse_queries != 0u
        || (token >= params.chunk_lo && token < params.chunk_hi);
}

// A split head's chunk after the first: its sums are added to the outputs (written by the
// earlier chunks' dispatches, which run before it), not written over them.
fn accumulates() -> bool {
    return params.coarse_queries == 0u && params.chunk_lo > 0u;
}

// coarse_rows_subgroup and SUBGROUP_COARSE_ROWS: on a device with subgroups, lanes take a
// row's channels and walk its queries without staging (the two phases below are then not
// run); without, nothing.
#import dkv_coarse_rows

// Where row r of the workgroup's rows goes: dK~, dV~ themselves (one reader chunk), or the
// chunk's partial sums (row u0 + r of the level, chunk k: see backward_dkv_combine.wgsl).
struct Outs {
    // Element of row 0's first channel.
    at: u32,
    // Elements between consecutive rows.
    stride: u32,
}

fn out_at(o: Outs, r: u32) -> u32 {
    return o.at + r * o.stride;
}

// Stages query rows query_token[0 .. count) of problem `pr` (count <= BK) as `stage_queries`
// (backward_queries.wgsl) stages consecutive rows. Call in uniform control flow.
fn stage_query_tokens(pr: Problem, count: u32, lid: u32) {
    let d = params.d;
    // Every invocation's outputs walk the staged q and dO rows; the workgroup reads each once.
    //#rows(2u * count, select(0u, 2u * count, lid == 0u))
    // A query outside a split head's chunk is not bound: it stages zeros and an LSE that makes
    // its P exactly 0, so it adds +0 to every sum (the chunk's sum is that of its own queries).
    for (var idx = lid; idx < count * D4; idx += WG) {
        let r = idx / D4;
        let c4 = idx % D4;
        let base = query_row(pr, r) * d;
        var qq = vec4<f32>(0.0);
        var gg = vec4<f32>(0.0);
        if (in_chunk(query_token[r])) {
            for (var e = 0u; e < 4u; e++) {
                let c = c4 * 4u + e;
                if (c < d) {
                    qq[e] = q[base + c];
                    gg[e] = dout[base + c];
                }
            }
        }
        tile_q[idx] = qq;
        tile_do[idx] = gg;
    }
    for (var r = lid; r < count; r += WG) {
        let row = query_row(pr, r);
        var l = OUTSIDE_LSE;
        var dl = 0.0;
        if (in_chunk(query_token[r])) {
            l = stats[2u * row];
            dl = stats[2u * row + 1u];
        }
        tile_lse[r] = l;
        tile_delta[r] = dl;
    }
}

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let info = params.levels[sel.level];
    let p = params.p;
    let d = params.d;
    let w = info.window;
    let chunks = (p + PR - 1u) / PR;
    // Reader chunk k of the workgroup's rows (sel.arg0 per row, sel.arg1 queries each).
    let reader_chunks = sel.arg0;
    let k = dispatch_workgroup(wg) % reader_chunks;
    // A group of rows (params.dkv_row_lo, whole windows; dkv_rows = 0: the whole level) starts
    // at its first window's workgroups, or a split head's later chunk at the first window its
    // tokens may read (params.dkv_first); a workgroup past the group's rows does nothing.
    let first = max(params.dkv_row_lo, params.dkv_first);
    let wid = dispatch_workgroup(wg) / reader_chunks + (first / p) * chunks;
    if (params.dkv_rows != 0u && (wid / chunks) * p >= params.dkv_row_lo + params.dkv_rows) {
        return; // uniform over the workgroup
    }
    // One workgroup per (K/V head, window, chunk of rows), the windows of each sequence of a
    // variable-length batch found through its coarse rows (p per window); grouped-query heads
    // sum over the kv_group query heads that read the K/V head, in head order (deterministic).
    let at = locate((wid / chunks) * p, info.windows * p, sec_rows(sel.level),
                    query_heads() / params.kv_group);
    if (at.x == 0xffffffffu) {
        return; // uniform over the workgroup
    }
    let kv_h = at.x;
    // Problem of the group's first query head: its coarse rows are this K/V head's.
    let kpr = problem(kv_h * params.kv_group, at.y);
    let n = kpr.n;
    // The level's windows in this sequence (2D: ignored, the cells follow from n and W).
    let windows = level_windows(kpr, sel.level);
    let b = at.z / p;
    let j0 = (wid % chunks) * PR;
    let nrows = min(PR, p - j0);
    // First element of row b*p + j0 of this level in the (bh / kv_group, coarse_rows, d)
    // buffers.
    let base = coarse_row(kpr.kv_crow, sel.level, kpr.s, b * p + j0) * d;
    // Row j0 of window b is row u0 of the level (over K/V heads and sequences).
    let u0 = (wid / chunks) * p + j0;
    var outs = Outs(base, d);
    if (reader_chunks > 1u) {
        // The group's partial sums, from its first row.
        let gu = u0 - params.dkv_row_lo;
        outs = Outs(params.partials_at + (gu * reader_chunks + k) * d, reader_chunks * d);
    }
    // The chunk: queries [lo, hi) of the sequence (query heads, then each head's readers).
    let causal = params.causal != 0u;
    let total = reader_total(n, b, sel.level, windows, w, causal);
    let lo = min(k * sel.arg1, total * params.kv_group);
    let hi = min(lo + sel.arg1, total * params.kv_group);
    if (SUBGROUP_COARSE_ROWS) {
        coarse_rows_subgroup(kpr, at.y, kv_h, b, j0, nrows, vec2<u32>(lo, hi), outs, lid);
        return; // uniform (a constant)
    }

    // The rows' k~ and v~ (`//#rows`: the counting variant of the tests only,
    // `shaders::compose_counting`); then the readers, stage_query_tokens.
    //#rows(2u * nrows, select(0u, 2u * nrows, lid == 0u))
    for (var idx = lid; idx < PR * D4; idx += WG) {
        let r = idx / D4;
        let c4 = idx % D4;
        var kk = vec4<f32>(0.0);
        var vv = vec4<f32>(0.0);
        if (r < nrows) {
            for (var e = 0u; e < 4u; e++) {
                let c = c4 * 4u + e;
                if (c < d) {
                    kk[e] = coarse_k[base + r * d + c];
                    vv[e] = coarse_v[base + r * d + c];
                }
            }
        }
        rows_k[idx] = kk * params.scale;
        rows_v[idx] = vv;
    }
    for (var r = lid; r < PR; r += WG) {
        var bias = ABSENT;
        if (r < nrows) {
            bias = coarse_key_bias(row_count(n, w, p, params.grid_w, b * p + j0 + r));
        }
        rows_bias[r] = bias;
    }
    for (var o = 0u; o < OUTS; o++) {
        dk_acc[o] = vec4<f32>(0.0);
        dv_acc[o] = vec4<f32>(0.0);
    }

    // The chunk's queries of the windows whose far list holds b, in increasing order, query
    // head by query head.
    for (var h = 0u; h < params.kv_group; h++) {
        let qpr = problem(kv_h * params.kv_group + h, at.y);
        let h_lo = clamp(lo, h * total, (h + 1u) * total) - h * total;
        let h_hi = clamp(hi, h * total, (h + 1u) * total) - h * total;
        for (var g0 = h_lo; g0 < h_hi; g0 += BK) {
            let count = min(BK, h_hi - g0);
            workgroupBarrier();
            for (var r = lid; r < count; r += WG) {
                query_token[r] = reader_token(n, b, sel.level, windows, w, causal, g0 + r);
            }
            workgroupBarrier();
            stage_query_tokens(qpr, count, lid);
            workgroupBarrier();
            consume_queries(count, nrows, lid);
        }
    }

    for (var o = 0u; o < OUTS; o++) {
        let idx = lid + o * WG;
        let r = idx / D4;
        let c4 = idx % D4;
        if (idx < PR * D4 && r < nrows) {
            let gk = dk_acc[o] * params.scale;
            let gv = dv_acc[o];
            for (var e = 0u; e < 4u; e++) {
                let c = c4 * 4u + e;
                if (c < d) {
                    let at = out_at(outs, r) + c;
                    if (accumulates()) {
                        dcoarse_k[at] += gk[e];
                        dcoarse_v[at] += gv[e];
                    } else {
                        dcoarse_k[at] = gk[e];
                        dcoarse_v[at] = gv[e];
                    }
                }
            }
        }
    }
}
