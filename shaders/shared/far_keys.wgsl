// A fine block's far field as one sequence of coarse keys: every level's far-list coarse keys
// of block a0 (levels in order, each level's runs in order, rows in order), counted and
// indexed. Staged by `coarse_tiles.wgsl` (the rows kernel's tiles, the dQ pass) and by
// `fine_attention_tiled.wgsl` (its own tiles).
// CPU mirror: the `SeenKey::Coarse` keys of `cpu::gather::seen_keys`; far lists:
// `levels::far_list` (2D: `GridGeometry::far_cells`), through the geometry interface
// (level_group, level_far_run).
// Needs from the importer: params, geometry, problems or sequences.

// Coarse keys that fine block a0 sees over `levels` levels.
fn far_total(pr: Problem, a0: u32, causal: bool, levels: u32) -> u32 {
    let p = params.p;
    var total = 0u;
    for (var lvl = 0u; lvl < levels; lvl++) {
        let a = level_group(pr.n, params.m, params.grid_w, a0, lvl);
        for (var run = 0u; run < FAR_RUNS; run++) {
            let r = level_far_run(pr.n, params.m, params.grid_w, lvl, a, level_windows(pr, lvl),
                                  causal, run);
            total += (r.y - r.x) * p;
        }
    }
    return total;
}

// The g-th key of block a0's gathered far field: (level index, row within the level).
fn far_key(pr: Problem, a0: u32, causal: bool, g: u32) -> vec2<u32> {
    let p = params.p;
    var rest = g;
    for (var lvl = 0u; lvl < params.num_levels; lvl++) {
        let a = level_group(pr.n, params.m, params.grid_w, a0, lvl);
        for (var run = 0u; run < FAR_RUNS; run++) {
            let r = level_far_run(pr.n, params.m, params.grid_w, lvl, a, level_windows(pr, lvl),
                                  causal, run);
            let rows = (r.y - r.x) * p;
            if (rest < rows) {
                return vec2<u32>(lvl, r.x * p + rest);
            }
            rest -= rows;
        }
    }
    return vec2<u32>(0u, 0u); // not reached for g < far_total
}
