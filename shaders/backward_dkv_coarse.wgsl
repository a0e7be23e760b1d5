// Backward, dK~ and dV~ of one level's coarse keys (algorithm.md §8), by gather: one workgroup
// = up to PR coarse rows of one window b; it walks the queries whose far list holds b (the
// static inverse of the far lists, `level_far_readers` in geometry.wgsl; 2D: the far list
// itself, in geometry_grid.wgsl), BK queries at a time.
// Per tile, phase A computes P and dS for every (row, query) pair into workgroup memory, and
// phase B has each invocation sum them for its own (row, channel vec4) of dK~ and dV~:
// dK~_r = sum_i dS_ir q_i / sqrt(d), dV~_r = sum_i P_ir dO_i, in a fixed order, no atomics.
// Rows of empty sub-windows are never seen: their P is 0 and they get zeros.
// CPU mirror: the `Slot::Coarse` sums in `cpu::backward::fma_backward`.

#import params
#import geometry
#import level_select

@group(0) @binding(1) var<storage, read> q: array<f32>;                  // (bh, n, d)
@group(0) @binding(2) var<storage, read> coarse_k: array<f32>;           // (bh / kv_group, coarse_rows, d)
@group(0) @binding(3) var<storage, read> coarse_v: array<f32>;           // (bh / kv_group, coarse_rows, d)
@group(0) @binding(4) var<storage, read> dout: array<f32>;               // (bh, n, d)
@group(0) @binding(5) var<storage, read> stats: array<f32>;              // (bh, n, 2): LSE, D
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

// Phase A then phase B for `count` staged queries (call in uniform control flow).
fn consume_queries(count: u32, nrows: u32, lid: u32) {
    for (var idx = lid; idx < PR * BK; idx += WG) {
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
            pr = exp(s4.x + s4.y + s4.z + s4.w + rows_bias[r] - tile_lse[i]);
            ds = pr * (g4.x + g4.y + g4.z + g4.w - tile_delta[i]);
        }
        pair_p[idx] = pr;
        pair_ds[idx] = ds;
    }
    workgroupBarrier();
    for (var o = 0u; o < OUTS; o++) {
        let idx = lid + o * WG;
        if (idx < PR * D4) {
            let r = idx / D4;
            let c4 = idx % D4;
            for (var i = 0u; i < count; i++) {
                dk_acc[o] += pair_ds[r * BK + i] * tile_q[i * D4 + c4];
                dv_acc[o] += pair_p[r * BK + i] * tile_do[i * D4 + c4];
            }
        }
    }
}

// The queries of window `a` at this level (window size w; 2D: cell a of side w, a run per
// grid row).
fn window_queries(bh: u32, a: u32, w: u32, nrows: u32, lid: u32) {
    let cols = params.grid_w;
    for (var run = 0u; run < group_runs(params.n, w, cols, a); run++) {
        let queries = group_run(params.n, w, cols, a, run);
        for (var i0 = queries.x; i0 < queries.y; i0 += BK) {
            let count = min(BK, queries.y - i0);
            workgroupBarrier();
            stage_queries(bh, i0, count, lid);
            workgroupBarrier();
            consume_queries(count, nrows, lid);
        }
    }
}

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let info = params.levels[sel.level];
    let p = params.p;
    let d = params.d;
    let w = info.window;
    let chunks = (p + PR - 1u) / PR;
    let wid = dispatch_workgroup(wg);
    // One workgroup per (K/V head, window, chunk of rows); grouped-query heads sum over the
    // kv_group query heads that read the K/V head, in head order (deterministic).
    if (wid >= (params.batch_heads / params.kv_group) * info.windows * chunks) {
        return;
    }
    let kv_bh = wid / (info.windows * chunks);
    let rem = wid % (info.windows * chunks);
    let b = rem / chunks;
    let j0 = (rem % chunks) * PR;
    let nrows = min(PR, p - j0);
    // First element of row b*p + j0 of this level in the (bh / kv_group, coarse_rows, d)
    // buffers.
    let base = (kv_bh * params.coarse_rows + info.row_offset + b * p + j0) * d;

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
            bias = coarse_key_bias(row_count(params.n, w, p, params.grid_w, b * p + j0 + r));
        }
        rows_bias[r] = bias;
    }
    for (var o = 0u; o < OUTS; o++) {
        dk_acc[o] = vec4<f32>(0.0);
        dv_acc[o] = vec4<f32>(0.0);
    }

    // Query windows whose far list holds b, in increasing order.
    let causal = params.causal != 0u;
    for (var bh = kv_bh * params.kv_group; bh < (kv_bh + 1u) * params.kv_group; bh++) {
        for (var run = 0u; run < FAR_RUNS; run++) {
            let readers = level_far_readers(params.n, params.m, params.grid_w, sel.level, b,
                                            info.windows, causal, run);
            for (var a = readers.x; a < readers.y; a++) {
                window_queries(bh, a, w, nrows, lid);
            }
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
                    dcoarse_k[base + r * d + c] = gk[e];
                    dcoarse_v[base + r * d + c] = gv[e];
                }
            }
        }
    }
}
