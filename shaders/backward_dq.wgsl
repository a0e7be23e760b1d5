// Backward, dQ of fine queries (algorithm.md §8; with coarse queries the near field's share): the forward's workgroup (a tile of up to WG
// queries of one fine block a0, sharing one gather list) walks the same key tiles (near-field
// fine keys, then every level's far-list coarse keys) and, with P recomputed from the saved
// LSE, accumulates dQ_i = sum_j P_ij (dO_i . v_j - D_i) k_j / sqrt(d) in registers.
// 1D and 2D through the geometry interface (geometry.wgsl, geometry_grid.wgsl).
// CPU mirror: the dQ sum in `cpu::backward::fma_backward`.

#import params
#import geometry
#import level_select
#import problems
#import variants

@group(0) @binding(1) var<storage, read> q: array<f32>;            // (bh, n, d)
@group(0) @binding(2) var<storage, read> k: array<f32>;            // (bh / kv_group, n, d)
@group(0) @binding(3) var<storage, read> v: array<f32>;            // (bh / kv_group, n, d)
@group(0) @binding(4) var<storage, read> coarse_k: array<f32>;     // (bh / kv_group, coarse_rows, d)
@group(0) @binding(5) var<storage, read> coarse_v: array<f32>;     // (bh / kv_group, coarse_rows, d)
@group(0) @binding(6) var<storage, read> dout: array<f32>;         // (bh, n, d)
// (bh, n, 2): LSE, D as f32 bits (u32 here so the table words after them are read exactly).
@group(0) @binding(7) var<storage, read> stats: array<u32>;
@group(0) @binding(8) var<storage, read_write> dq: array<f32>;     // (bh, n, d)

// A variable-length batch's sequence table: copied after the stats (all 8 storage bindings
// of WebGPU's default limit are taken).
fn seq_word(i: u32) -> u32 {
    return stats[params.table_at + i];
}

#import key_tiles
#import coarse_tiles

var<private> q_row: array<vec4<f32>, D4>;   // pre-scaled by 1/sqrt(d)
var<private> do_row: array<vec4<f32>, D4>;
var<private> dq_acc: array<vec4<f32>, D4>;
var<private> row_lse: f32;
var<private> row_delta: f32;

// consume_keys (and tile_rows_begin): key by key with plain workgroup-memory loads, or on a
// device with subgroups four keys at a time with the tile rows shared by subgroup broadcasts
// (shaders.rs `compose_for`).
#import dq_rows

// Folds the first min(count, visible) staged keys into this row's dQ, key by key. The plain
// variant's consume_keys, and the subgroup variant's for a subgroup that is not full.
fn consume_keys_plain(count: u32, visible: u32) {
    let n_keys = min(count, visible);
    for (var r = 0u; r < n_keys; r++) {
        let bias = tile_bias[r];
        if (bias > ABSENT * 0.5 && (!WINDOW || r >= win_first)) {
            var s4 = vec4<f32>(0.0);
            var g4 = vec4<f32>(0.0);
            for (var c4 = 0u; c4 < D4; c4++) {
                s4 += q_row[c4] * tile_k[r * D4 + c4];
                g4 += do_row[c4] * tile_v[r * D4 + c4];
            }
            // Softcap: the cap before the count correction (bias), dS through its slope.
            let raw = s4.x + s4.y + s4.z + s4.w;
            let s = capped(raw) + bias;
            let pr = exp(s - row_lse);
            let ds = pr * (g4.x + g4.y + g4.z + g4.w - row_delta) * cap_slope(raw);
            for (var c4 = 0u; c4 < D4; c4++) {
                dq_acc[c4] += ds * tile_k[r * D4 + c4];
            }
        }
    }
}

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let wid = dispatch_workgroup(wg);
    let m = params.m;
    let d = params.d;
    let cols = params.grid_w;
    // The forward's tiles: the query blocks (fine blocks; 2D: fine cells) of every query
    // head's sequence, or of each sequence of a variable-length batch (problems.wgsl).
    let tiles = chunk_blocks(0u, params.n, m, cols).y * params.tiles_per_block;
    let at = locate(wid, tiles, sec_tile(), query_heads());
    if (at.x == 0xffffffffu) {
        return; // uniform over the workgroup
    }
    let pr = problem(at.x, at.y);
    let n = pr.n;
    let tile = at.z;
    let a0 = tile / params.tiles_per_block;
    // Queries q0 .. q1 of the block (1D: tokens block start + q), this invocation's q0 + lid.
    let q0 = (tile % params.tiles_per_block) * WG;
    let q1 = min(q0 + WG, block_size(n, m, cols, a0));
    let i = block_token(n, m, cols, a0, q0 + lid);
    let in_tile = q0 + lid < q1;
    // One past the tile's last query (1D: its causal key limit).
    let i1 = block_token(n, m, cols, a0, q1 - 1u) + 1u;
    let head = pr.q_row * d;
    // The K/V head this query head reads (grouped-query attention).
    let kv_head = pr.kv_row * d;
    let causal = params.causal != 0u;
    tile_rows_begin();

    for (var c4 = 0u; c4 < D4; c4++) {
        var x = vec4<f32>(0.0);
        var g = vec4<f32>(0.0);
        if (in_tile) {
            for (var e = 0u; e < 4u; e++) {
                let c = c4 * 4u + e;
                if (c < d) {
                    x[e] = q[head + i * d + c];
                    g[e] = dout[head + i * d + c];
                }
            }
        }
        q_row[c4] = x * params.scale;
        do_row[c4] = g;
        dq_acc[c4] = vec4<f32>(0.0);
    }
    // Its q and dO rows (`//#rows`: the counting variant of the tests only,
    // `shaders::compose_counting`). The keys: key_tiles, coarse_tiles.
    //#rows(select(0u, 2u, in_tile), select(0u, 2u, in_tile))
    row_lse = 0.0;
    row_delta = 0.0;
    if (in_tile) {
        row_lse = bitcast<f32>(stats[2u * (pr.q_row + i)]);
        row_delta = bitcast<f32>(stats[2u * (pr.q_row + i) + 1u]);
    }

    // Level 0, the forward's near field (causal: up to the tile's last query, then per row).
    for (var run = 0u; run < near_runs(n, m, cols, a0); run++) {
        let near = near_run(n, m, cols, a0, causal, run);
        let t_hi = select(near.y, i1, causal);
        for (var t0 = near.x; t0 < t_hi; t0 += BK) {
            let count = min(BK, t_hi - t0);
            workgroupBarrier();
            stage_fine_tile(kv_head, t0, count, lid);
            workgroupBarrier();
            var visible = count;
            if (causal) {
                visible = select(0u, i - t0 + 1u, i >= t0);
            }
            if (WINDOW) {
                visible = window_tile(window_keys(i32(i), n), t0, visible);
            }
            consume_keys(count, visible);
        }
    }

    // Coarse levels, the forward's far lists gathered into one sequence as the forward's
    // (coarse_tiles.wgsl). With coarse queries the far field met the pooled queries, not q_i:
    // its share of dQ comes through dQ~ (backward_coarse_dq.wgsl, then
    // downsample_backward.wgsl), so this pass does the near field only, as the forward's.
    let far_levels = select(params.num_levels, 0u, params.coarse_queries != 0u);
    let total = far_total(pr, a0, causal, far_levels);
    for (var g0 = 0u; g0 < total; g0 += BK) {
        let count = min(BK, total - g0);
        workgroupBarrier();
        stage_far_gathered(pr, a0, causal, g0, count, lid);
        workgroupBarrier();
        win_first = 0u; // (no far field under a window: the plan has no level)
        consume_keys(count, count);
    }

    if (in_tile) {
        for (var c4 = 0u; c4 < D4; c4++) {
            let x = dq_acc[c4] * params.scale;
            for (var e = 0u; e < 4u; e++) {
                let c = c4 * 4u + e;
                if (c < d) {
                    dq[head + i * d + c] = x[e];
                }
            }
        }
    }
}
