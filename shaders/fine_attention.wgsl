// Fused fine-query FMA (algorithm.md §3, §5): one workgroup = one tile of up to WG queries of
// one fine block a0 (all of whose queries share one gather list); one softmax, computed online,
// over the near-field fine keys and every level's far-list coarse keys. Writes O and the LSE.
// With coarse queries (params.coarse_queries, algorithm.md §6) it does the near field only:
// coarse_attention and upsample_merge add the levels. CPU mirror: `cpu::fma_forward`.

#import params
#import geometry
#import sequences

@group(0) @binding(1) var<storage, read> q: array<f32>;            // (bh, n, d)
@group(0) @binding(2) var<storage, read> k: array<f32>;            // (bh / kv_group, n, d)
@group(0) @binding(3) var<storage, read> v: array<f32>;            // (bh / kv_group, n, d)
@group(0) @binding(4) var<storage, read> coarse_k: array<f32>;     // (bh / kv_group, coarse_rows, d)
@group(0) @binding(5) var<storage, read> coarse_v: array<f32>;     // (bh / kv_group, coarse_rows, d)
@group(0) @binding(6) var<storage, read_write> out: array<f32>;    // (bh, n, d)
@group(0) @binding(7) var<storage, read_write> lse: array<f32>;    // (bh, n)

#import key_tiles
#import online_softmax
#import near_field
#import far_field

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let wid = linear_workgroup(wg);
    if (wid >= params.total_workgroups) {
        return;
    }
    let m = params.m;
    let cols = params.grid_w;
    // The query blocks (fine blocks; 2D: fine cells) of the chunk [chunk_lo, chunk_hi) (all of
    // them unless split), or of each sequence of a variable-length batch (sequences.wgsl).
    let blocks = chunk_blocks(params.chunk_lo, params.chunk_hi, m, cols);
    let tiles = blocks.y * params.tiles_per_block;
    let at = locate(wid, tiles, sec_tile(), query_heads());
    if (at.x == 0xffffffffu) {
        return; // uniform over the workgroup
    }
    let pr = problem(at.x, at.y);
    let n = pr.n;
    let tile = at.z;
    let a0 = blocks.x + tile / params.tiles_per_block;
    // Queries q0 .. q1 of the block (1D: tokens block start + q), this invocation's q0 + lid.
    let q0 = (tile % params.tiles_per_block) * WG;
    let q1 = min(q0 + WG, block_size(n, m, cols, a0));
    let i = block_token(n, m, cols, a0, q0 + lid);
    let in_tile = q0 + lid < q1;
    // One past the tile's last query (1D: its causal key limit).
    let i1 = block_token(n, m, cols, a0, q1 - 1u) + 1u;
    // Element offset of row 0 of this head in the bound tensors. A split head's bindings start
    // at global row row_base (batch_heads = 1), making this (-row_base d) mod 2^32: u32
    // arithmetic wraps in WGSL, so head + t d still lands on bound row t - row_base.
    let head = (pr.q_row - params.row_base) * params.d;
    // The K/V head this query head reads (grouped-query attention), offset alike.
    let kv_head = (pr.kv_row - params.row_base) * params.d;
    let causal = params.causal != 0u;

    begin_row(head, i, in_tile);
    // Its query row (`//#rows(serial, total)`: the counting variant of the tests only,
    // `shaders::compose_counting`; elsewhere a comment). The keys: key_tiles, coarse_tiles.
    //#rows(select(0u, 1u, in_tile), select(0u, 1u, in_tile))
    begin_sink(pr);

    // Level 0, the near field; causal: the tile's keys stop at its last query (the mask in
    // attend_fine_keys does the rest per row).
    for (var run = 0u; run < near_runs(n, m, cols, a0); run++) {
        let near = near_run(n, m, cols, a0, causal, run);
        var lo = near.x;
        var hi = select(near.y, i1, causal);
        if (WINDOW) {
            // The tile's keys: from its first query's window start to its last one's end
            // (FMA's window lies inside the near field: FmaConfig::validate).
            let first = block_token(n, m, cols, a0, q0);
            lo = max(lo, window_keys(i32(first), n).x);
            hi = min(hi, window_keys(i32(i1 - 1u), n).y);
            hi = max(hi, lo);
        }
        attend_fine_keys(kv_head, lo, hi, i, n, causal, lid);
    }

    // Coarse levels (none with coarse queries, nor with a window: FMA's window is its near
    // field alone).
    var far_levels = select(params.num_levels, 0u, params.coarse_queries != 0u);
    if (WINDOW) {
        far_levels = 0u;
    }
    attend_far_field(pr, a0, causal, far_levels, lid);

    if (in_tile) {
        finish_row(head, pr.q_row + i - params.row_base, i);
    }
}
