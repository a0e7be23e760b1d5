// Fused fine-query FMA (algorithm.md §3, §5) in FlashAttention-2's shape for SIMT GPUs: the
// same result as fine_attention.wgsl (causal and bidirectional, 1D and 2D, coarse queries'
// near field, GQA, variable-length batches, split heads, the softmax variants), laid out as
// dense_tiled.wgsl lays out dense attention. CPU mirror: `cpu::fma_forward`. Sizes:
// `plan::fine_tiled` (docs/perf.md, change 29).
//
// A workgroup owns a tile of WG queries of one fine block a0 (all of whose queries share one
// gather list: algorithm.md §3, block uniformity); a block of more than WG queries is several
// tiles, as in fine_attention.wgsl (`params.tiles_per_block`). Its THREADS = ceil(WG / TQ) *
// LANES invocations form row groups of LANES, each group owning TQ query rows. The block's
// keys come as tiles of BK rows staged in workgroup memory and read by every query of the tile:
//   - the near field: each near run (1D: one run of 2 or 3 blocks; 2D: a run per token row of
//     the 3 x 3 cells) in tiles of consecutive keys; each row masks its own visible range (the
//     causal diagonal: keys t <= i; the window's band);
//   - the far field: every level's far-list coarse keys gathered into one sequence
//     (`far_keys.wgsl`), in tiles whose rows carry their count correction (coarse_key_bias);
//     the far list is the block's, so no row masks it.
// Per tile, invocation (g, c) computes a register micro-tile of scores, its TQ rows x the keys
// c, c + LANES, ... (TK of them), as vec4 dot products; the row maxima over the tile are combined
// across the group's LANES invocations through workgroup memory in lane order (deterministic,
// no subgroup operation, so the text runs in a browser too); each lane writes its weights
// exp(s - max) into a P tile, and accumulates O for its TQ rows over the head's vec4 columns
// c, c + LANES, ... (NV of them). A row's running sum is kept per lane and added over the lanes
// once, at the end, in lane order. One online softmax over every key of every level.

#import params
#import geometry
#import sequences
#import variants

@group(0) @binding(1) var<storage, read> q: array<f32>;            // (bh, n, d)
@group(0) @binding(2) var<storage, read> k: array<f32>;            // (bh / kv_group, n, d)
@group(0) @binding(3) var<storage, read> v: array<f32>;            // (bh / kv_group, n, d)
@group(0) @binding(4) var<storage, read> coarse_k: array<f32>;     // (bh / kv_group, coarse_rows, d)
@group(0) @binding(5) var<storage, read> coarse_v: array<f32>;     // (bh / kv_group, coarse_rows, d)
@group(0) @binding(6) var<storage, read_write> out: array<f32>;    // (bh, n, d)
@group(0) @binding(7) var<storage, read_write> lse: array<f32>;    // (bh, n)

// TQ and LANES come from the composer (`plan::fine_tiled`); the sizes that follow from them,
// the row loads: `tiled_rows.wgsl`.
#import tiled_rows
#import far_keys

// Workgroup memory, row strides padded by one vec4 so the invocations of a subgroup reading
// different rows hit different banks (`plan::fine_tiled::tile_bytes`).
var<workgroup> q_tile: array<vec4<f32>, ROWS * QS>;
var<workgroup> k_tile: array<vec4<f32>, BK * QS>;
var<workgroup> v_tile: array<vec4<f32>, BK4 * 4u * D4>;
var<workgroup> p_tile: array<vec4<f32>, ROWS * PS>;
// Each lane's partial row maximum (then its partial row sum), row-major: [row][lane].
var<workgroup> lanes: array<f32, ROWS * LANES>;
// Whether the V tile of key tile j holds a non-finite value: flag j % 2 (see stage_fine).
var<workgroup> v_bad: array<atomic<u32>, 2>;
// Each staged key's logit offset: 0 for a fine key, coarse_key_bias for a coarse one (ABSENT
// for an empty sub-window: no row sees it).
var<workgroup> key_bias: array<f32, BK>;
// Element offset of each staged coarse key's row in coarse_k and coarse_v.
var<workgroup> far_row: array<u32, BK>;

// This invocation's rows grp * TQ + a: token, whether it is a query of the tile, its visible
// fine keys [lo, hi) (the causal limit, the window's band), running maximum and sum (the sum
// over this lane's keys only) and O over this lane's columns.
var<private> row_tok: array<u32, TQ>;
var<private> row_live: array<u32, TQ>;
var<private> row_lo: array<u32, TQ>;
var<private> row_hi: array<u32, TQ>;
var<private> run_max: array<f32, TQ>;
var<private> run_sum: array<f32, TQ>;
var<private> acc: array<array<vec4<f32>, NV>, TQ>;

// Clears the non-finite flag tile j + 1 will use (last read by tile j - 1, before this tile's
// first barrier). Call while staging tile j.
fn clear_next_flag(j: u32, lid: u32) {
    if (lid == 0u) {
        atomicStore(&v_bad[(j + 1u) % 2u], 0u);
    }
}

// Stages fine keys/values [t0, t0 + count) of the K/V head at element offset `head` (count <=
// BK), tile j: K rows at the padded stride, V rows up to a multiple of 4 (rows from count on
// zero: their weight is 0 and 0 * 0 stays 0), every bias 0. Flags a non-finite V value in
// v_bad[j % 2]. Call in uniform control flow, between barriers.
fn stage_fine(head: u32, t0: u32, count: u32, j: u32, lid: u32) {
    let d = params.d;
    clear_next_flag(j, lid);
    // Every invocation walks the staged K and V rows (its micro-tiles read them); the
    // workgroup reads each once.
    //#rows(2u * count, select(0u, 2u * count, lid == 0u))
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
    for (var r = lid; r < BK; r += THREADS) {
        key_bias[r] = 0.0;
    }
}

// The 4 elements of coarse row `row` (element offset) of K~ or V~ from vec4 column c4, zero
// past d (coarse rows are f32 whatever the storage of Q, K, V).
fn load_ck4(row: u32, c4: u32, d: u32) -> vec4<f32> {
    var x = vec4<f32>(0.0);
    for (var e = 0u; e < 4u; e++) {
        let c = c4 * 4u + e;
        if (c < d) {
            x[e] = coarse_k[row + c];
        }
    }
    return x;
}

fn load_cv4(row: u32, c4: u32, d: u32) -> vec4<f32> {
    var x = vec4<f32>(0.0);
    for (var e = 0u; e < 4u; e++) {
        let c = c4 * 4u + e;
        if (c < d) {
            x[e] = coarse_v[row + c];
        }
    }
    return x;
}

// Stages keys [g0, g0 + count) of block a0's gathered far field (count <= BK), tile j: first
// each key's row and bias (one invocation per key: finding a key's level walks the levels),
// then the rows element by element (neighbouring invocations read neighbouring vec4s). Call in
// uniform control flow, between barriers.
fn stage_far(pr: Problem, a0: u32, causal: bool, g0: u32, count: u32, j: u32, lid: u32) {
    let d = params.d;
    clear_next_flag(j, lid);
    //#rows(2u * count, select(0u, 2u * count, lid == 0u))
    for (var r = lid; r < BK; r += THREADS) {
        var bias = ABSENT;
        var row = 0u;
        if (r < count) {
            let key = far_key(pr, a0, causal, g0 + r);
            let info = params.levels[key.x];
            row = coarse_row(pr.kv_crow, key.x, pr.s, key.y) * d;
            bias = coarse_key_bias(row_count(pr.n, info.window, params.p, params.grid_w, key.y));
        }
        far_row[r] = row;
        key_bias[r] = bias;
    }
    workgroupBarrier();
    var bad = false;
    for (var idx = lid; idx < BK4 * 4u * D4; idx += THREADS) {
        let r = idx / D4;
        let c4 = idx % D4;
        var kk = vec4<f32>(0.0);
        var vv = vec4<f32>(0.0);
        if (r < count) {
            let base = far_row[r];
            kk = load_ck4(base, c4, d);
            vv = load_cv4(base, c4, d);
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

// Folds the staged tile j of `count` keys into this invocation's rows. Fine keys (`fine`) start
// at token t0 and each row sees those in its [lo, hi); coarse keys are seen by every row of
// the block, with their bias. A key whose bias is ABSENT is seen by no row. Call in uniform
// control flow, right after the staging's barrier.
fn consume_tile(t0: u32, count: u32, fine: bool, j: u32, grp: u32, lane: u32, lid: u32) {
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
            let bias = key_bias[min(kr, BK - 1u)];
            var keep = kr < count && row_live[a] != 0u && bias > ABSENT * 0.5;
            if (fine) {
                keep = keep && t >= row_lo[a] && t < row_hi[a];
            }
            let dt = dots[a][b];
            // The softcap caps the score; a coarse key's count correction comes after.
            let score = capped(dt.x + dt.y + dt.z + dt.w) + bias;
            s[a][b] = score;
            ok[a][b] = keep;
            if (keep) {
                m = max(max(m, score), SEEN);
            }
        }
        lanes[(grp * TQ + a) * LANES + lane] = m;
    }
    workgroupBarrier();

    // Each row's maximum over the tile (lane order), its new running maximum, and this lane's
    // weights exp(s - max) into P (0 for keys the row does not see).
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
    // P columns from BK to the next multiple of 4: zeros, so the P x V sweep may run over whole
    // vec4s of keys (constant false when BK % 4 = 0).
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

    // O += P V over this lane's columns. A key a row does not see has weight 0; where the V
    // tile holds a non-finite value, 0 * inf would poison rows that do not see it (an empty
    // sub-window's row, a masked key), so that tile skips zero weights (a uniform branch: the
    // flag is the workgroup's).
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
}

@compute @workgroup_size(THREADS)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let wid = linear_workgroup(wg);
    if (wid >= params.total_workgroups) {
        return; // uniform over the workgroup
    }
    let m = params.m;
    let cols = params.grid_w;
    // The query blocks of the chunk [chunk_lo, chunk_hi) (all of them unless split), or of each
    // sequence of a variable-length batch: as fine_attention.wgsl.
    let blocks = chunk_blocks(params.chunk_lo, params.chunk_hi, m, cols);
    let tiles = blocks.y * params.tiles_per_block;
    let at = locate(wid, tiles, sec_tile(), query_heads());
    if (at.x == 0xffffffffu) {
        return; // uniform
    }
    let pr = problem(at.x, at.y);
    let n = pr.n;
    let tile = at.z;
    let a0 = blocks.x + tile / params.tiles_per_block;
    // Queries q0 .. q1 of the block (1D: tokens block start + q); row r is query q0 + r.
    let q0 = (tile % params.tiles_per_block) * WG;
    let q1 = min(q0 + WG, block_size(n, m, cols, a0));
    // One past the tile's last query (1D: its causal key limit).
    let i1 = block_token(n, m, cols, a0, q1 - 1u) + 1u;
    // Element offsets of row 0 of this head and of its K/V head in the bound tensors (a split
    // head's bindings start at global row row_base: see fine_attention.wgsl).
    let head = (pr.q_row - params.row_base) * params.d;
    let kv_head = (pr.kv_row - params.row_base) * params.d;
    let causal = params.causal != 0u;
    let d = params.d;
    let grp = lid / LANES;
    let lane = lid % LANES;

    // The tile's queries, pre-scaled by 1 / sqrt(d), staged once (zero past the tile).
    for (var idx = lid; idx < ROWS * D4; idx += THREADS) {
        let r = idx / D4;
        let c4 = idx % D4;
        var x = vec4<f32>(0.0);
        if (r < WG && q0 + r < q1) {
            x = load_q4(head + block_token(n, m, cols, a0, q0 + r) * d, c4, d);
        }
        q_tile[r * QS + c4] = x * params.scale;
    }

    var live_rows = 0u;
    for (var a = 0u; a < TQ; a++) {
        let r = grp * TQ + a;
        let live = r < WG && q0 + r < q1;
        var i = 0u;
        var lo = 0u;
        var hi = 0u;
        if (live) {
            i = block_token(n, m, cols, a0, q0 + r);
            // Causal: fine keys t <= i; bidirectional: the whole near field.
            hi = select(n, i + 1u, causal);
            if (WINDOW) {
                let band = window_keys(i32(i), n);
                lo = band.x;
                hi = min(hi, band.y);
            }
            live_rows += 1u;
        }
        row_tok[a] = i;
        row_live[a] = select(0u, 1u, live);
        row_lo[a] = lo;
        row_hi[a] = hi;
        run_max[a] = ABSENT;
        run_sum[a] = 0.0;
        for (var nv = 0u; nv < NV; nv++) {
            acc[a][nv] = vec4<f32>(0.0);
        }
        // The sink joins every row once, counted by lane 0 only.
        if (SINKS && live) {
            run_max[a] = sink_logit(pr);
            run_sum[a] = select(0.0, 1.0, lane == 0u);
        }
    }
    // Its query rows (`//#rows(serial, total)`: the counting variant of the tests only,
    // `shaders::compose_counting`; elsewhere a comment): each lane holds its group's rows.
    //#rows(live_rows, select(0u, live_rows, lane == 0u))

    // Level 0, the near field; causal: the tile's keys stop at its last query (each row's
    // [lo, hi) does the rest).
    var j = 0u;
    for (var run = 0u; run < near_runs(n, m, cols, a0); run++) {
        let near = near_run(n, m, cols, a0, causal, run);
        var lo = near.x;
        var hi = select(near.y, i1, causal);
        if (WINDOW) {
            // The tile's keys: from its first query's window start to its last one's end
            // (FMA's window lies inside the near field: FmaConfig::validate).
            let first = block_token(n, m, cols, a0, q0);
            lo = max(lo, window_keys(i32(first), n).x);
            hi = min(hi, window_keys(i32(i1 - 1u), n).y);
            hi = max(hi, lo);
        }
        for (var t0 = lo; t0 < hi; t0 += BK) {
            let count = min(BK, hi - t0);
            workgroupBarrier();
            stage_fine(kv_head, t0, count, j, lid);
            workgroupBarrier();
            consume_tile(t0, count, true, j, grp, lane, lid);
            j += 1u;
        }
    }

    // Coarse levels, gathered (none with coarse queries, nor with a window: FMA's window is its
    // near field alone).
    var far_levels = select(params.num_levels, 0u, params.coarse_queries != 0u);
    if (WINDOW) {
        far_levels = 0u;
    }
    let total = far_total(pr, a0, causal, far_levels);
    for (var g0 = 0u; g0 < total; g0 += BK) {
        let count = min(BK, total - g0);
        workgroupBarrier();
        stage_far(pr, a0, causal, g0, count, j, lid);
        workgroupBarrier();
        consume_tile(0u, count, false, j, grp, lane, lid);
        j += 1u;
    }

    // The rows' sums over the lanes (lane order), then O = acc / Z and LSE = M + ln Z. The
    // last readers of `lanes` (the tile maxima) passed the P barrier, so it is free.
    for (var a = 0u; a < TQ; a++) {
        lanes[(grp * TQ + a) * LANES + lane] = run_sum[a];
    }
    workgroupBarrier();
    for (var a = 0u; a < TQ; a++) {
        if (row_live[a] == 0u) {
            continue;
        }
        let r = grp * TQ + a;
        let i = row_tok[a];
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
                        out[head + i * d + c] = x[e];
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
