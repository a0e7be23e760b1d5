// The coarse dK~/dV~ pass (`backward_dkv_coarse.wgsl`) with subgroup operations (devices with
// Features::SUBGROUP): lanes are channels, not (row, query) pairs. The workgroup takes up to RB
// of its rows at a time. Each block of SG consecutive invocations walks every ROW_BLOCKS-th of
// their readers; lane j of a block holds channels (vec4s) j, j + SG, ... of the rows' k~ and
// v~, of each query's q and dO (loaded once for the rows), and of the block's share of the
// rows' dK~ and dV~ sums; a score is the subgroupAdd of the lanes' partial dots. The shares
// are then added in block order through workgroup memory, so the bits do not depend on
// timing. Why: the two-phase path reads every staged query row once per (row, query) pair and
// once per (row, channel) output, each a per-lane gather from workgroup memory on llvmpipe (the
// pass took 45% of the backward after the dQ and fine dK/dV passes got subgroups); here each
// lane reads its channels of each query once for all the rows, without staging. Why the
// blocks split the readers, not the rows: an invocation walks 3 w_l / ROW_BLOCKS queries at
// level l, where one block walking all of a top level's readers passed llvmpipe's limit of
// 65535 loop iterations per invocation from n = 32768 on (wrong dV, no error).
// A block that is not exactly one full subgroup with lanes in invocation order (a device with
// another layout, a partial last subgroup) computes each score in every lane instead (plain
// loads): correct anywhere, slower. WG < SG: the two-phase path does every row.

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
// whose first query head's problem is kpr: up to RB rows at a time, every block walking its
// share of the readers (query g of the sequence goes to block g % ROW_BLOCKS), then the blocks'
// partial sums added in block order through workgroup memory (rows_k, rows_v of the pass).
// Call in uniform control flow (barriers inside).
fn coarse_rows_subgroup(kpr: Problem, seq: u32, kv_h: u32, b: u32, j0: u32, nrows: u32, lid: u32) {
    let blk = lid / SG;
    // The partial last block (WG % SG invocations) walks nothing; it meets the barriers.
    let walks = blk < ROW_BLOCKS;
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
    for (var r0 = 0u; r0 < nrows; r0 += RB) {
        let rn = min(RB, nrows - r0);
        // Each row's first element and bias, this lane's channels of its k~ (pre-scaled) and
        // v~, and of this block's share of its sums. Rows of empty sub-windows take no part
        // (zeros out, as in the two-phase path).
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
        // The readers' sequence as in the two-phase path (query heads, runs, reader groups,
        // their queries in order); g0 is the index of group a's first query in it.
        var g0 = 0u;
        for (var bh = kv_h * params.kv_group; bh < (kv_h + 1u) * params.kv_group; bh++) {
            let qpr = problem(bh, seq);
            for (var run = 0u; run < FAR_RUNS; run++) {
                let readers = level_far_readers(n, params.m, cols, sel.level, b, windows, causal,
                                                run);
                for (var a = readers.x; a < readers.y; a++) {
                    let size = reader_size(n, w, cols, a);
                    // This block's queries of group a: g0 + k with (g0 + k) % ROW_BLOCKS == blk.
                    var k = (blk + ROW_BLOCKS - g0 % ROW_BLOCKS) % ROW_BLOCKS;
                    g0 += size;
                    if (!walks) {
                        continue;
                    }
                    for (; k < size; k += ROW_BLOCKS) {
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
        // The blocks' shares added in block order (rn <= nrows <= PR rows fit rows_k, rows_v).
        for (var k = 0u; k < ROW_BLOCKS; k++) {
            workgroupBarrier();
            if (blk == k) {
                for (var i = 0u; i < rn; i++) {
                    for (var t = 0u; t < SG_ROW; t++) {
                        let c4 = lane + t * SG;
                        if (c4 < D4) {
                            let idx = i * D4 + c4;
                            if (k == 0u) {
                                rows_k[idx] = dk_sum[i][t];
                                rows_v[idx] = dv_sum[i][t];
                            } else {
                                rows_k[idx] += dk_sum[i][t];
                                rows_v[idx] += dv_sum[i][t];
                            }
                        }
                    }
                }
            }
        }
        workgroupBarrier();
        for (var idx = lid; idx < rn * D4; idx += WG) {
            let i = idx / D4;
            let c4 = idx % D4;
            let at = coarse_row(kpr.kv_crow, sel.level, kpr.s, b * p + j0 + r0 + i) * d;
            let gk = rows_k[idx] * params.scale;
            let gv = rows_v[idx];
            for (var e = 0u; e < 4u; e++) {
                let c = c4 * 4u + e;
                if (c < d) {
                    dcoarse_k[at + c] = gk[e];
                    dcoarse_v[at + c] = gv[e];
                }
            }
        }
        // rows_k and rows_v are read above before the next row group's blocks write them.
        workgroupBarrier();
    }
}
