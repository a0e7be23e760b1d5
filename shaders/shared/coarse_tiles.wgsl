// A fine block's far field gathered into one sequence: every level's far-list coarse keys of
// block a0 (levels in order, each level's runs in order, rows in order), staged BK at a time
// into the key tiles (`key_tiles.wgsl`), so a tile is full although a run holds at most 2p
// keys. Used by the forward's far field (`far_field.wgsl`) and by the dQ pass.
// CPU mirror: the `SeenKey::Coarse` keys of `cpu::gather::seen_keys`; far lists:
// `levels::far_list` (2D: `GridGeometry::far_cells`), through the geometry interface
// (level_group, level_far_run).
// Needs from the importer: key_tiles, geometry, problems or sequences; bindings coarse_k,
// coarse_v. The gathered sequence itself (far_total, far_key): `far_keys.wgsl`.

#import far_keys

// Stages keys [g0, g0 + count) of block a0's gathered far field (count <= BK). Each invocation
// stages whole rows: it finds its row's level once (a walk over the levels) instead of once per
// element; the far field is a few dozen rows, so the lost load coalescing costs little.
fn stage_far_gathered(pr: Problem, a0: u32, causal: bool, g0: u32, count: u32, lid: u32) {
    let d = params.d;
    // Every invocation walks the staged k~ and v~ rows; the workgroup reads each once.
    //#rows(2u * count, select(0u, 2u * count, lid == 0u))
    for (var r = lid; r < count; r += WG) {
        let key = far_key(pr, a0, causal, g0 + r);
        let info = params.levels[key.x];
        let base = coarse_row(pr.kv_crow, key.x, pr.s, key.y) * d;
        for (var c4 = 0u; c4 < D4; c4++) {
            var kk = vec4<f32>(0.0);
            var vv = vec4<f32>(0.0);
            for (var e = 0u; e < 4u; e++) {
                let c = c4 * 4u + e;
                if (c < d) {
                    kk[e] = coarse_k[base + c];
                    vv[e] = coarse_v[base + c];
                }
            }
            tile_k[r * D4 + c4] = kk;
            tile_v[r * D4 + c4] = vv;
        }
        tile_bias[r] = coarse_key_bias(
            row_count(pr.n, info.window, params.p, params.grid_w, key.y));
    }
}

