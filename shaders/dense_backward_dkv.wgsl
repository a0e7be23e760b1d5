// Dense backward, dK and dV (FlashAttention-2's outer loop over keys): one workgroup per tile
// of up to WG keys of one K/V head, one invocation per key t (k_t, v_t and its sums in
// registers). The workgroup walks the queries that see the tile, query tiles of BK staged in
// workgroup memory (`backward_queries.wgsl`) and shared by all its keys: every query head of the
// K/V head's group in head order, each over the dispatch's query chunk. With P recomputed from
// the saved LSE, P_it = exp(q_i . k_t / sqrt(d) - LSE_i) and dS_it = P_it (dO_i . v_t - D_i):
// dV_t = sum_i P_it dO_i, dK_t = sum_i dS_it q_i / sqrt(d). Causal (bottom-right aligned):
// queries i >= t + n - n_kv only. No atomics: each key's sums run in one invocation in a fixed
// order, so two runs give the same bits.
// Query chunks: llvmpipe stops an invocation's loops after 65535 iterations in all, so a long
// walk (kv_group * n queries) runs as several dispatches over [chunk_lo, chunk_hi) of each
// head's queries (`plan::DenseBackwardPlan::query_chunks`), in order; the first writes the sums,
// every later one adds its own to what the previous left in dk, dv. A head split across bindings
// (`plan::DenseBackwardSplitPlan`) binds one key chunk's rows against one query chunk's: its
// later query chunks set `accumulate` and add as a later part does.
// CPU mirror: the dK, dV sums of `cpu::dense_backward`.

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
@group(0) @binding(6) var<storage, read_write> dk: array<f32>;     // (bh / kv_group, n_kv, d)
@group(0) @binding(7) var<storage, read_write> dv: array<f32>;     // (bh / kv_group, n_kv, d)

#import backward_queries

var<private> k_row: array<vec4<f32>, D4>;   // pre-scaled by 1/sqrt(d)
var<private> v_row: array<vec4<f32>, D4>;
var<private> dk_acc: array<vec4<f32>, D4>;
var<private> dv_acc: array<vec4<f32>, D4>;

// consume_queries (and tile_rows_begin): the sweep of backward_dkv_fine.wgsl, query by query
// with plain workgroup-memory loads, or with subgroups four queries at a time.
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
    let wid = linear_workgroup(wg);
    if (wid >= params.total_workgroups) {
        return;
    }
    let d = params.d;
    let causal = params.causal != 0u;
    // Key tiles of each K/V head: tiles_per_block = ceil(n_kv / WG) (varlen: each sequence's own).
    let at = locate(wid, params.tiles_per_block, sec_tile(), query_heads() / params.kv_group);
    if (at.x == 0xffffffffu) {
        return; // uniform over the workgroup
    }
    let kv_h = at.x;
    // The problem of the group's first query head: its K/V rows are this K/V head's.
    let kpr = problem(kv_h * params.kv_group, at.y);
    let n = kpr.n;
    let n_kv = kpr.n_kv;
    let varlen = params.seqs > 0u;
    var tile = at.z;
    if (causal && !varlen) {
        tile = causal_order(at.z, params.tiles_per_block);
    }
    let t0 = tile * WG;
    let t = t0 + lid;
    let in_tile = t < n_kv;
    let head = kpr.kv_row * d;
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

    // This dispatch's queries that see the tile: causal, none before the first reader of its
    // first key, and each key only its own readers (masked per invocation: `first`).
    var first = 0u;
    var i_lo = params.chunk_lo;
    if (causal) {
        first = first_reader(t, n, n_kv);
        i_lo = max(i_lo, first_reader(t0, n, n_kv));
    }
    var i_hi = min(params.chunk_hi, n);
    if (WINDOW) {
        // The queries whose windows hold this key (per invocation: first, win_q_end) and
        // those of the tile's keys (the walk).
        let shift = i32(n_kv) - i32(n);
        let mine = window_queries(t, shift, n);
        first = max(first, mine.x);
        win_q_end = mine.y;
        i_lo = max(i_lo, window_queries(t0, shift, n).x);
        let t_last = min(t0 + WG, n_kv) - 1u;
        i_hi = min(i_hi, window_queries(t_last, shift, n).y);
    }
    for (var bh = kv_h * params.kv_group; bh < (kv_h + 1u) * params.kv_group; bh++) {
        let q_row = problem(bh, at.y).q_row;
        for (var i0 = i_lo; i0 < i_hi; i0 += BK) {
            let count = min(BK, i_hi - i0);
            workgroupBarrier();
            stage_queries(q_row, i0, count, lid);
            workgroupBarrier();
            consume_queries(i0, count, first);
        }
    }

    // The first chunk writes, later ones add to the previous chunks' sums (each its own
    // partial times 1/sqrt(d): the same additions in the same order on every run).
    if (in_tile) {
        // A later query part, or a split head's later query chunk (`accumulate`).
        let resume = params.chunk_lo > 0u || params.accumulate != 0u;
        for (var c4 = 0u; c4 < D4; c4++) {
            let gk = dk_acc[c4] * params.scale;
            let gv = dv_acc[c4];
            for (var e = 0u; e < 4u; e++) {
                let c = c4 * 4u + e;
                if (c < d) {
                    let at_c = head + t * d + c;
                    var pk = 0.0;
                    var pv = 0.0;
                    if (resume) {
                        pk = dk[at_c];
                        pv = dv[at_c];
                    }
                    dk[at_c] = pk + gk[e];
                    dv[at_c] = pv + gv[e];
                }
            }
        }
    }
}
