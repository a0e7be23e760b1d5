// Exact dense attention, softmax(Q K^T / sqrt(d)) V, the yardstick for FMA: the same tiled
// online softmax as the FMA pass (one invocation per query row, keys in tiles of BK staged in
// workgroup memory), over every key (causal, bottom-right aligned: keys t <= i + n_kv - n, the
// queries being the last n of n_kv positions; with n_kv < n the first n - n_kv queries see no
// key and get O = 0, LSE = -inf; n_kv = n for self-attention). CPU mirror:
// `cpu::dense_attention`.

#import params
#import geometry
#import sequences

@group(0) @binding(1) var<storage, read> q: array<f32>;            // (bh, n, d)
@group(0) @binding(2) var<storage, read> k: array<f32>;            // (bh / kv_group, n_kv, d)
@group(0) @binding(3) var<storage, read> v: array<f32>;            // (bh / kv_group, n_kv, d)
@group(0) @binding(6) var<storage, read_write> out: array<f32>;    // (bh, n, d)
@group(0) @binding(7) var<storage, read_write> lse: array<f32>;    // (bh, n)

#import key_tiles
#import online_softmax

// Key chunks (`src/plan/dense.rs`, `src/plan/split_dense.rs`): a row's keys are attended at
// most `DENSE_KEYS_PER_DISPATCH` per dispatch, chunks in order, because llvmpipe stops an
// invocation's loops after 65535 iterations in all (perf.md, change 9); a head longer than one
// storage binding is attended a (query chunk, key chunk) pair at a time the same way. Every
// dispatch ends its rows as a finished partial result (O, LSE) over the keys so far; the next
// chunk resumes from it: acc = O, running max = LSE, running sum = 1 (the same state scaled by
// 1 / Z: softmax over the union of the chunks, by the log-sum-exp rule).

// Picks up row `row`'s partial (O, LSE) left by the previous key chunk (q as begin_row loads it).
fn resume_row(head: u32, row: u32, i: u32, in_tile: bool) {
    begin_row(head, i, in_tile);
    if (in_tile) {
        let d = params.d;
        for (var c4 = 0u; c4 < D4; c4++) {
            var x = vec4<f32>(0.0);
            for (var e = 0u; e < 4u; e++) {
                let c = c4 * 4u + e;
                if (c < d) {
                    x[e] = out[head + i * d + c];
                }
            }
            acc[c4] = x;
        }
        // A row with no key so far (LSE = -inf) resumes empty: no arithmetic on -inf.
        let empty = bitcast<u32>(lse[row]) == 0xff800000u;
        run_max = select(lse[row], ABSENT, empty);
        run_sum = select(1.0, 0.0, empty);
    }
}

// Attends keys [t_lo, t_hi) of the head at element offset `head` for query i; causal: keys t
// with t + n <= i + n_kv only (bottom-right; written so that no u32 goes below zero when
// n_kv < n). As `attend_fine_keys`, with the alignment of two lengths.
// WINDOW: keys in the row's window (bottom-right aligned as the causal mask) only.
fn attend_keys(head: u32, t_lo: u32, t_hi: u32, i: u32, n: u32, n_kv: u32, causal: bool, lid: u32) {
    // Keys t < lim - n are visible, lim = i + 1 + n_kv (none when lim <= n).
    let lim = i + 1u + n_kv;
    let band = window_keys(i32(i) + i32(n_kv) - i32(n), n_kv);
    for (var t0 = t_lo; t0 < t_hi; t0 += BK) {
        let count = min(BK, t_hi - t0);
        workgroupBarrier();
        stage_fine_tile(head, t0, count, lid);
        workgroupBarrier();
        var visible = count;
        if (causal) {
            visible = select(0u, lim - n - t0, lim > n + t0);
        }
        if (WINDOW) {
            visible = window_tile(band, t0, visible);
        }
        consume_tile(count, visible);
    }
}

// The query tile workgroup z of a problem's `tiles` runs: causal, in the order 0, T-1, 1, T-2,
// ... (a bijection of [0, T)), so that any contiguous run of workgroups mixes short tiles
// (early rows, few keys) with long ones. Why: llvmpipe hands each of its threads one contiguous
// share of a dispatch's workgroups, so in tile order the thread with the last tiles held 3/4
// of the causal work and capped the causal speed-up at 4/3 (perf.md, issue 18's measurements).
// Each tile computes what it did before: the same bits in any order.
fn causal_tile(z: u32, tiles: u32) -> u32 {
    if (z % 2u == 0u) {
        return z / 2u;
    }
    return tiles - 1u - z / 2u;
}

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let wid = linear_workgroup(wg);
    if (wid >= params.total_workgroups) {
        return;
    }
    // Query tiles of each problem: tiles_per_block of the sequence (or of a split head's query
    // chunk), or each sequence's own (varlen, sequences.wgsl).
    let at = locate(wid, params.tiles_per_block, sec_tile(), query_heads());
    if (at.x == 0xffffffffu) {
        return; // uniform over the workgroup
    }
    let pr = problem(at.x, at.y);
    let n = pr.n;
    // A sequence of a variable-length batch attends to itself: its n_kv keys (n, or a length
    // of their own), in the dispatch's key chunk [key_lo, key_hi) of the longest sequence's
    // keys (a shorter one's rows are finished by an earlier chunk and return below).
    let varlen = params.seqs > 0u;
    let n_kv = pr.n_kv;
    let key_hi = select(params.key_hi, min(params.key_hi, n_kv), varlen);
    // A batch of equal sequences (or a split head's query chunk) has tiles_per_block tiles each.
    var tile = at.z;
    if (params.causal != 0u && !varlen) {
        tile = causal_tile(at.z, params.tiles_per_block);
    }
    let i0 = params.chunk_lo + tile * WG;
    let i1 = min(i0 + WG, select(params.chunk_hi, n, varlen));
    let i = i0 + lid;
    let in_tile = i < i1;
    let causal = params.causal != 0u;
    // Keys this tile attends to over all chunks: [0, t_end); causal, query i sits at key
    // position i + n_kv - n (t_end = 0 when every row of the tile is before the first key).
    let t_end = select(n_kv, max(i1 + n_kv, n) - n, causal);
    // The window: the tile's keys run from its first row's window start (band.x) to its last
    // row's window end; tiles outside the band are never staged, so a row costs O(L + R).
    var t_start = params.key_lo;
    var t_stop = min(t_end, key_hi);
    if (WINDOW) {
        let shift = i32(n_kv) - i32(n);
        let band_lo = window_keys(i32(i0) + shift, n_kv).x;
        let band_hi = window_keys(i32(i1) - 1 + shift, n_kv).y;
        if (params.key_lo > 0u && (params.key_lo >= band_hi || key_hi <= band_lo)) {
            return; // this key chunk holds none of the tile's keys; uniform
        }
        t_start = max(t_start, band_lo);
        t_stop = max(min(t_stop, band_hi), t_start);
    }
    if (params.key_lo >= t_end && params.key_lo > 0u) {
        return; // finished by an earlier key chunk (causal); uniform over the workgroup
    }
    // Element offsets of row 0 of the head in the bound Q, O and K, V (wrapping when a split
    // head's bindings start later, row_base and key_base, as in fine_attention.wgsl), and this
    // row's LSE slot. K/V: the query head's K/V head (grouped-query heads share it).
    let q_head = (pr.q_row - params.row_base) * params.d;
    let k_head = (pr.kv_row - params.key_base) * params.d;
    let row = pr.q_row + i - params.row_base;

    if (params.key_lo == 0u) {
        begin_row(q_head, i, in_tile);
        begin_sink(pr); // the sink joins once, in the first key chunk
    } else {
        resume_row(q_head, row, i, in_tile);
    }
    attend_keys(k_head, t_start, t_stop, i, n, n_kv, causal, lid);
    if (in_tile) {
        finish_row(q_head, row, i);
    }
}
