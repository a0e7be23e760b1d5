// Upsampling and merge (algorithm.md §6, coarse queries): every token takes, at each coarse
// level l, the partial result of the coarse query of the sub-window S(l, a, u) that holds it
// (upsampling by repetition) and merges it into its near-field result by the log-sum-exp rule,
// in place in O and the LSE: LSE = ln sum_l exp(LSE_l), o = sum_l exp(LSE_l - LSE) o_l, which
// is M = max M_l, Z = sum exp(M_l - M) Z_l, o = sum exp(M_l - M) Y_l / Z written per level as
// (o_l, LSE_l). One invocation per token. CPU mirror: `cpu::fma_forward` with coarse queries
// (one softmax over the union of the levels' keys, which this merge reproduces). 1D and 2D
// (the band holding the token) through the geometry interface of geometry.wgsl.

#import params
#import geometry
#import level_select
#import sequences

@group(0) @binding(1) var<storage, read> coarse_o: array<f32>;     // partial o~ (bh, coarse_rows, d)
@group(0) @binding(2) var<storage, read> coarse_lse: array<f32>;   // partial lse~ (bh, coarse_rows)
@group(0) @binding(6) var<storage, read_write> out: array<f32>;    // near field in, O out (bh, n, d)
@group(0) @binding(7) var<storage, read_write> lse: array<f32>;    // near field in, LSE out (bh, n)

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    // Tokens [chunk_lo, chunk_hi) of every head (all of them unless the head is split), or
    // every sequence's tokens (varlen).
    let span = select(params.chunk_hi - params.chunk_lo, seq_table[params.seqs], params.seqs > 0u);
    let t = dispatch_workgroup(wg) * WG + lid;
    if (t >= query_heads() * span) {
        return;
    }
    var i = params.chunk_lo + t % span;
    var seq = 0u;
    if (params.seqs > 0u) {
        seq = seq_search(sec_tok(), i);
        i -= seq_table[seq];
    }
    let pr = problem(t / span, seq);
    // Row of O and the LSE in the bound buffers (they start at global row row_base).
    let g = pr.q_row + i - params.row_base;
    let d = params.d;
    let p = params.p;
    var rows: array<u32, 32>;
    var weight: array<f32, 32>;
    // Whether the coarse query holding token i at each level has any key: from the indices
    // (its window's far list holds a window that exists), not from its lse~ being ABSENT, so
    // that a NaN partial (a NaN key or value in its far field) is merged, and poisons the
    // token as in dense attention, rather than failing a comparison and vanishing.
    var present: array<bool, 32>;
    // The near field's O row, then the partial o~ of each level that has one (`//#rows`: the counting variant of the tests only, `shaders::compose_counting`).
    //#rows(1u, 1u)
    let lse0 = lse[g];
    var big = lse0;
    for (var lvl = 0u; lvl < params.num_levels; lvl++) {
        let info = params.levels[lvl];
        let row = row_of(pr.n, info.window, p, params.grid_w, i);
        rows[lvl] = coarse_row(pr.q_crow, lvl, seq, row);
        weight[lvl] = coarse_lse[rows[lvl]];
        // Coarse queries are bidirectional only (the config refuses causal + coarse queries).
        var far = 0u;
        for (var run = 0u; run < FAR_RUNS; run++) {
            let r = level_far_run(pr.n, params.m, params.grid_w, lvl, row / p,
                                  level_windows(pr, lvl), false, run);
            far += r.y - r.x;
        }
        present[lvl] = far > 0u;
        //#rows(select(0u, 1u, present[lvl]), select(0u, 1u, present[lvl]))
        if (present[lvl]) {
            big = max(big, weight[lvl]);
        }
    }
    var z = exp(lse0 - big);
    for (var lvl = 0u; lvl < params.num_levels; lvl++) {
        if (present[lvl]) {
            z += exp(weight[lvl] - big);
        }
    }
    let total = big + log(z);
    let w0 = exp(lse0 - total);
    for (var lvl = 0u; lvl < params.num_levels; lvl++) {
        weight[lvl] = select(0.0, exp(weight[lvl] - total), present[lvl]);
    }
    let base = g * d;
    for (var c = 0u; c < d; c++) {
        var acc = w0 * out[base + c];
        for (var lvl = 0u; lvl < params.num_levels; lvl++) {
            if (present[lvl]) {
                acc += weight[lvl] * coarse_o[rows[lvl] * d + c];
            }
        }
        out[base + c] = acc;
    }
    lse[g] = total;
}
