// Dense backward, dQ (FlashAttention-2's outer loop over queries): one workgroup per tile of up
// to WG query rows of one query head, one invocation per row i (q_i, dO_i, LSE_i, D_i and its
// dQ sum in registers); the workgroup walks the keys the tile sees in tiles of BK staged in
// workgroup memory (`key_tiles.wgsl`), shared by all its rows. With P recomputed from the saved
// LSE: dQ_i = sum_j P_ij (dO_i . v_j - D_i) k_j / sqrt(d). Causal (bottom-right aligned): keys
// j <= i + n_kv - n; a row with no key gets dQ = 0.
// Key chunks: the dispatch attends keys [key_lo, key_hi) (llvmpipe's loop limit, as the
// forward's `DensePlan::key_chunks`), chunks in order; the first writes dQ, every later one adds
// its partial to what the previous left. A head split across bindings
// (`plan::DenseBackwardSplitPlan`) binds one query chunk's rows against one key chunk's: its
// later key chunks set `accumulate` and add as a later part does.
// CPU mirror: the dQ sum of `cpu::dense_backward`.

#import params
#import geometry
#import sequences
#import dense_causal
#import variants

@group(0) @binding(1) var<storage, read> q: array<f32>;            // (bh, n, d)
@group(0) @binding(2) var<storage, read> k: array<f32>;            // (bh / kv_group, n_kv, d)
@group(0) @binding(3) var<storage, read> v: array<f32>;            // (bh / kv_group, n_kv, d)
@group(0) @binding(4) var<storage, read> dout: array<f32>;         // (bh, n, d)
@group(0) @binding(5) var<storage, read> stats: array<f32>;        // (bh, n, 2): LSE, D
@group(0) @binding(6) var<storage, read_write> dq: array<f32>;     // (bh, n, d)

#import key_tiles

var<private> q_row: array<vec4<f32>, D4>;   // pre-scaled by 1/sqrt(d)
var<private> do_row: array<vec4<f32>, D4>;
var<private> dq_acc: array<vec4<f32>, D4>;
var<private> row_lse: f32;
var<private> row_delta: f32;

// consume_keys (and tile_rows_begin): the sweep of backward_dq.wgsl, key by key with plain
// workgroup-memory loads, or with subgroups four keys at a time.
#import dq_rows

// Folds the first min(count, visible) staged keys into this row's dQ, key by key. The plain
// variant's consume_keys, and the subgroup variant's for a subgroup that is not full.
fn consume_keys_plain(count: u32, visible: u32) {
    let n_keys = min(count, visible);
    for (var r = 0u; r < n_keys; r++) {
        if (!WINDOW || r >= win_first) {
            var s4 = vec4<f32>(0.0);
            var g4 = vec4<f32>(0.0);
            for (var c4 = 0u; c4 < D4; c4++) {
                s4 += q_row[c4] * tile_k[r * D4 + c4];
                g4 += do_row[c4] * tile_v[r * D4 + c4];
            }
            // Softcap: P from the capped logit, dS through the cap's slope.
            let raw = s4.x + s4.y + s4.z + s4.w;
            let pr = exp(capped(raw) - row_lse);
            let ds = pr * (g4.x + g4.y + g4.z + g4.w - row_delta) * cap_slope(raw);
            for (var c4 = 0u; c4 < D4; c4++) {
                dq_acc[c4] += ds * tile_k[r * D4 + c4];
            }
        }
    }
}

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let wid = linear_workgroup(wg);
    if (wid >= params.total_workgroups) {
        return;
    }
    let d = params.d;
    let causal = params.causal != 0u;
    // Query tiles of each query head: tiles_per_block = ceil(n / WG) (varlen: each sequence's).
    let at = locate(wid, params.tiles_per_block, sec_tile(), query_heads());
    if (at.x == 0xffffffffu) {
        return; // uniform over the workgroup
    }
    let pr = problem(at.x, at.y);
    let n = pr.n;
    let n_kv = pr.n_kv;
    let varlen = params.seqs > 0u;
    var tile = at.z;
    if (causal && !varlen) {
        tile = causal_order(at.z, params.tiles_per_block);
    }
    let i0 = tile * WG;
    let i = i0 + lid;
    let in_tile = i < n;
    let i1 = min(i0 + WG, n);
    // Keys the tile sees over all chunks: [0, t_end); those of this dispatch: up to key_hi.
    var t_end = n_kv;
    if (causal) {
        t_end = visible_keys(i1 - 1u, n, n_kv);
    }
    // A later key part, or a split head's later key chunk (`accumulate`): add to dQ.
    let resume = params.key_lo > 0u || params.accumulate != 0u;
    if (resume && params.key_lo >= t_end) {
        return; // nothing to add to the earlier chunks' dQ; uniform over the workgroup
    }
    var t_lo = params.key_lo;
    var t_hi = min(t_end, params.key_hi);
    let row_keys = select(n_kv, visible_keys(i, n, n_kv), causal);
    // The window: the tile's keys from its first row's window start to its last row's end.
    let shift = i32(n_kv) - i32(n);
    let band = window_keys(i32(i) + shift, n_kv);
    if (WINDOW) {
        let band_lo = window_keys(i32(i0) + shift, n_kv).x;
        let band_hi = window_keys(i32(i1) - 1 + shift, n_kv).y;
        if (resume && (params.key_lo >= band_hi || params.key_hi <= band_lo)) {
            return; // nothing of this key chunk in the tile's windows; uniform
        }
        t_lo = max(t_lo, band_lo);
        t_hi = max(min(t_hi, band_hi), t_lo);
    }
    let head = pr.q_row * d;
    let k_head = pr.kv_row * d;
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
    row_lse = 0.0;
    row_delta = 0.0;
    if (in_tile) {
        row_lse = stats[2u * (pr.q_row + i)];
        row_delta = stats[2u * (pr.q_row + i) + 1u];
    }

    for (var t0 = t_lo; t0 < t_hi; t0 += BK) {
        let count = min(BK, t_hi - t0);
        workgroupBarrier();
        stage_fine_tile(k_head, t0, count, lid);
        workgroupBarrier();
        // Keys of the tile this row sees (causal: below row_keys; past rows see none).
        var visible = select(0u, row_keys - t0, row_keys > t0 && in_tile);
        if (WINDOW) {
            visible = window_tile(band, t0, visible);
        }
        consume_keys(count, visible);
    }

    if (in_tile) {
        for (var c4 = 0u; c4 < D4; c4++) {
            let x = dq_acc[c4] * params.scale;
            for (var e = 0u; e < 4u; e++) {
                let c = c4 * 4u + e;
                if (c < d) {
                    let at_c = head + i * d + c;
                    var prev = 0.0;
                    if (resume) {
                        prev = dq[at_c];
                    }
                    dq[at_c] = prev + x[e];
                }
            }
        }
    }
}
