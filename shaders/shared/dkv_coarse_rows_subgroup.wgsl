// The coarse dK~/dV~ pass (`backward_dkv_coarse.wgsl`) with subgroup operations (devices with
// Features::SUBGROUP): lanes are channels, not (row, query) pairs. Block k of SG consecutive
// invocations takes rows k RB .. k RB + RB - 1 of the workgroup's nrows (then k + WG / SG, ...:
// with p = 2, block 0 takes both rows and loads each query once for them); lane j of a block holds
// channels (vec4s) j, j + SG, ... of the row's k~ and v~, of each query's q and dO as it walks
// them, and of the row's dK~ and dV~ sums. A score is the subgroupAdd of the lanes' partial
// dots. Why: the two-phase path reads every staged query row once per (row, query) pair and
// once per (row, channel) output, each a per-lane gather from workgroup memory on llvmpipe
// (the pass took 45% of the backward after the dQ and fine dK/dV passes got subgroups); here
// each lane reads its channels of each query once per row from the buffers, with no staging
// and no barrier. Each row's sums run over the queries in the two-phase path's order, in one
// block, so which block takes a row does not change a bit.
// A block that is not exactly one full subgroup with lanes in invocation order (a device with
// another layout, a partial last subgroup) computes each score in every lane instead (plain
// loads, same rows): correct anywhere, slower. WG < SG: the two-phase path does every row.

#import subgroup_rows

const SUBGROUP_COARSE_ROWS: bool = WG >= SG;
// Invocation blocks that take rows: only whole ones.
const ROW_BLOCKS: u32 = max(1u, WG / SG);
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

// Rows j0 .. j0 + nrows of window b (level sel.level) of K/V head kv_h of sequence `seq`,
// whose first query head's problem is kpr. Called in uniform control flow; no barrier inside.
fn coarse_rows_subgroup(kpr: Problem, seq: u32, kv_h: u32, b: u32, j0: u32, nrows: u32, lid: u32) {
    let blk = lid / SG;
    if (blk >= ROW_BLOCKS) {
        return; // the partial last block (WG % SG lanes) takes no row
    }
    let lane = lid % SG;
    tile_rows_begin();
    // One full subgroup in invocation order: every lane of the subgroup agrees.
    let cooperative = sg_full && subgroupAll(sg_lane == lane && subgroupBroadcastFirst(blk) == blk);
    let p = params.p;
    let d = params.d;
    let w = params.levels[sel.level].window;
    let n = kpr.n;
    let cols = params.grid_w;
    let windows = level_windows(kpr, sel.level);
    let causal = params.causal != 0u;
    let zero = vec4<f32>(0.0);
    // Up to RB rows at once (block k takes rows k RB .., then (k + ROW_BLOCKS) RB ..).
    for (var r0 = blk * RB; r0 < nrows; r0 += ROW_BLOCKS * RB) {
        let rn = min(RB, nrows - r0);
        // Each row's first element, bias, this lane's channels of k~ (pre-scaled) and v~, and
        // of its sums. Rows past rn and rows of empty sub-windows take no part (zeros out, as
        // in the two-phase path).
        var base: array<u32, RB>;
        var bias: array<f32, RB>;
        var kr: array<array<vec4<f32>, SG_ROW>, RB>;
        var vr: array<array<vec4<f32>, SG_ROW>, RB>;
        var dk_sum: array<array<vec4<f32>, SG_ROW>, RB>;
        var dv_sum: array<array<vec4<f32>, SG_ROW>, RB>;
        for (var i = 0u; i < rn; i++) {
            let row = b * p + j0 + r0 + i;
            base[i] = coarse_row(kpr.kv_crow, sel.level, kpr.s, row) * d;
            bias[i] = coarse_key_bias(row_count(n, w, p, cols, row));
            for (var t = 0u; t < SG_ROW; t++) {
                kr[i][t] = lane_vec4(FROM_COARSE_K, base[i], lane + t * SG) * params.scale;
                vr[i][t] = lane_vec4(FROM_COARSE_V, base[i], lane + t * SG);
                dk_sum[i][t] = zero;
                dv_sum[i][t] = zero;
            }
        }
        for (var bh = kv_h * params.kv_group; bh < (kv_h + 1u) * params.kv_group; bh++) {
            let qpr = problem(bh, seq);
            for (var run = 0u; run < FAR_RUNS; run++) {
                let readers = level_far_readers(n, params.m, cols, sel.level, b, windows, causal,
                                                run);
                for (var a = readers.x; a < readers.y; a++) {
                    let size = reader_size(n, w, cols, a);
                    for (var k = 0u; k < size; k++) {
                        var token = a * p + k;
                        if (params.coarse_queries == 0u) {
                            token = group_tap(n, w, cols, a, k).x;
                        }
                        let row = token_row(qpr, token);
                        let at = row * d;
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
                        for (var i = 0u; i < rn; i++) {
                            if (bias[i] <= ABSENT * 0.5) {
                                continue; // uniform over the block
                            }
                            var s4 = zero;
                            var g4 = zero;
                            if (cooperative) {
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
                            if (cooperative) {
                                s = subgroupAdd(s);
                                g = subgroupAdd(g);
                            }
                            let pr = exp(s + bias[i] - lse);
                            let ds = pr * (g - delta);
                            for (var t = 0u; t < SG_ROW; t++) {
                                dk_sum[i][t] += ds * qs[t];
                                dv_sum[i][t] += pr * gs[t];
                            }
                        }
                    }
                }
            }
        }
        for (var i = 0u; i < rn; i++) {
            for (var t = 0u; t < SG_ROW; t++) {
                let c4 = lane + t * SG;
                let gk = dk_sum[i][t] * params.scale;
                let gv = dv_sum[i][t];
                for (var e = 0u; e < 4u; e++) {
                    let c = c4 * 4u + e;
                    if (c < d) {
                        dcoarse_k[base[i] + c] = gk[e];
                        dcoarse_v[base[i] + c] = gv[e];
                    }
                }
            }
        }
    }
}
