// Backward of coarse queries (algorithm.md §8 with §6), second step per level: dQ~ of every
// coarse query (a, u) of one level, over the coarse keys of window a's far list as
// coarse_attention attended them, with the row's (G, R, H) of backward_coarse_stats.wgsl:
//   dQ~_r = sum_k exp(s_rk - R_r) (G_r . v_k - H_r) k_k / sqrt(d),  s_rk = q~_r . k_k / sqrt(d) + bias_k.
// dQ~ then reaches dQ (and dWQ, dbQ) through the query pooling: downsample_backward.wgsl,
// weights_backward_q.wgsl. One invocation per coarse query, its few keys (at most 3 p) read
// straight from the buffers, as in coarse_attention.wgsl (which says why). 1D and 2D through
// the geometry interface. CPU mirror: the `query_slot` arm of `cpu::backward::fma_backward_in`.

#import params
#import geometry
#import level_select
#import sequences

@group(0) @binding(1) var<storage, read> coarse_q: array<f32>;            // (bh, coarse_rows, d)
@group(0) @binding(2) var<storage, read> coarse_k: array<f32>;            // (bh / kv_group, coarse_rows, d)
@group(0) @binding(3) var<storage, read> coarse_v: array<f32>;            // (bh / kv_group, coarse_rows, d)
@group(0) @binding(4) var<storage, read> coarse_dout: array<f32>;         // G: (bh, coarse_rows, d)
@group(0) @binding(5) var<storage, read> coarse_stats: array<f32>;        // (bh, coarse_rows, 2): R, H
@group(0) @binding(6) var<storage, read_write> dcoarse_q: array<f32>;     // (bh, coarse_rows, d)

var<private> q_row: array<vec4<f32>, D4>;   // pre-scaled by 1/sqrt(d)
var<private> g_row: array<vec4<f32>, D4>;
var<private> acc: array<vec4<f32>, D4>;

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let info = params.levels[sel.level];
    let p = params.p;
    let d = params.d;
    let cols = params.grid_w;
    var rows = info.windows * p;
    if (params.seqs > 0u) {
        rows = seq_table[sec_rows(sel.level) + params.seqs];
    }
    let g = dispatch_workgroup(wg) * WG + lid;
    if (g >= query_heads() * rows) {
        return;
    }
    var r = g % rows;
    var seq = 0u;
    if (params.seqs > 0u) {
        seq = seq_search(sec_rows(sel.level), r);
        r -= seq_table[sec_rows(sel.level) + seq];
    }
    let pr = problem(g / rows, seq);
    let n = pr.n;
    let a = r / p;
    let q_at = coarse_row(pr.q_crow, sel.level, seq, r);
    let kv_head = coarse_row(pr.kv_crow, sel.level, seq, 0u) * d;
    for (var c4 = 0u; c4 < D4; c4++) {
        var x = vec4<f32>(0.0);
        var y = vec4<f32>(0.0);
        for (var e = 0u; e < 4u; e++) {
            let c = c4 * 4u + e;
            if (c < d) {
                x[e] = coarse_q[q_at * d + c];
                y[e] = coarse_dout[q_at * d + c];
            }
        }
        q_row[c4] = x * params.scale;
        g_row[c4] = y;
        acc[c4] = vec4<f32>(0.0);
    }
    // Its q~ and G rows, then k~ and v~ of each key (`//#rows`: the counting variant of the tests only, `shaders::compose_counting`).
    //#rows(2u, 2u)
    let least = coarse_stats[2u * q_at];
    let h = coarse_stats[2u * q_at + 1u];

    // The far list, bidirectional only (the config refuses causal + coarse queries).
    for (var run = 0u; run < FAR_RUNS; run++) {
        let far = level_far_run(n, params.m, cols, sel.level, a, level_windows(pr, sel.level),
                                false, run);
        for (var b = far.x; b < far.y; b++) {
            for (var j = 0u; j < p; j++) {
                let size = row_count(n, info.window, p, cols, b * p + j);
                if (size == 0u) {
                    continue;
                }
                let key = kv_head + (b * p + j) * d;
                //#rows(2u, 2u)
                var s4 = vec4<f32>(0.0);
                var gv4 = vec4<f32>(0.0);
                for (var c4 = 0u; c4 < D4; c4++) {
                    var kk = vec4<f32>(0.0);
                    var vv = vec4<f32>(0.0);
                    for (var e = 0u; e < 4u; e++) {
                        let c = c4 * 4u + e;
                        if (c < d) {
                            kk[e] = coarse_k[key + c];
                            vv[e] = coarse_v[key + c];
                        }
                    }
                    s4 += q_row[c4] * kk;
                    gv4 += g_row[c4] * vv;
                }
                let s = s4.x + s4.y + s4.z + s4.w + coarse_key_bias(size);
                let ds = exp(s - least) * (gv4.x + gv4.y + gv4.z + gv4.w - h);
                for (var c4 = 0u; c4 < D4; c4++) {
                    var kk = vec4<f32>(0.0);
                    for (var e = 0u; e < 4u; e++) {
                        let c = c4 * 4u + e;
                        if (c < d) {
                            kk[e] = coarse_k[key + c];
                        }
                    }
                    acc[c4] += ds * kk;
                }
            }
        }
    }
    for (var c4 = 0u; c4 < D4; c4++) {
        let x = acc[c4] * params.scale;
        for (var e = 0u; e < 4u; e++) {
            let c = c4 * 4u + e;
            if (c < d) {
                dcoarse_q[q_at * d + c] = x[e];
            }
        }
    }
}
