// Backward, dK and dV of the fine keys' near-field use (algorithm.md §8), by gather: one
// workgroup = a tile of up to WG keys of one fine block b; it walks the queries that read
// block b at level 0 (`near_query_run` in geometry.wgsl, 2D: the 3 x 3 cells around b in
// geometry_grid.wgsl; causal: only queries i >= t),
// staged BK at a time, and with P recomputed from the saved LSE accumulates in registers
// dK_t = sum_i P_it (dO_i . v_t - D_i) q_i / sqrt(d) and dV_t = sum_i P_it dO_i.
// No float atomics, no scatter: each key's sums run in one invocation in a fixed order.
// CPU mirror: the `Slot::Fine` sums in `cpu::backward::fma_backward`.

#import params
#import geometry
#import level_select
#import sequences
#import variants

@group(0) @binding(1) var<storage, read> q: array<f32>;            // (bh, n, d)
@group(0) @binding(2) var<storage, read> k: array<f32>;            // (bh / kv_group, n, d)
@group(0) @binding(3) var<storage, read> v: array<f32>;            // (bh / kv_group, n, d)
@group(0) @binding(4) var<storage, read> dout: array<f32>;         // (bh, n, d)
@group(0) @binding(5) var<storage, read> stats: array<f32>;        // (bh, n, 2): LSE, D
@group(0) @binding(6) var<storage, read_write> dk: array<f32>;     // (bh / kv_group, n, d)
@group(0) @binding(7) var<storage, read_write> dv: array<f32>;     // (bh / kv_group, n, d)

#import backward_queries

var<private> k_row: array<vec4<f32>, D4>;   // pre-scaled by 1/sqrt(d)
var<private> v_row: array<vec4<f32>, D4>;
var<private> dk_acc: array<vec4<f32>, D4>;
var<private> dv_acc: array<vec4<f32>, D4>;

// consume_queries (and tile_rows_begin): query by query with plain workgroup-memory loads, or
// on a device with subgroups four queries at a time with the tile rows shared by subgroup
// broadcasts (shaders.rs `compose_for`).
#import dkv_rows

// Folds staged queries r < count whose position start + r is >= `first` into this key's sums,
// query by query. The plain variant's consume_queries, and the subgroup variant's for a
// subgroup that is not full.
fn consume_queries_plain(start: u32, count: u32, first: u32) {
    for (var r = 0u; r < count; r++) {
        if (start + r >= first && (!WINDOW || start + r < win_q_end)) {
            var s4 = vec4<f32>(0.0);
            var g4 = vec4<f32>(0.0);
            for (var c4 = 0u; c4 < D4; c4++) {
                s4 += tile_q[r * D4 + c4] * k_row[c4];
                g4 += tile_do[r * D4 + c4] * v_row[c4];
            }
            // Softcap: P from the capped logit, dS through the cap's slope.
            let raw = s4.x + s4.y + s4.z + s4.w;
            let pr = exp(capped(raw) - tile_lse[r]);
            let ds = pr * (g4.x + g4.y + g4.z + g4.w - tile_delta[r]) * cap_slope(raw);
            for (var c4 = 0u; c4 < D4; c4++) {
                dk_acc[c4] += ds * tile_q[r * D4 + c4];
                dv_acc[c4] += pr * tile_do[r * D4 + c4];
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
    // One workgroup per tile of a K/V head's keys: the key blocks (fine blocks; 2D: fine
    // cells) of its sequence, or of each sequence of a variable-length batch (problems.wgsl);
    // grouped-query heads sum the gradients of the kv_group query heads that read it, in head
    // order (deterministic, no atomics).
    let tiles = chunk_blocks(0u, params.n, m, cols).y * params.tiles_per_block;
    let at = locate(wid, tiles, sec_tile(), query_heads() / params.kv_group);
    if (at.x == 0xffffffffu) {
        return; // uniform over the workgroup
    }
    let kv_h = at.x;
    // Problem of the group's first query head: its K/V rows are this K/V head's.
    let kpr = problem(kv_h * params.kv_group, at.y);
    let n = kpr.n;
    let tile = at.z;
    let b = tile / params.tiles_per_block;
    // Keys q0 .. q1 of the block (1D: tokens block start + q), this invocation's q0 + lid.
    let q0 = (tile % params.tiles_per_block) * WG;
    let q1 = min(q0 + WG, block_size(n, m, cols, b));
    let t0 = block_token(n, m, cols, b, q0);
    let t = block_token(n, m, cols, b, q0 + lid);
    let in_tile = q0 + lid < q1;
    let head = kpr.kv_row * d;
    let causal = params.causal != 0u;
    tile_rows_begin();

    for (var c4 = 0u; c4 < D4; c4++) {
        var kk = vec4<f32>(0.0);
        var vv = vec4<f32>(0.0);
        if (in_tile) {
            for (var e = 0u; e < 4u; e++) {
                let c = c4 * 4u + e;
                if (c < d) {
                    kk[e] = k[head + t * d + c];
                    vv[e] = v[head + t * d + c];
                }
            }
        }
        k_row[c4] = kk * params.scale;
        v_row[c4] = vv;
        dk_acc[c4] = vec4<f32>(0.0);
        dv_acc[c4] = vec4<f32>(0.0);
    }

    // Its k and v rows (`//#rows`: the counting variant of the tests only,
    // `shaders::compose_counting`). The queries: backward_queries.
    //#rows(select(0u, 2u, in_tile), select(0u, 2u, in_tile))

    // Queries reading block b at level 0, run by run; causal (1D): from the tile's first key on
    // (a query before t0 sees none of these keys), and each key only queries i >= t.
    var first = select(0u, t, causal);
    if (WINDOW) {
        // The queries whose windows hold key t.
        let mine = window_queries(t, 0, n);
        first = max(first, mine.x);
        win_q_end = mine.y;
    }
    for (var bh = kv_h * params.kv_group; bh < (kv_h + 1u) * params.kv_group; bh++) {
        let q_row = problem(bh, at.y).q_row;
        for (var run = 0u; run < near_query_runs(n, m, cols, b); run++) {
            let readers = near_query_run(n, m, cols, b, causal, run);
            let i_lo = select(readers.x, t0, causal);
            for (var i0 = i_lo; i0 < readers.y; i0 += BK) {
                let count = min(BK, readers.y - i0);
                workgroupBarrier();
                stage_queries(q_row, i0, count, lid);
                workgroupBarrier();
                consume_queries(i0, count, first);
            }
        }
    }

    if (in_tile) {
        for (var c4 = 0u; c4 < D4; c4++) {
            let gk = dk_acc[c4] * params.scale;
            let gv = dv_acc[c4];
            for (var e = 0u; e < 4u; e++) {
                let c = c4 * 4u + e;
                if (c < d) {
                    dk[head + t * d + c] = gk[e];
                    dv[head + t * d + c] = gv[e];
                }
            }
        }
    }
}
