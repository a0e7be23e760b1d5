// The tiled online softmax shared by the attention passes: one invocation owns one query row
// (q, running max, running sum, weighted value sum in registers); keys and values arrive in
// tiles of BK rows staged in workgroup memory by the whole workgroup (`near_field.wgsl` stages
// fine keys, `far_field.wgsl` coarse ones), so no score matrix ever reaches device memory.
// CPU mirror: `cpu::softmax_row`.
// Needs from the importer: consts D4 (= ceil(d / 4)), BK, WG; params; bindings q, out, lse.

// Each staged key carries a logit offset in tile_bias: 0 for fine keys, ln |S| for corrected
// coarse keys, ABSENT (params.wgsl) for an empty sub-window.
const NEG_START: f32 = -1e30;

var<workgroup> tile_k: array<vec4<f32>, BK * D4>;
var<workgroup> tile_v: array<vec4<f32>, BK * D4>;
var<workgroup> tile_bias: array<f32, BK>;

var<private> q_row: array<vec4<f32>, D4>;
var<private> acc: array<vec4<f32>, D4>;
var<private> run_max: f32;
var<private> run_sum: f32;

// Loads query row `i` of head `head` (element offset), pre-scaled by 1/sqrt(d), and resets
// the running state.
fn begin_row(head: u32, i: u32, in_tile: bool) {
    let d = params.d;
    for (var c4 = 0u; c4 < D4; c4++) {
        var x = vec4<f32>(0.0);
        if (in_tile) {
            for (var e = 0u; e < 4u; e++) {
                let c = c4 * 4u + e;
                if (c < d) {
                    x[e] = q[head + i * d + c];
                }
            }
        }
        q_row[c4] = x * params.scale;
        acc[c4] = vec4<f32>(0.0);
    }
    run_max = NEG_START;
    run_sum = 0.0;
}

// Folds the first `count` staged keys into this invocation's row; only keys r < visible
// (causal limit) whose bias is not ABSENT take part. Two sweeps per tile (scores and their
// maximum, then weights and values) so the accumulator is rescaled once per tile, not per key.
fn consume_tile(count: u32, visible: u32) {
    let n_keys = min(count, visible);
    var s: array<f32, BK>;
    var tile_max = NEG_START;
    var seen_any = false;
    for (var r = 0u; r < count; r++) {
        if (r < n_keys) {
            let bias = tile_bias[r];
            if (bias > ABSENT * 0.5) {
                var dot4 = vec4<f32>(0.0);
                for (var c4 = 0u; c4 < D4; c4++) {
                    dot4 += q_row[c4] * tile_k[r * D4 + c4];
                }
                let score = dot4.x + dot4.y + dot4.z + dot4.w + bias;
                s[r] = score;
                tile_max = max(tile_max, score);
                seen_any = true;
            }
        }
    }
    if (!seen_any) {
        return;
    }
    let new_max = max(run_max, tile_max);
    let correction = exp(run_max - new_max);
    run_sum *= correction;
    for (var c4 = 0u; c4 < D4; c4++) {
        acc[c4] *= correction;
    }
    run_max = new_max;
    // The keep test repeats the first sweep's instead of looking at s[r], so that a NaN score
    // (a NaN in q or k) poisons this row as it would in dense attention rather than vanishing.
    for (var r = 0u; r < count; r++) {
        if (r < n_keys && tile_bias[r] > ABSENT * 0.5) {
            let w = exp(s[r] - new_max);
            run_sum += w;
            for (var c4 = 0u; c4 < D4; c4++) {
                acc[c4] += w * tile_v[r * D4 + c4];
            }
        }
    }
}

// Writes o_i = acc / Z and LSE_i = M + ln Z.
fn finish_row(head: u32, row: u32, i: u32) {
    let d = params.d;
    let inv = 1.0 / run_sum;
    for (var c4 = 0u; c4 < D4; c4++) {
        let x = acc[c4] * inv;
        for (var e = 0u; e < 4u; e++) {
            let c = c4 * 4u + e;
            if (c < d) {
                out[head + i * d + c] = x[e];
            }
        }
    }
    lse[row] = run_max + log(run_sum);
}
