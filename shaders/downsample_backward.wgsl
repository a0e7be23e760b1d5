// Backward through the downsampling (algorithm.md §8): adds every level's coarse-key gradient
// to the fine keys it was made from, by gather. One invocation per (head, token t, vec4 of
// channels c: the level's index arithmetic, several integer divisions, is per token, so it is
// done once for four channels: 3.5x faster on lavapipe than per channel, docs/perf.md change 14); for each level, t lies in exactly one window a = t / w_l (2D: one cell), so
//   Average: dK[t, c] += dK~[a*p + j, c] / |S(l,a,j)| for the sub-window j holding t;
//   Learned: dK[t, c] += sum_j WK_l[c, j, t - a*w_l] * dK~[a*p + j, c]
//   (2D: kernel index dy s_l + dx of t in its cell, `tap_of`);
// likewise for V. Runs after the fine dK/dV pass, whose values it reads and completes.
// With coarse queries (params.coarse_queries) the workgroups after those of K and V do the same
// for Q: dQ[t, c] += the share of dQ~ (backward_coarse_dq.wgsl) of the coarse query t took at
// each level, through the query weights (the third kind), completing the near field's dQ.
// CPU mirror: `cpu::backward::pool_backward`.

#import params
#import geometry
#import level_select
#import sequences

// Learned weights [keys | values | ...], each kind the levels' (d, p, w_l) (2D: (d, p, s_l,
// s_l)) concatenated, params.weight_stride elements apart (the forward's layout).
@group(0) @binding(1) var<storage, read> w_all: array<f32>;
@group(0) @binding(2) var<storage, read> dcoarse_k: array<f32>;        // (bh / kv_group, coarse_rows, d)
@group(0) @binding(3) var<storage, read> dcoarse_v: array<f32>;        // (bh / kv_group, coarse_rows, d)
@group(0) @binding(4) var<storage, read_write> dk: array<f32>;         // (bh / kv_group, n, d)
@group(0) @binding(5) var<storage, read_write> dv: array<f32>;         // (bh / kv_group, n, d)
@group(0) @binding(6) var<storage, read> dcoarse_q: array<f32>;        // (bh, coarse_rows, d)
@group(0) @binding(7) var<storage, read_write> dq: array<f32>;         // (bh, n, d)

// dQ of unit u (query head, token, vec4 of channels) of the dispatch's query part (coarse
// queries).
fn query_part(u: u32) {
    let d = params.d;
    let p = params.p;
    // Tokens [chunk_lo, chunk_hi) of each query head (0 and n unless the head is split), as
    // K's and V's below.
    let at = locate(u / D4, params.chunk_hi - params.chunk_lo, sec_tok(), query_heads());
    if (at.x == 0xffffffffu) {
        return;
    }
    let c0 = (u % D4) * 4u;
    let t = params.chunk_lo + at.z;
    let pr = problem(at.x, at.y);
    let n = pr.n;
    // Its row in the bound dQ (a split head's bindings start at global row row_base).
    let g = (pr.q_row + t - params.row_base) * d;
    var gq = vec4<f32>(0.0);
    // Its dQ row, then per level the dQ~ rows it went into (`//#rows`: the counting variant of
    // the tests only, `shaders::compose_counting`; the total once per token: c0 = 0).
    //#rows(1u, select(0u, 1u, c0 == 0u))
    for (var e = 0u; e < 4u; e++) {
        if (c0 + e < d) {
            gq[e] = dq[g + c0 + e];
        }
    }
    let cols = params.grid_w;
    for (var lvl = 0u; lvl < params.num_levels; lvl++) {
        let info = params.levels[lvl];
        let w = info.window;
        let row = row_of(n, w, p, cols, t);
        let rows = coarse_row(pr.q_crow, lvl, pr.s, (row / p) * p) * d;
        //#rows(select(p, 1u, params.learned == 0u), select(0u, select(p, 1u, params.learned == 0u), c0 == 0u))
        let count = f32(row_count(n, w, p, cols, row));
        let tap = tap_of(n, w, cols, t);
        for (var e = 0u; e < 4u; e++) {
            let c = c0 + e;
            if (c >= d) {
                break;
            }
            if (params.learned == 0u) {
                gq[e] += dcoarse_q[rows + c + (row % p) * d] / count;
            } else {
                for (var j = 0u; j < p; j++) {
                    let widx = 2u * params.weight_stride + info.weight_offset
                        + (c * p + j) * kernel_len(w) + tap;
                    gq[e] += w_all[widx] * dcoarse_q[rows + c + j * d];
                }
            }
        }
    }
    for (var e = 0u; e < 4u; e++) {
        if (c0 + e < d) {
            dq[g + c0 + e] = gq[e];
        }
    }
}

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let d = params.d;
    let p = params.p;
    // The workgroups of K and V, then (coarse queries) those of Q, each over its heads.
    let kv_heads = query_heads() / params.kv_group;
    // Tokens [chunk_lo, chunk_hi) of each K/V head (0 and n unless the head is split across
    // bindings), or each sequence's of a variable-length batch.
    let span = params.chunk_hi - params.chunk_lo;
    let per_head = select(span, seq_table[sec_tok() + params.seqs], params.seqs > 0u);
    let kv_wgs = (kv_heads * per_head * D4 + WG - 1u) / WG;
    let wid = dispatch_workgroup(wg);
    if (wid >= kv_wgs) {
        if (params.coarse_queries != 0u) {
            query_part((wid - kv_wgs) * WG + lid);
        }
        return;
    }
    let u = wid * WG + lid;
    // Over the K/V heads (grouped-query attention: dK~ already summed over each group) and
    // their real tokens (each sequence's of a variable-length batch).
    let at = locate(u / D4, span, sec_tok(), query_heads() / params.kv_group);
    if (at.x == 0xffffffffu) {
        return;
    }
    let c0 = (u % D4) * 4u;
    let t = params.chunk_lo + at.z;
    // Problem of the K/V head's first query head: its K/V and coarse rows are this head's.
    let kpr = problem(at.x * params.kv_group, at.y);
    let n = kpr.n;
    // Its row in the bound dK and dV (a split head's bindings start at global row row_base).
    let g = (kpr.kv_row + t - params.row_base) * d;
    var gk = vec4<f32>(0.0);
    var gv = vec4<f32>(0.0);
    // Its dK and dV rows, then per level the dK~ and dV~ rows it went into (`//#rows`, as in
    // query_part).
    //#rows(2u, select(0u, 2u, c0 == 0u))
    for (var e = 0u; e < 4u; e++) {
        if (c0 + e < d) {
            gk[e] = dk[g + c0 + e];
            gv[e] = dv[g + c0 + e];
        }
    }
    let cols = params.grid_w;
    // Average and Learned mode each walk the levels in a loop of their own, the other's loop
    // running no level: llvmpipe runs both sides of an `if` (masked), so the one loop with an
    // `if` per channel paid a masked Learned sum per level and channel in Average mode (perf.md
    // change 28). The same sums in the same order either way.
    let learned = params.learned != 0u;
    for (var lvl = 0u; lvl < select(params.num_levels, 0u, learned); lvl++) {
        let w = params.levels[lvl].window;
        // The coarse row holding t (group a, basis row j).
        let row = row_of(n, w, p, cols, t);
        let rows = coarse_row(kpr.kv_crow, lvl, kpr.s, (row / p) * p) * d;
        //#rows(2u, select(0u, 2u, c0 == 0u))
        let at = rows + (row % p) * d;
        let count = f32(row_count(n, w, p, cols, row));
        for (var e = 0u; e < 4u; e++) {
            let c = c0 + e;
            if (c >= d) {
                break;
            }
            gk[e] += dcoarse_k[at + c] / count;
            gv[e] += dcoarse_v[at + c] / count;
        }
    }
    for (var lvl = 0u; lvl < select(0u, params.num_levels, learned); lvl++) {
        let info = params.levels[lvl];
        let w = info.window;
        // The coarse rows of t's group a, and t's kernel index in group a.
        let row = row_of(n, w, p, cols, t);
        let rows = coarse_row(kpr.kv_crow, lvl, kpr.s, (row / p) * p) * d;
        //#rows(2u * p, select(0u, 2u * p, c0 == 0u))
        let tap = tap_of(n, w, cols, t);
        for (var e = 0u; e < 4u; e++) {
            let c = c0 + e;
            if (c >= d) {
                break;
            }
            for (var j = 0u; j < p; j++) {
                let widx = info.weight_offset + (c * p + j) * kernel_len(w) + tap;
                gk[e] += w_all[widx] * dcoarse_k[rows + c + j * d];
                gv[e] += w_all[params.weight_stride + widx] * dcoarse_v[rows + c + j * d];
            }
        }
    }
    for (var e = 0u; e < 4u; e++) {
        if (c0 + e < d) {
            dk[g + c0 + e] = gk[e];
            dv[g + c0 + e] = gv[e];
        }
    }
}
