// The coarse dK~/dV~ pass (`backward_dkv_coarse.wgsl`) with subgroup operations (devices with
// Features::SUBGROUP): lanes are channels, not (row, query) pairs. Block 0 (the first SG
// invocations) walks the workgroup's reader chunk for RB of its rows at a time, with no barrier
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
// A block that is not exactly one full subgroup with lanes in invocation order (a device with
// another layout, a partial last subgroup) computes each score in every lane instead (plain
// loads): correct anywhere, slower. WG < SG: the two-phase path does every row.

#import subgroup_rows

const SUBGROUP_COARSE_ROWS: bool = WG >= SG;
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
    cooperative: bool,
    // Where the group's rows are written (its first row's element, rows' stride).
    out: Outs,
}

// The first element of row r (< rn) of the walk's group in the coarse buffers.
fn walk_row_at(wk: Walk, r: u32) -> u32 {
    return coarse_row(wk.kpr.kv_crow, sel.level, wk.kpr.s, wk.b * params.p + wk.row0 + r)
        * params.d;
}

// Queries [lo, hi) of the rows' readers (query heads, runs, reader groups, their queries in
// order, as in the two-phase path) folded into the rows' sums. No barrier inside.
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
    // Each row's first element and bias, this lane's channels of its k~ (pre-scaled) and v~.
    // Rows of empty sub-windows take no part (zeros out, as in the two-phase path).
    var base: array<u32, RB>;
    var bias: array<f32, RB>;
    var kr: array<array<vec4<f32>, SG_ROW>, RB>;
    var vr: array<array<vec4<f32>, SG_ROW>, RB>;
    var sums: RowSums;
    // The rows' k~ and v~, read by block 0's lanes once per walk (`//#rows`: the counting
    // variant of the tests only, `shaders::compose_counting`).
    //#rows(2u * wk.rn, select(0u, 2u * wk.rn, lane == 0u))
    for (var i = 0u; i < wk.rn; i++) {
        base[i] = walk_row_at(wk, i);
        bias[i] = coarse_key_bias(row_count(n, w, p, cols, wk.b * p + wk.row0 + i));
        for (var t = 0u; t < SG_ROW; t++) {
            kr[i][t] = lane_vec4(FROM_COARSE_K, base[i], lane + t * SG) * params.scale;
            vr[i][t] = lane_vec4(FROM_COARSE_V, base[i], lane + t * SG);
            sums.dk[i][t] = zero;
            sums.dv[i][t] = zero;
        }
    }
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
                for (var k = k_lo; k < k_hi; k++) {
                    var token = a * p + k;
                    if (params.coarse_queries == 0u) {
                        token = group_tap(n, w, cols, a, k).x;
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
                        if (bias[i] <= ABSENT * 0.5) {
                            continue; // uniform over the block
                        }
                        var s4 = zero;
                        var g4 = zero;
                        if (wk.cooperative) {
                            for (var t = 0u; t < SG_ROW; t++) {
                                s4 += qs[t] * kr[i][t];
                                g4 += gs[t] * vr[i][t];
                            }
                        } else {
                            // Every lane its own full dots (no cross-lane operation).
                            for (var c4 = 0u; c4 < D4; c4++) {
                                let kk = lane_vec4(FROM_COARSE_K, base[i], c4) * params.scale;
                                s4 += lane_vec4(FROM_Q, at, c4) * kk;
                                g4 += lane_vec4(FROM_DOUT, at, c4)
                                    * lane_vec4(FROM_COARSE_V, base[i], c4);
                            }
                        }
                        var s = s4.x + s4.y + s4.z + s4.w;
                        var g = g4.x + g4.y + g4.z + g4.w;
                        if (wk.cooperative) {
                            s = subgroupAdd(s);
                            g = subgroupAdd(g);
                        }
                        // Softcap: the cap before the count correction, dS through its slope.
                        let pr = exp(capped(s) + bias[i] - lse);
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
            dcoarse_k[at + c] = gk[e];
            dcoarse_v[at + c] = dv[e];
        }
    }
}

// Rows j0 .. j0 + nrows of window b (level sel.level) of K/V head kv_h of sequence `seq`,
// whose first query head's problem is kpr, over queries [range.x, range.y) of their reader
// sequence, RB rows at a time, written to `outs` (row r of the workgroup's at out_at(outs, r)).
// The walk is at most plan::DKV_COARSE_CHUNK = 256 queries, each an iteration plus one per row:
// at most 256 (PR + PR / RB) <= 20480 iterations (PR <= 64), below llvmpipe's limit.
fn coarse_rows_subgroup(kpr: Problem, seq: u32, kv_h: u32, b: u32, j0: u32, nrows: u32,
                        range: vec2<u32>, outs: Outs, lid: u32) {
    let blk = lid / SG;
    let lane = lid % SG;
    tile_rows_begin();
    // One full subgroup in invocation order: every lane of the subgroup agrees.
    let cooperative = sg_full && subgroupAll(sg_lane == lane && subgroupBroadcastFirst(blk) == blk);
    if (blk == 0u) {
        for (var r0 = 0u; r0 < nrows; r0 += RB) {
            let rn = min(RB, nrows - r0);
            let out = Outs(out_at(outs, r0), outs.stride);
            let wk = Walk(kpr, seq, kv_h, b, j0 + r0, rn, lane, cooperative, out);
            let sums = walk_readers(wk, range.x, range.y);
            for (var i = 0u; i < rn; i++) {
                for (var t = 0u; t < SG_ROW; t++) {
                    let c4 = lane + t * SG;
                    if (c4 < D4) {
                        write_row_vec4(wk, i, c4, sums.dk[i][t], sums.dv[i][t]);
                    }
                }
            }
        }
    }
}
