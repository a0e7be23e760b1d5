// Exact dense attention in FlashAttention-2's shape for SIMT GPUs: the same result as
// dense_attention.wgsl (causal bottom-right, cross lengths, GQA, varlen, key chunks that resume,
// the softmax variants), laid out for a GPU instead of for llvmpipe. CPU mirror:
// `cpu::dense_attention`. Sizes: `plan::dense_tiled` (docs/perf.md, "Dense attention in tiles").
//
// A workgroup owns a block of WG query rows of one head (WG is the query tile, as in
// dense_attention.wgsl, so plans, split heads and sequence tables count tiles the same way);
// its THREADS = ceil(WG / TQ) * LANES invocations form row groups of LANES invocations, each
// group owning TQ rows. Per tile of BK keys:
//   - K and V rows are staged once in workgroup memory and read by every query of the block
//     (the whole point: a K/V element fetched from memory feeds WG queries, not one);
//   - invocation (g, c) computes a register micro-tile of scores, its TQ rows x the keys
//     c, c + LANES, ... (TK of them), from the block's queries (staged once per block) and the
//     keys, as vec4 dot products: TQ + TK workgroup loads feed TQ TK vec4 FMAs;
//   - the row maximum over the tile is combined across the group's LANES invocations through
//     workgroup memory, in lane order (deterministic), then each invocation rescales its share
//     and writes its exp(s - max) into a P tile;
//   - invocation (g, c) accumulates O for its TQ rows and the vec4 columns c, c + LANES, ...
//     of the head (NV of them): per 4 keys TQ loads of P and 4 NV loads of V feed 16 TQ NV FMAs.
// The running sum of a row is kept per invocation (each sums its own keys under the shared
// running maximum) and added across the group once, at the end, in lane order.
// Workgroup memory, with the row strides padded by one vec4 so that the invocations of a
// subgroup reading different rows hit different banks: Q (WG rows), K (BK rows), V (BK rows),
// P (WG rows of BK), the lanes' partial maxima and sums: `plan::dense_tiled::tile_bytes`.

#import params
#import geometry
#import sequences
#import variants

@group(0) @binding(1) var<storage, read> q: array<f32>;            // (bh, n, d)
@group(0) @binding(2) var<storage, read> k: array<f32>;            // (bh / kv_group, n_kv, d)
@group(0) @binding(3) var<storage, read> v: array<f32>;            // (bh / kv_group, n_kv, d)
@group(0) @binding(6) var<storage, read_write> out: array<f32>;    // (bh, n, d)
@group(0) @binding(7) var<storage, read_write> lse: array<f32>;    // (bh, n)

// TQ (query rows per invocation) and LANES (invocations per row group) come from the composer
// (`plan::dense_tiled`); the micro-tile sizes that follow from them (GROUPS, ROWS, THREADS, TK,
// NV, QS, BK4, PS), SEEN, the row loads and `non_finite` are `tiled_rows.wgsl`'s, shared with
// FMA's tiled pass. Written for any WG, BK, D4 >= 1 (the validation tests compose every pass
// with odd sizes); the plans use WG a multiple of TQ, BK of LANES.
#import tiled_rows

var<workgroup> q_tile: array<vec4<f32>, ROWS * QS>;
var<workgroup> k_tile: array<vec4<f32>, BK * QS>;
var<workgroup> v_tile: array<vec4<f32>, BK4 * 4u * D4>;
var<workgroup> p_tile: array<vec4<f32>, ROWS * PS>;
// Each lane's partial row maximum (then its partial row sum), row-major: [row][lane].
var<workgroup> lanes: array<f32, ROWS * LANES>;
// Whether the V tile of key tile j holds a non-finite value: flag j % 2 (see stage_tile).
var<workgroup> v_bad: array<atomic<u32>, 2>;

// Stages keys/values [t0, t0 + count) of the K/V head at element offset `head` (tile j of the
// row block): K rows at the padded stride, V rows up to a multiple of 4 (the rows from count
// on zero: P is 0 there and 0 * 0 stays 0). Flags a non-finite V value in v_bad[j % 2]; the
// other flag (last read by tile j - 1, before this tile's first barrier) is cleared for tile
// j + 1. Call in uniform control flow, between barriers.
fn stage_tile(head: u32, t0: u32, count: u32, j: u32, lid: u32) {
    let d = params.d;
    if (lid == 0u) {
        atomicStore(&v_bad[(j + 1u) % 2u], 0u);
    }
    var bad = false;
    for (var idx = lid; idx < BK4 * 4u * D4; idx += THREADS) {
        let r = idx / D4;
        let c4 = idx % D4;
        var kk = vec4<f32>(0.0);
        var vv = vec4<f32>(0.0);
        if (r < count) {
            let base = head + (t0 + r) * d;
            kk = load_k4(base, c4, d);
            vv = load_v4(base, c4, d);
            bad = bad || non_finite(vv);
        }
        if (r < BK) {
            k_tile[r * QS + c4] = kk;
        }
        v_tile[idx] = vv;
    }
    if (bad) {
        atomicOr(&v_bad[j % 2u], 1u);
    }
}

@compute @workgroup_size(THREADS)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let wid = linear_workgroup(wg);
    if (wid >= params.total_workgroups) {
        return; // uniform over the workgroup
    }
    // The problem and the block of rows: as dense_attention.wgsl's main (the same tiles, the
    // same causal order of tiles, the same key chunks and window band).
    let at = locate(wid, params.tiles_per_block, sec_tile(), query_heads());
    if (at.x == 0xffffffffu) {
        return; // uniform
    }
    let pr = problem(at.x, at.y);
    let n = pr.n;
    let varlen = params.seqs > 0u;
    let n_kv = pr.n_kv;
    let key_hi = select(params.key_hi, min(params.key_hi, n_kv), varlen);
    let causal = params.causal != 0u;
    var tile = at.z;
    if (causal && !varlen) {
        tile = causal_block(at.z, params.tiles_per_block);
    }
    let i0 = params.chunk_lo + tile * WG;
    let i1 = min(i0 + WG, select(params.chunk_hi, n, varlen));
    // Keys the block attends over all chunks: [0, t_end); causal tiles past the block's last
    // row are never staged.
    let t_end = select(n_kv, max(i1 + n_kv, n) - n, causal);
    let shift = i32(n_kv) - i32(n);
    var t_start = params.key_lo;
    var t_stop = min(t_end, key_hi);
    if (WINDOW) {
        let band_lo = window_keys(i32(i0) + shift, n_kv).x;
        let band_hi = window_keys(i32(i1) - 1 + shift, n_kv).y;
        if (params.key_lo > 0u && (params.key_lo >= band_hi || key_hi <= band_lo)) {
            return; // this key chunk holds none of the block's keys; uniform
        }
        t_start = max(t_start, band_lo);
        t_stop = max(min(t_stop, band_hi), t_start);
    }
    if (params.key_lo >= t_end && params.key_lo > 0u) {
        return; // finished by an earlier key chunk (causal); uniform
    }
    let q_head = (pr.q_row - params.row_base) * params.d;
    let k_head = (pr.kv_row - params.key_base) * params.d;
    let d = params.d;
    let grp = lid / LANES;
    let lane = lid % LANES;

    // The block's queries, pre-scaled by 1 / sqrt(d), staged once (zero past the block).
    for (var idx = lid; idx < ROWS * D4; idx += THREADS) {
        let r = idx / D4;
        let c4 = idx % D4;
        var x = vec4<f32>(0.0);
        if (i0 + r < i1) {
            x = load_q4(q_head + (i0 + r) * d, c4, d);
        }
        q_tile[r * QS + c4] = x * params.scale;
    }

    // This invocation's rows: their visible keys [lo, hi), running maximum and sum (the sum
    // over this lane's keys only), and O over this lane's columns.
    var lo: array<u32, TQ>;
    var hi: array<u32, TQ>;
    var run_max: array<f32, TQ>;
    var run_sum: array<f32, TQ>;
    var acc: array<array<vec4<f32>, NV>, TQ>;
    for (var a = 0u; a < TQ; a++) {
        let r = grp * TQ + a;
        let i = i0 + r;
        let live = r < WG && i < i1;
        // Causal: keys t <= i + n_kv - n (none when i + 1 + n_kv <= n).
        var h = select(0u, n_kv, live);
        if (causal && live) {
            let lim = i + 1u + n_kv;
            h = select(0u, lim - n, lim > n);
        }
        var l = 0u;
        if (WINDOW && live) {
            let band = window_keys(i32(i) + shift, n_kv);
            l = band.x;
            h = min(h, band.y);
        }
        lo[a] = l;
        hi[a] = h;
        run_max[a] = ABSENT;
        run_sum[a] = 0.0;
        for (var nv = 0u; nv < NV; nv++) {
            acc[a][nv] = vec4<f32>(0.0);
        }
        if (!live) {
            continue;
        }
        if (params.key_lo == 0u) {
            // The sink joins once, in the first key chunk, counted by lane 0 only.
            if (SINKS) {
                run_max[a] = sink_logit(pr);
                run_sum[a] = select(0.0, 1.0, lane == 0u);
            }
        } else {
            // Resume the row's partial (O, LSE) of the previous key chunk: acc = O, running
            // max = LSE, running sum 1 (lane 0's), or empty when LSE = -inf.
            let row = pr.q_row + i - params.row_base;
            for (var nv = 0u; nv < NV; nv++) {
                let c4 = lane + nv * LANES;
                if (c4 < D4) {
                    var x = vec4<f32>(0.0);
                    for (var e = 0u; e < 4u; e++) {
                        let c = c4 * 4u + e;
                        if (c < d) {
                            x[e] = out[q_head + i * d + c];
                        }
                    }
                    acc[a][nv] = x;
                }
            }
            let empty = bitcast<u32>(lse[row]) == 0xff800000u;
            run_max[a] = select(lse[row], ABSENT, empty);
            run_sum[a] = select(select(0.0, 1.0, lane == 0u), 0.0, empty);
        }
    }

    var j = 0u;
    for (var t0 = t_start; t0 < t_stop; t0 += BK) {
        let count = min(BK, t_stop - t0);
        workgroupBarrier();
        stage_tile(k_head, t0, count, j, lid);
        workgroupBarrier();

        // Scores of the micro-tile: rows grp * TQ + a, keys lane + LANES b.
        var dots: array<array<vec4<f32>, TK>, TQ>;
        for (var c4 = 0u; c4 < D4; c4++) {
            var qv: array<vec4<f32>, TQ>;
            for (var a = 0u; a < TQ; a++) {
                qv[a] = q_tile[(grp * TQ + a) * QS + c4];
            }
            for (var b = 0u; b < TK; b++) {
                let kr = min(lane + b * LANES, BK - 1u);
                let kv = k_tile[kr * QS + c4];
                for (var a = 0u; a < TQ; a++) {
                    dots[a][b] += qv[a] * kv;
                }
            }
        }
        var s: array<array<f32, TK>, TQ>;
        var ok: array<array<bool, TK>, TQ>;
        for (var a = 0u; a < TQ; a++) {
            var m = ABSENT;
            for (var b = 0u; b < TK; b++) {
                let kr = lane + b * LANES;
                let t = t0 + kr;
                let keep = kr < count && t >= lo[a] && t < hi[a];
                let dt = dots[a][b];
                let score = capped(dt.x + dt.y + dt.z + dt.w);
                s[a][b] = score;
                ok[a][b] = keep;
                if (keep) {
                    m = max(max(m, score), SEEN);
                }
            }
            lanes[(grp * TQ + a) * LANES + lane] = m;
        }
        workgroupBarrier();

        // Each row's maximum over the tile (lane order), its new running maximum, and this
        // lane's weights exp(s - max) into P (0 for keys the row does not see).
        for (var a = 0u; a < TQ; a++) {
            let r = grp * TQ + a;
            var tile_max = ABSENT;
            for (var c = 0u; c < LANES; c++) {
                tile_max = max(tile_max, lanes[r * LANES + c]);
            }
            let seen = tile_max > ABSENT * 0.5;
            let new_max = select(run_max[a], max(run_max[a], tile_max), seen);
            let correction = exp(run_max[a] - new_max);
            var sum = 0.0;
            for (var b = 0u; b < TK; b++) {
                let kr = lane + b * LANES;
                var w = 0.0;
                if (ok[a][b]) {
                    w = exp(s[a][b] - new_max);
                }
                sum += w;
                if (kr < BK) {
                    p_tile[r * PS + kr / 4u][kr % 4u] = w;
                }
            }
            if (seen) {
                run_sum[a] = run_sum[a] * correction + sum;
                for (var nv = 0u; nv < NV; nv++) {
                    acc[a][nv] *= correction;
                }
                run_max[a] = new_max;
            }
        }
        // P columns from BK to the next multiple of 4: zeros, so the P x V sweep may run over
        // whole vec4s of keys (never written otherwise; constant false when BK % 4 = 0).
        for (var idx = lid; BK % 4u != 0u && idx < ROWS * BK4; idx += THREADS) {
            let r = idx / BK4;
            let c = idx % BK4;
            for (var e = 0u; e < 4u; e++) {
                let kr = c * 4u + e;
                if (kr >= BK) {
                    p_tile[r * PS + c][e] = 0.0;
                }
            }
        }
        workgroupBarrier();

        // O += P V over this lane's columns. A masked key has weight 0; where the V tile holds
        // a non-finite value, 0 * inf would poison rows that do not see it, so that tile skips
        // zero weights (a uniform branch: the flag is the workgroup's).
        let guard = atomicLoad(&v_bad[j % 2u]) != 0u;
        for (var k4 = 0u; k4 < (count + 3u) / 4u; k4++) {
            var pv: array<vec4<f32>, TQ>;
            for (var a = 0u; a < TQ; a++) {
                pv[a] = p_tile[(grp * TQ + a) * PS + k4];
            }
            for (var nv = 0u; nv < NV; nv++) {
                let c4 = min(lane + nv * LANES, D4 - 1u);
                for (var e = 0u; e < 4u; e++) {
                    let vv = v_tile[(k4 * 4u + e) * D4 + c4];
                    for (var a = 0u; a < TQ; a++) {
                        let w = pv[a][e];
                        if (guard) {
                            acc[a][nv] += select(vec4<f32>(0.0), w * vv, w != 0.0);
                        } else {
                            acc[a][nv] += w * vv;
                        }
                    }
                }
            }
        }
        j += 1u;
    }

    // The rows' sums over the lanes (lane order), then O = acc / Z and LSE = M + ln Z; a row
    // that attended no key gets O = 0 and LSE = -inf. The last readers of `lanes` (the tile
    // maxima) passed the P barrier, so it is free.
    for (var a = 0u; a < TQ; a++) {
        lanes[(grp * TQ + a) * LANES + lane] = run_sum[a];
    }
    workgroupBarrier();
    for (var a = 0u; a < TQ; a++) {
        let r = grp * TQ + a;
        let i = i0 + r;
        if (r >= WG || i >= i1) {
            continue;
        }
        var z = 0.0;
        for (var c = 0u; c < LANES; c++) {
            z += lanes[r * LANES + c];
        }
        let empty = z == 0.0;
        let inv = select(1.0 / z, 0.0, empty);
        for (var nv = 0u; nv < NV; nv++) {
            let c4 = lane + nv * LANES;
            if (c4 < D4) {
                let x = acc[a][nv] * inv;
                for (var e = 0u; e < 4u; e++) {
                    let c = c4 * 4u + e;
                    if (c < d) {
                        out[q_head + i * d + c] = x[e];
                    }
                }
            }
        }
        if (lane == 0u) {
            let row = pr.q_row + i - params.row_base;
            if (empty) {
                lse[row] = neg_inf(); // a store, no arithmetic on it
            } else {
                lse[row] = run_max[a] + log(z);
            }
        }
    }
}

// The block workgroup z of a problem's `blocks` runs: causal, in the order 0, B-1, 1, B-2, ...
// (as dense_attention.wgsl's causal_tile: a contiguous run of workgroups mixes short and long
// blocks; on a GPU it also starts the longest blocks early rather than last).
fn causal_block(z: u32, blocks: u32) -> u32 {
    if (z % 2u == 0u) {
        return z / 2u;
    }
    return blocks - 1u - z / 2u;
}
