// Key tiles of the dQ pass: fine keys/values or one level's coarse keys/values, staged in
// workgroup memory with each key's logit offset (the forward's tiles, `fine_attention.wgsl`).
// Needs from the importer: consts BK, D4, WG; bindings k, v, coarse_k, coarse_v.

// Logit offset of a key that does not exist (an empty sub-window). A sentinel, not -inf:
// WGSL implementations may assume finite floats.
const NO_KEY: f32 = -1e30;

var<workgroup> tile_k: array<vec4<f32>, BK * D4>;
var<workgroup> tile_v: array<vec4<f32>, BK * D4>;
var<workgroup> tile_bias: array<f32, BK>;

// Stages fine keys/values [start, start + count) of the head at element offset `head`
// (count <= BK), zero-padded to D4 vec4s per row; rows from count on keep stale data, which
// no consumer reads. Call in uniform control flow.
fn stage_fine_keys(head: u32, start: u32, count: u32, lid: u32) {
    let d = params.d;
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

// Stages coarse rows [row0, row0 + count) of level index `lvl`, with each key's logit offset:
// ln |S| under the count correction, NO_KEY for an empty sub-window.
fn stage_coarse_keys(bh: u32, lvl: u32, row0: u32, count: u32, lid: u32) {
    let d = params.d;
    let info = params.levels[lvl];
    let head = (bh * params.coarse_rows + info.row_offset) * d;
    // Only the rows the consumers read (r < count): a short tile costs what it holds.
    for (var idx = lid; idx < count * D4; idx += WG) {
        let r = idx / D4;
        let c4 = idx % D4;
        var kk = vec4<f32>(0.0);
        var vv = vec4<f32>(0.0);
        if (r < count) {
            let base = head + (row0 + r) * d;
            for (var e = 0u; e < 4u; e++) {
                let c = c4 * 4u + e;
                if (c < d) {
                    kk[e] = coarse_k[base + c];
                    vv[e] = coarse_v[base + c];
                }
            }
        }
        tile_k[idx] = kk;
        tile_v[idx] = vv;
    }
    for (var r = lid; r < count; r += WG) {
        var bias = NO_KEY;
        if (r < count) {
            let row = row0 + r;
            let size = sub_window_count(info.window, row / params.p, row % params.p);
            if (size > 0u) {
                bias = select(0.0, log(f32(size)), params.count_correction != 0u);
            }
        }
        tile_bias[r] = bias;
    }
}
