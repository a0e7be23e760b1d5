// Staging of consecutive coarse rows of one level into the key tiles (`key_tiles.wgsl`), for
// the dQ pass, which walks the far lists run by run. (The forward gathers every level's far
// list into one sequence instead: `far_field.wgsl`.)
// CPU mirror: the `SeenKey::Coarse` keys of `cpu::gather::seen_keys`.
// Needs from the importer: key_tiles, geometry, problems; bindings coarse_k, coarse_v.

// Stages coarse rows [row0, row0 + count) of level index `lvl` (level l - 1), count <= BK,
// of problem pr's K/V head and sequence, with each key's logit offset (coarse_key_bias).
// Call in uniform control flow.
fn stage_coarse_tile(pr: Problem, lvl: u32, row0: u32, count: u32, lid: u32) {
    let d = params.d;
    let info = params.levels[lvl];
    let head = coarse_row(pr.kv_crow, lvl, pr.s, 0u) * d;
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
        let row = row0 + r;
        tile_bias[r] = coarse_key_bias(
            row_count(pr.n, info.window, params.p, params.grid_w, row));
    }
}
