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
// the running state. Call in uniform control flow (the subgroup variant counts its lanes).
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
    tile_rows_begin();
}

// Whether staged key r (of a tile of `count` keys, of which keys r < n_keys are visible) takes
// part: visible and not ABSENT. Rows from count on are stale: never read for r >= n_keys.
fn key_ok(r: u32, n_keys: u32) -> bool {
    return r < n_keys && tile_bias[min(r, BK - 1u)] > ABSENT * 0.5;
}

// key_ok of keys r .. r + 3.
fn keys_ok(r: u32, n_keys: u32) -> vec4<bool> {
    return vec4<bool>(key_ok(r, n_keys), key_ok(r + 1u, n_keys), key_ok(r + 2u, n_keys),
                      key_ok(r + 3u, n_keys));
}

// Dot products of this invocation's q_row with staged keys r .. r + 3, where ok (elsewhere
// the result is not used). Keys go four at a time: each q_row element is loaded once per four
// keys instead of once per key (register blocking; lavapipe keeps these per-invocation arrays
// in memory).
fn tile_dots_plain(r: u32, ok: vec4<bool>) -> vec4<f32> {
    var d0 = vec4<f32>(0.0);
    var d1 = vec4<f32>(0.0);
    var d2 = vec4<f32>(0.0);
    var d3 = vec4<f32>(0.0);
    if (all(ok)) {
        for (var c4 = 0u; c4 < D4; c4++) {
            let x = q_row[c4];
            d0 += x * tile_k[r * D4 + c4];
            d1 += x * tile_k[(r + 1u) * D4 + c4];
            d2 += x * tile_k[(r + 2u) * D4 + c4];
            d3 += x * tile_k[(r + 3u) * D4 + c4];
        }
    } else if (any(ok)) {
        // A partial group (tile end, causal diagonal, empty sub-window): key by key.
        for (var c4 = 0u; c4 < D4; c4++) {
            let x = q_row[c4];
            if (ok.x) { d0 += x * tile_k[r * D4 + c4]; }
            if (ok.y) { d1 += x * tile_k[(r + 1u) * D4 + c4]; }
            if (ok.z) { d2 += x * tile_k[(r + 2u) * D4 + c4]; }
            if (ok.w) { d3 += x * tile_k[(r + 3u) * D4 + c4]; }
        }
    }
    let one = vec4<f32>(1.0);
    return vec4<f32>(dot(d0, one), dot(d1, one), dot(d2, one), dot(d3, one));
}

// acc += w.x * V[r] + ... + w.w * V[r + 3] over the keys where ok: a key that does not take
// part contributes nothing, not 0 * (its value), which is NaN when a masked future value is.
fn tile_accumulate_plain(r: u32, w: vec4<f32>, ok: vec4<bool>) {
    if (all(ok)) {
        for (var c4 = 0u; c4 < D4; c4++) {
            acc[c4] += w.x * tile_v[r * D4 + c4] + w.y * tile_v[(r + 1u) * D4 + c4]
                + w.z * tile_v[(r + 2u) * D4 + c4] + w.w * tile_v[(r + 3u) * D4 + c4];
        }
    } else if (any(ok)) {
        for (var c4 = 0u; c4 < D4; c4++) {
            var a = acc[c4];
            if (ok.x) { a += w.x * tile_v[r * D4 + c4]; }
            if (ok.y) { a += w.y * tile_v[(r + 1u) * D4 + c4]; }
            if (ok.z) { a += w.z * tile_v[(r + 2u) * D4 + c4]; }
            if (ok.w) { a += w.w * tile_v[(r + 3u) * D4 + c4]; }
            acc[c4] = a;
        }
    }
}

// tile_dots, tile_accumulate and tile_rows_begin: the plain functions above, or on a device
// with subgroups the cooperative-load ones (shaders.rs `compose_for`).
#import tile_rows

// Folds the first `count` staged keys into this invocation's row; only keys r < visible
// (causal limit) whose bias is not ABSENT take part. Two sweeps per tile (scores and their
// maximum, then weights and values) so the accumulator is rescaled once per tile, not per key.
// Every invocation of the workgroup runs every iteration (count is uniform; a key that does not
// take part is masked, not skipped): the subgroup variant needs all lanes of a subgroup
// together. An invocation that sees no key keeps its state (weights 0, correction 1).
fn consume_tile(count: u32, visible: u32) {
    let n_keys = min(count, visible);
    let groups = (count + 3u) / 4u;
    var s: array<vec4<f32>, (BK + 3u) / 4u>;
    var tile_max = NEG_START;
    for (var g = 0u; g < groups; g++) {
        let r = g * 4u;
        let ok = keys_ok(r, n_keys);
        let bias = vec4<f32>(tile_bias[min(r, BK - 1u)], tile_bias[min(r + 1u, BK - 1u)],
                             tile_bias[min(r + 2u, BK - 1u)], tile_bias[min(r + 3u, BK - 1u)]);
        let masked = select(vec4<f32>(NEG_START), tile_dots(r, ok) + bias, ok);
        s[g] = masked;
        tile_max = max(tile_max, max(max(masked.x, masked.y), max(masked.z, masked.w)));
    }
    let new_max = max(run_max, tile_max);
    let correction = exp(run_max - new_max);
    run_sum *= correction;
    for (var c4 = 0u; c4 < D4; c4++) {
        acc[c4] *= correction;
    }
    run_max = new_max;
    // The keep test repeats the first sweep's instead of looking at s, so that a NaN score
    // (a NaN in q or k) poisons this row as it would in dense attention rather than vanishing.
    for (var g = 0u; g < groups; g++) {
        let r = g * 4u;
        let ok = keys_ok(r, n_keys);
        let w = select(vec4<f32>(0.0), exp(s[g] - new_max), ok);
        run_sum += w.x + w.y + w.z + w.w;
        tile_accumulate(r, w, ok);
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
