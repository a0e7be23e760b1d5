// The coarse dK~/dV~ pass (`backward_dkv_coarse.wgsl`) with subgroup operations (devices with
// Features::SUBGROUP): lanes are channels, not (row, query) pairs. SG lanes of one subgroup
// (below) walk the workgroup's reader chunk for RB of its rows at a time, with no barrier
// on its path (with barriers llvmpipe kept the walk's arrays in memory: +15% on the backward at
// n = 16384, perf.md change 13); the chunk is short (plan::DKV_COARSE_CHUNK queries), so the
// walk stays far below llvmpipe's 65535 loop iterations and its chain does not grow with n.
// Lane j holds channels (vec4s) j, j + SG, ... of the rows' k~ and v~, of each query's q and
// dO (loaded once for the rows), and of the rows' dK~ and dV~ sums; a score is the subgroupAdd
// of the lanes' partial dots. Why: the two-phase path reads every staged query row once per
// (row, query) pair and once per (row, channel) output, each a per-lane gather from workgroup
// memory on llvmpipe (the pass took 45% of the backward after the dQ and fine dK/dV passes got
// subgroups); here each lane reads its channels of each query once for all the rows, without
// staging.
// The walkers are the first SG lanes (by subgroup rank) of the subgroup holding invocation 0,
// whatever invocations those are: a subgroupAdd among exactly them adds every channel once.
// That needs the subgroup to have at least SG lanes, which holds wherever the kernels are
// composed for at most the device's smallest subgroup size (SG_EXACT, `compose_for`); composed
// for more (`ContextOptions::subgroup_size`), the pass runs its two-phase path instead, the
// plain devices' path. The pipeline holds no second way of computing a dot: llvmpipe runs both
// sides of every `if` (masked), and a per-lane fallback beside the walk cost 1.3-1.6x the pass
// (perf.md change 28). WG < SG: the two-phase path does every row.

#import subgroup_rows

const SUBGROUP_COARSE_ROWS: bool = WG >= SG && SG_EXACT;
// Rows a block takes at once: each query's channels, loaded once, serve all of them.
const RB: u32 = 4u;

// The buffers lane_vec4 reads.
const FROM_Q: u32 = 0u;
const FROM_DOUT: u32 = 1u;
const FROM_COARSE_K: u32 = 2u;
const FROM_COARSE_V: u32 = 3u;

// Elements c4 * 4 .. c4 * 4 + 3 of the row at element offset `at` of buffer `which`, zero
// past d (WGSL passes no pointer to a storage buffer into a function: a constant selects it).
fn lane_vec4(which: u32, at: u32, c4: u32) -> vec4<f32> {
    var x = vec4<f32>(0.0);
    let d = params.d;
    for (var e = 0u; e < 4u; e++) {
        let c = c4 * 4u + e;
        if (c < d) {
            switch which {
                case FROM_Q: { x[e] = q[at + c]; }
                case FROM_DOUT: { x[e] = dout[at + c]; }
                case FROM_COARSE_K: { x[e] = coarse_k[at + c]; }
                default: { x[e] = coarse_v[at + c]; }
            }
        }
    }
    return x;
}

// The sums of up to RB rows over a contiguous share of their readers.
struct RowSums {
    // This lane's channels (vec4s lane + t SG) of each row's dK~ (not yet scaled) and dV~.
    dk: array<array<vec4<f32>, SG_ROW>, RB>,
    dv: array<array<vec4<f32>, SG_ROW>, RB>,
}

// Where a row group's reader walk runs: the arguments every walk shares.
struct Walk {
    kpr: Problem,
    seq: u32,
    kv_h: u32,
    b: u32,
    // The group's first row (window row j0 + r0) and its row count (<= RB).
    row0: u32,
    rn: u32,
    lane: u32,
    // Where the group's rows are written (its first row's element, rows' stride).
    out: Outs,
}

// The first element of row r (< rn) of the walk's group in the coarse buffers.
fn walk_row_at(wk: Walk, r: u32) -> u32 {
    return coarse_row(wk.kpr.kv_crow, sel.level, wk.kpr.s, wk.b * params.p + wk.row0 + r)
        * params.d;
}

// The walk's rows: each row's first element and bias, and this lane's channels of its k~
// (pre-scaled) and v~. Rows of empty sub-windows take no part (zeros out, as in the two-phase
// path).
struct WalkRows {
    base: array<u32, RB>,
    bias: array<f32, RB>,
    kr: array<array<vec4<f32>, SG_ROW>, RB>,
    vr: array<array<vec4<f32>, SG_ROW>, RB>,
}

fn walk_rows(wk: Walk) -> WalkRows {
    let p = params.p;
    let w = params.levels[sel.level].window;
    var rows: WalkRows;
    // The rows' k~ and v~, read by block 0's lanes once per walk (`//#rows`: the counting
    // variant of the tests only, `shaders::compose_counting`).
    //#rows(2u * wk.rn, select(0u, 2u * wk.rn, wk.lane == 0u))
    for (var i = 0u; i < wk.rn; i++) {
        rows.base[i] = walk_row_at(wk, i);
        rows.bias[i] = coarse_key_bias(row_count(wk.kpr.n, w, p, params.grid_w,
                                                 wk.b * p + wk.row0 + i));
        for (var t = 0u; t < SG_ROW; t++) {
            rows.kr[i][t] = lane_vec4(FROM_COARSE_K, rows.base[i], wk.lane + t * SG)
                * params.scale;
            rows.vr[i][t] = lane_vec4(FROM_COARSE_V, rows.base[i], wk.lane + t * SG);
        }
    }
    return rows;
}

// Sums of zero.
fn zero_sums() -> RowSums {
    var sums: RowSums;
    for (var i = 0u; i < RB; i++) {
        for (var t = 0u; t < SG_ROW; t++) {
            sums.dk[i][t] = vec4<f32>(0.0);
            sums.dv[i][t] = vec4<f32>(0.0);
        }
    }
    return sums;
}

// The query of reader group a at index k of the group: a token, or with coarse queries a
// coarse row of the level.
fn walk_token(wk: Walk, a: u32, k: u32) -> u32 {
    if (params.coarse_queries == 0u) {
        return group_tap(wk.kpr.n, params.levels[sel.level].window, params.grid_w, a, k).x;
    }
    return a * params.p + k;
}

// Whether reader group `a` (`size` queries) holds a query of this dispatch's chunk
// (`in_chunk`): its first tap's token before the chunk's end and its last tap's at or after
// the chunk's start. Exact, not a bound: a 1D group is a window of consecutive tokens, a 2D
// one a cell whose taps run row by row, and a 2D chunk is whole grid rows. A group it rejects
// would have had every query skipped one by one; rejecting it at once keeps the sums' bits.
fn group_meets_chunk(n: u32, w: u32, cols: u32, a: u32, size: u32) -> bool {
    if (params.coarse_queries != 0u || (params.chunk_lo == 0u && params.chunk_hi >= n)) {
        return true;
    }
    let first = group_tap(n, w, cols, a, 0u).x;
    let last = group_tap(n, w, cols, a, size - 1u).x;
    return first < params.chunk_hi && last >= params.chunk_lo;
}

// Queries [lo, hi) of the rows' readers (query heads, runs, reader groups, their queries in
// order, as in the two-phase path) folded into the rows' sums, the block's lanes sharing each
// dot (subgroupAdd of their channels' partial dots). No barrier inside, and no other way of
// computing a dot beside this one (see the top of this file).
fn walk_readers(wk: Walk, lo: u32, hi: u32) -> RowSums {
    let p = params.p;
    let d = params.d;
    let w = params.levels[sel.level].window;
    let n = wk.kpr.n;
    let cols = params.grid_w;
    let windows = level_windows(wk.kpr, sel.level);
    let causal = params.causal != 0u;
    let lane = wk.lane;
    let zero = vec4<f32>(0.0);
    var rows = walk_rows(wk);
    var sums = zero_sums();
    // g0: the index of reader group a's first query in the sequence.
    var g0 = 0u;
    for (var bh = wk.kv_h * params.kv_group; bh < (wk.kv_h + 1u) * params.kv_group; bh++) {
        let qpr = problem(bh, wk.seq);
        for (var run = 0u; run < FAR_RUNS; run++) {
            let readers = level_far_readers(n, params.m, cols, sel.level, wk.b, windows, causal,
                                            run);
            for (var a = readers.x; a < readers.y; a++) {
                let size = reader_size(n, w, cols, a);
                let k_lo = clamp(lo, g0, g0 + size) - g0;
                let k_hi = clamp(hi, g0, g0 + size) - g0;
                g0 += size;
                if (k_lo < k_hi && !group_meets_chunk(n, w, cols, a, size)) {
                    continue; // none of its queries in a split head's chunk (uniform)
                }
                for (var k = k_lo; k < k_hi; k++) {
                    let token = walk_token(wk, a, k);
                    if (!in_chunk(token)) {
                        continue; // outside a split head's chunk: not bound (uniform)
                    }
                    let row = token_row(qpr, token);
                    let at = row * d;
                    //#rows(2u, select(0u, 2u, lane == 0u))
                    // This lane's channels of the query's q and dO, loaded once for the rn
                    // rows (the pass's main cost: two thirds of it with one row at a time).
                    var qs: array<vec4<f32>, SG_ROW>;
                    var gs: array<vec4<f32>, SG_ROW>;
                    for (var t = 0u; t < SG_ROW; t++) {
                        qs[t] = lane_vec4(FROM_Q, at, lane + t * SG);
                        gs[t] = lane_vec4(FROM_DOUT, at, lane + t * SG);
                    }
                    let lse = stats[2u * row];
                    let delta = stats[2u * row + 1u];
                    for (var i = 0u; i < wk.rn; i++) {
                        if (rows.bias[i] <= ABSENT * 0.5) {
                            continue; // uniform over the block
                        }
                        var s4 = zero;
                        var g4 = zero;
                        for (var t = 0u; t < SG_ROW; t++) {
                            s4 += qs[t] * rows.kr[i][t];
                            g4 += gs[t] * rows.vr[i][t];
                        }
                        let s = subgroupAdd(s4.x + s4.y + s4.z + s4.w);
                        let g = subgroupAdd(g4.x + g4.y + g4.z + g4.w);
                        // Softcap: the cap before the count correction, dS through its slope.
                        let pr = exp(capped(s) + rows.bias[i] - lse);
                        let ds = pr * (g - delta) * cap_slope(s);
                        for (var t = 0u; t < SG_ROW; t++) {
                            sums.dk[i][t] += ds * qs[t];
                            sums.dv[i][t] += pr * gs[t];
                        }
                    }
                }
            }
        }
    }
    return sums;
}

// Writes vec4 c4 of row r of the walk's group: dK~ (scaled here) and dV~, or their partials.
fn write_row_vec4(wk: Walk, r: u32, c4: u32, dk: vec4<f32>, dv: vec4<f32>) {
    let at = out_at(wk.out, r);
    let gk = dk * params.scale;
    for (var e = 0u; e < 4u; e++) {
        let c = c4 * 4u + e;
        if (c < params.d) {
            // A split head's later chunks add to the earlier chunks' sums (accumulates).
            if (accumulates()) {
                dcoarse_k[at + c] += gk[e];
                dcoarse_v[at + c] += dv[e];
            } else {
                dcoarse_k[at + c] = gk[e];
                dcoarse_v[at + c] = dv[e];
            }
        }
    }
}

// Rows j0 .. j0 + nrows of window b (level sel.level) of K/V head kv_h of sequence `seq`,
// whose first query head's problem is kpr, over queries [range.x, range.y) of their reader
// sequence, RB rows at a time, written to `outs` (row r of the workgroup's at out_at(outs, r)).
// The walk is at most plan::DKV_COARSE_CHUNK = 256 queries, each an iteration plus one per row:
// at most 256 (PR + PR / RB) <= 20480 iterations (PR <= 64), below llvmpipe's limit.
// Call in uniform control flow (every invocation of the workgroup active).
fn coarse_rows_subgroup(kpr: Problem, seq: u32, kv_h: u32, b: u32, j0: u32, nrows: u32,
                        range: vec2<u32>, outs: Outs, lid: u32) {
    // The walkers: the first SG active lanes of the subgroup holding invocation 0, lane = rank.
    let first = subgroupAny(lid == 0u);
    let lane = subgroupExclusiveAdd(1u);
    let lanes = subgroupAdd(1u);
    if (first && lane < SG) {
        // Fewer than SG lanes there cannot happen where SG_EXACT holds (every subgroup has at
        // least SG invocations, WG >= SG); should a device still give invocation 0 a partial
        // subgroup, the rows get NaN (loud) rather than sums that miss channels.
        let whole = lanes >= SG;
        let nan = vec4<f32>(bitcast<f32>(0x7fc00000u));
        for (var r0 = 0u; r0 < nrows; r0 += RB) {
            let rn = min(RB, nrows - r0);
            let out = Outs(out_at(outs, r0), outs.stride);
            let wk = Walk(kpr, seq, kv_h, b, j0 + r0, rn, lane, out);
            var sums = walk_readers(wk, range.x, range.y);
            for (var i = 0u; i < rn; i++) {
                for (var t = 0u; t < SG_ROW; t++) {
                    let c4 = lane + t * SG;
                    if (c4 < D4) {
                        write_row_vec4(wk, i, c4, select(nan, sums.dk[i][t], whole),
                                       select(nan, sums.dv[i][t], whole));
                    }
                }
            }
        }
    }
}
