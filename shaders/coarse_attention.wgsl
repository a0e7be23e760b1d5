// Per-level local attention at coarse resolution (algorithm.md §6, coarse queries): one
// invocation per coarse query (a, u) of one level, WG of them per workgroup, over the coarse
// keys of window a's far list. Each coarse query writes its partial result as
// (o~ = Y / Z, lse~ = M + ln Z), which carries the same information as (max, sum, weighted
// value sum); (0, ABSENT) when the far list is empty. CPU mirror: `cpu::coarse` (the
// coarse-query arm of `cpu::fma_forward`). 1D and 2D (a window is a cell, a sub-window a band)
// through the geometry interface of geometry.wgsl.
//
// Why not the staged tiles of the other attention passes: a far list holds at most 3 p keys,
// and the p coarse queries of a window that share it are too few to fill a workgroup (p = 2
// made workgroups of two invocations, which wasted llvmpipe's 8-wide SIMD and any GPU's warp).
// Each invocation reads its few keys straight from the buffers instead, one key at a time with
// an online softmax, and a workgroup holds the queries of WG / p windows.

#import params
#import geometry
#import level_select
#import sequences

@group(0) @binding(1) var<storage, read> q: array<f32>;            // coarse queries (bh, coarse_rows, d)
@group(0) @binding(4) var<storage, read> coarse_k: array<f32>;     // (bh / kv_group, coarse_rows, d)
@group(0) @binding(5) var<storage, read> coarse_v: array<f32>;     // (bh / kv_group, coarse_rows, d)
@group(0) @binding(6) var<storage, read_write> out: array<f32>;    // partial o~ (bh, coarse_rows, d)
@group(0) @binding(7) var<storage, read_write> lse: array<f32>;    // partial lse~ (bh, coarse_rows)

var<private> q_row: array<vec4<f32>, D4>;
var<private> acc: array<vec4<f32>, D4>;

// Row `row` (element offset) of a d-wide buffer as D4 vec4s, zero-padded.
fn load_k(row: u32) -> array<vec4<f32>, D4> {
    var x: array<vec4<f32>, D4>;
    for (var c4 = 0u; c4 < D4; c4++) {
        for (var e = 0u; e < 4u; e++) {
            let c = c4 * 4u + e;
            if (c < params.d) {
                x[c4][e] = coarse_k[row + c];
            }
        }
    }
    return x;
}

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let info = params.levels[sel.level];
    let p = params.p;
    let d = params.d;
    // The coarse queries of the windows holding tokens [chunk_lo, chunk_hi) (all of them
    // unless a split head's coarse rows are attended a group of windows at a time).
    let cols = params.grid_w;
    let groups = chunk_groups(params.chunk_lo, params.chunk_hi, info.window, cols);
    let a_lo = groups.x;
    var rows = (groups.y - a_lo) * p;
    if (params.seqs > 0u) {
        rows = seq_table[sec_rows(sel.level) + params.seqs]; // every sequence's (varlen)
    }
    let g = dispatch_workgroup(wg) * WG + lid;
    if (g >= query_heads() * rows) {
        return;
    }
    var r = a_lo * p + g % rows;
    var seq = 0u;
    if (params.seqs > 0u) {
        seq = seq_search(sec_rows(sel.level), r);
        r -= seq_table[sec_rows(sel.level) + seq];
    }
    let pr = problem(g / rows, seq);
    let n = pr.n;
    let a = r / p;
    // Rows of this level in the concatenated per-head buffers: the query head's coarse
    // queries, partial outputs and LSEs, and its K/V head's coarse keys and values.
    let level_row = coarse_row(pr.q_crow, sel.level, seq, 0u);
    let head = level_row * d;
    let kv_head = coarse_row(pr.kv_crow, sel.level, seq, 0u) * d;
    // The query row, as online_softmax's begin_row loads it (not imported: its tiles and
    // subgroup set-up have no use here, and the early return above is not uniform).
    for (var c4 = 0u; c4 < D4; c4++) {
        var x = vec4<f32>(0.0);
        for (var e = 0u; e < 4u; e++) {
            let c = c4 * 4u + e;
            if (c < d) {
                x[e] = q[head + r * d + c];
            }
        }
        q_row[c4] = x * params.scale;
        acc[c4] = vec4<f32>(0.0);
    }
    // Its coarse query row, then k~ and v~ of each key (`//#rows`: the counting variant of the tests only, `shaders::compose_counting`).
    //#rows(1u, 1u)
    var run_max = ABSENT;
    var run_sum = 0.0;
    var seen = false; // any key (not run_sum > 0: a NaN sum must reach the output)

    // The far list, bidirectional only: the config refuses causal + coarse queries.
    for (var run = 0u; run < FAR_RUNS; run++) {
        let far = level_far_run(n, params.m, cols, sel.level, a, level_windows(pr, sel.level),
                                false, run);
        for (var b = far.x; b < far.y; b++) {
            for (var j = 0u; j < p; j++) {
                let size = row_count(n, info.window, p, cols, b * p + j);
                if (size == 0u) {
                    continue;
                }
                let key = b * p + j;
                //#rows(2u, 2u)
                let kk = load_k(kv_head + key * d);
                var dot4 = vec4<f32>(0.0);
                for (var c4 = 0u; c4 < D4; c4++) {
                    dot4 += q_row[c4] * kk[c4];
                }
                let bias = coarse_key_bias(size);
                let score = dot4.x + dot4.y + dot4.z + dot4.w + bias;
                // Online softmax, one key at a time. A NaN score makes w (and so the row) NaN,
                // as in dense attention, whatever max() does with it.
                let new_max = max(run_max, score);
                let correction = exp(run_max - new_max);
                let w = exp(score - new_max);
                run_sum = run_sum * correction + w;
                for (var c4 = 0u; c4 < D4; c4++) {
                    var vv = vec4<f32>(0.0);
                    for (var e = 0u; e < 4u; e++) {
                        let c = c4 * 4u + e;
                        if (c < d) {
                            vv[e] = coarse_v[kv_head + key * d + c];
                        }
                    }
                    acc[c4] = acc[c4] * correction + w * vv;
                }
                run_max = new_max;
                seen = true;
            }
        }
    }

    if (seen) {
        let inv = 1.0 / run_sum;
        for (var c4 = 0u; c4 < D4; c4++) {
            let x = acc[c4] * inv;
            for (var e = 0u; e < 4u; e++) {
                let c = c4 * 4u + e;
                if (c < d) {
                    out[head + r * d + c] = x[e];
                }
            }
        }
        lse[level_row + r] = run_max + log(run_sum);
    } else {
        for (var c = 0u; c < d; c++) {
            out[head + r * d + c] = 0.0;
        }
        lse[level_row + r] = ABSENT;
    }
}
