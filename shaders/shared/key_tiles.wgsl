// The key tiles of the attention passes and of the dQ pass: BK key and value rows staged in
// workgroup memory, each key with its logit offset, and the staging of fine keys into them.
// CPU mirror: none (a tile is a schedule; the keys are those of `cpu::gather::seen_keys`).
// Needs from the importer: consts BK, D4, WG; params; bindings k, v.

var<workgroup> tile_k: array<vec4<f32>, BK * D4>;
var<workgroup> tile_v: array<vec4<f32>, BK * D4>;
// Each staged key's logit offset: 0 for a fine key, coarse_key_bias (params.wgsl) for a coarse
// one, so ABSENT for an empty sub-window, which the consumers skip.
var<workgroup> tile_bias: array<f32, BK>;

// Stages fine keys/values [start, start + count) of the head at element offset `head`
// (count <= BK), zero-padded to D4 vec4s per row; rows from count on keep stale data, which
// no consumer reads. Call in uniform control flow.
fn stage_fine_tile(head: u32, start: u32, count: u32, lid: u32) {
    let d = params.d;
    // Every invocation walks the staged K and V rows; the workgroup reads each once.
    //#rows(2u * count, select(0u, 2u * count, lid == 0u))
    // Only the rows the consumers read (r < count): a short tile costs what it holds.
    for (var idx = lid; idx < count * D4; idx += WG) {
        let r = idx / D4;
        let c4 = idx % D4;
        var kk = vec4<f32>(0.0);
        var vv = vec4<f32>(0.0);
        if (r < count) {
            let base = head + (start + r) * d;
            for (var e = 0u; e < 4u; e++) {
                let c = c4 * 4u + e;
                if (c < d) {
                    kk[e] = k[base + c];
                    vv[e] = v[base + c];
                }
            }
        }
        tile_k[idx] = kk;
        tile_v[idx] = vv;
    }
    for (var r = lid; r < count; r += WG) {
        tile_bias[r] = 0.0;
    }
}
