// The tiled online softmax shared by the attention passes: one invocation owns QR query rows
// (`compose_for` prepends QR: 1 for FMA's fine pass, more for dense attention, so that each
// staged key and value element is read once per QR rows; docs/perf.md, change 8), each with
// its q, running max, running sum and weighted value sum in registers; keys and values arrive in
// tiles of BK rows staged in workgroup memory (`key_tiles.wgsl`) by the whole workgroup
// (`near_field.wgsl` attends fine keys, `far_field.wgsl` coarse ones), so no score matrix ever
// reaches device memory.
// CPU mirror: `cpu::softmax_row`.
// Needs from the importer: consts D4 (= ceil(d / 4)), BK, WG; params; key_tiles; bindings q,
// out, lse.

// Row rho's elements at rho * D4 + c4.
var<private> q_row: array<vec4<f32>, QR * D4>;
var<private> acc: array<vec4<f32>, QR * D4>;
var<private> run_max: array<f32, QR>;
var<private> run_sum: array<f32, QR>;

// Loads query row `i` of head `head` (element offset) as this invocation's row `rho`,
// pre-scaled by 1/sqrt(d), and resets its running state. Call in uniform control flow (the
// subgroup variant counts its lanes).
fn begin_row_of(rho: u32, head: u32, i: u32, in_tile: bool) {
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
        q_row[rho * D4 + c4] = x * params.scale;
        acc[rho * D4 + c4] = vec4<f32>(0.0);
    }
    run_max[rho] = ABSENT;
    run_sum[rho] = 0.0;
    tile_rows_begin();
}

// begin_row_of row 0 (the passes with QR = 1).
fn begin_row(head: u32, i: u32, in_tile: bool) {
    begin_row_of(0u, head, i, in_tile);
}

// A visibility limit of `count` for every row (consume_tile's argument when no key is masked).
fn all_visible(count: u32) -> array<u32, QR> {
    var v: array<u32, QR>;
    for (var rho = 0u; rho < QR; rho++) {
        v[rho] = count;
    }
    return v;
}

// Whether staged key r (of a tile of `count` keys, of which keys r < n_keys are visible) takes
// part: visible and not ABSENT. Rows from count on are stale: never read for r >= n_keys.
fn key_ok(r: u32, n_keys: u32) -> bool {
    return r < n_keys && tile_bias[min(r, BK - 1u)] > ABSENT * 0.5;
}

// consume_tile (and tile_rows_begin, called by begin_row): one key at a time with plain
// workgroup-memory loads, or on a device with subgroups four keys at a time with the tile rows
// shared by subgroup broadcasts (shaders.rs `compose_for`).
#import tile_rows

// Writes o_i = acc / Z and LSE_i = M + ln Z of this invocation's row `rho`.
fn finish_row_of(rho: u32, head: u32, row: u32, i: u32) {
    let d = params.d;
    let inv = 1.0 / run_sum[rho];
    for (var c4 = 0u; c4 < D4; c4++) {
        let x = acc[rho * D4 + c4] * inv;
        for (var e = 0u; e < 4u; e++) {
            let c = c4 * 4u + e;
            if (c < d) {
                out[head + i * d + c] = x[e];
            }
        }
    }
    lse[row] = run_max[rho] + log(run_sum[rho]);
}

// finish_row_of row 0 (the passes with QR = 1).
fn finish_row(head: u32, row: u32, i: u32) {
    finish_row_of(0u, head, row, i);
}
