// The tiled online softmax shared by the attention passes: one invocation owns one query row
// (q, running max, running sum, weighted value sum in registers); keys and values arrive in
// tiles of BK rows staged in workgroup memory (`key_tiles.wgsl`) by the whole workgroup
// (`near_field.wgsl` attends fine keys, `far_field.wgsl` coarse ones), so no score matrix ever
// reaches device memory.
// CPU mirror: `cpu::variants::softmax_row_sink`.
// Needs from the importer: consts D4 (= ceil(d / 4)), BK, WG; params; problems; key_tiles;
// bindings q, out, lse.

#import variants

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
    run_max = ABSENT;
    run_sum = 0.0;
    tile_rows_begin();
}

// Whether staged key r (of a tile of `count` keys, of which keys r < n_keys are visible) takes
// part: visible, in the row's window (variants.wgsl, win_first) and not ABSENT. Rows from
// count on are stale: never read for r >= n_keys.
fn key_ok(r: u32, n_keys: u32) -> bool {
    var ok = r < n_keys && tile_bias[min(r, BK - 1u)] > ABSENT * 0.5;
    if (WINDOW) {
        ok = ok && r >= win_first;
    }
    return ok;
}

// Starts the row's softmax with its sink term (SINKS): exp(S - S) = 1 in the sum and nothing
// in the values, so the sink joins the one softmax and the LSE like a key whose value is 0.
fn begin_sink(pr: Problem) {
    if (SINKS) {
        run_max = sink_logit(pr);
        run_sum = 1.0;
    }
}

// consume_tile (and tile_rows_begin, called by begin_row): one key at a time with plain
// workgroup-memory loads, or on a device with subgroups four keys at a time with the tile rows
// shared by subgroup broadcasts (shaders.rs `compose_for`).
#import tile_rows

// Writes o_i = acc / Z and LSE_i = M + ln Z; a row that attended no key (Z = 0: a causal query
// before the first key of a shorter K, dense attention only) gets O = 0 and LSE = -inf.
fn finish_row(head: u32, row: u32, i: u32) {
    let d = params.d;
    let empty = run_sum == 0.0;
    let inv = select(1.0 / run_sum, 0.0, empty);
    for (var c4 = 0u; c4 < D4; c4++) {
        let x = acc[c4] * inv;
        for (var e = 0u; e < 4u; e++) {
            let c = c4 * 4u + e;
            if (c < d) {
                out[head + i * d + c] = x[e];
            }
        }
    }
    if (empty) {
        lse[row] = neg_inf(); // a store, no arithmetic on it
    } else {
        lse[row] = run_max + log(run_sum);
    }
}
