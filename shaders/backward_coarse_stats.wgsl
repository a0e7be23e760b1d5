// Backward of coarse queries (algorithm.md §8 with §6), first step per level: what the tokens of
// each coarse-query row send back to it. Token i of row r (level l >= 1) met level l's far list
// through the pooled query q~_r, with its own LSE_i, dO_i and D_i; summed over the row, the far
// field's weights factor as P_ik = exp(s_rk - R_r) exp(R_r - LSE_i), with
//   R_r = min over the row's tokens of LSE_i,
//   G_r = sum_i exp(R_r - LSE_i) dO_i,   H_r = sum_i exp(R_r - LSE_i) D_i,
// so that sum_i P_ik dO_i = exp(s_rk - R_r) G_r and sum_i dS_ik = exp(s_rk - R_r) (G_r . v_k - H_r).
// Both exponentials are <= 1 (s_rk <= LSE_i for every token that saw k, R_r <= LSE_i): nothing
// overflows. The row then acts as one query (q~_r, dO = G_r, LSE = R_r, D = H_r) in the passes
// after this one (backward_coarse_dq, backward_dkv_coarse).
// One invocation per (query head, coarse row, unit): units 0..d-1 are G's channels, unit d
// writes (R, H). Hierarchical like Average pooling: level 1 from the row's tokens, level l >= 2
// from its CHILDREN rows of level l-1 (R = the least of theirs, G and H rescaled by
// exp(R - R_child)), so each level costs O(rows d), not O(n d). An empty row gets
// (R, H) = (EMPTY_ROW, 0) and G = 0: its weights in the passes after are exp(s - EMPTY_ROW) = 0.
// A head split across bindings (plan/backward_split_coarse_q.rs) runs level 1 once per chunk of
// tokens [chunk_lo, chunk_hi) (its windows' rows; dO and stats bound from row_base) and the
// levels above once, over every row.
// CPU mirror: the `query_slot` sums of `cpu::backward::fma_backward_in`.

#import params
#import geometry
#import level_select
#import sequences

@group(0) @binding(1) var<storage, read> dout: array<f32>;                // (bh, n, d)
@group(0) @binding(2) var<storage, read> stats: array<f32>;               // (bh, n, 2): LSE, D
@group(0) @binding(3) var<storage, read_write> coarse_dout: array<f32>;   // G: (bh, coarse_rows, d)
@group(0) @binding(4) var<storage, read_write> coarse_stats: array<f32>;  // (bh, coarse_rows, 2): R, H

const EMPTY_ROW: f32 = 1e30;

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let info = params.levels[sel.level];
    let d = params.d;
    let p = params.p;
    let win = info.window;
    let cols = params.grid_w;
    // Rows per query head: the level's windows holding tokens [chunk_lo, chunk_hi) (all of them
    // unless a split head's level 1 is done chunk by chunk, as coarse_attention's groups), or
    // every sequence's (varlen).
    let groups = chunk_groups(params.chunk_lo, params.chunk_hi, win, cols);
    var rows = (groups.y - groups.x) * p;
    if (params.seqs > 0u) {
        rows = seq_table[sec_rows(sel.level) + params.seqs];
    }
    let units = d + 1u;
    let g = dispatch_workgroup(wg) * WG + lid;
    if (g >= query_heads() * rows * units) {
        return;
    }
    let unit = g % units;
    var row = groups.x * p + (g / units) % rows;
    var seq = 0u;
    if (params.seqs > 0u) {
        seq = seq_search(sec_rows(sel.level), row);
        row -= seq_table[sec_rows(sel.level) + seq];
    }
    let pr = problem(g / (units * rows), seq);
    let n = pr.n;
    let out = coarse_row(pr.q_crow, sel.level, seq, row);
    var least = EMPTY_ROW;
    var sum = 0.0;
    // `//#rows`: the counting variant of the tests only (`shaders::compose_counting`): a token's
    // (or child row's) stats in the first loop, its dO (G) row in the second, the total once
    // per row (unit 0).
    if (sel.level == 0u) {
        // Its tokens' rows in the bound dO and stats (a split head's start at global row
        // row_base; wrapping u32 arithmetic, as backward_dq).
        let base = pr.q_row - params.row_base;
        let count = row_count(n, win, p, cols, row);
        for (var t = 0u; t < count; t++) {
            //#rows(1u, select(0u, 1u, unit == 0u))
            least = min(least, stats[2u * (base + row_token(n, win, p, cols, row, t))]);
        }
        for (var t = 0u; t < count; t++) {
            //#rows(1u, select(0u, 1u, unit == 0u))
            let tok = base + row_token(n, win, p, cols, row, t);
            var x = stats[2u * tok + 1u];
            if (unit < d) {
                x = dout[tok * d + unit];
            }
            sum += exp(least - stats[2u * tok]) * x;
        }
    } else {
        let a = row / p;
        let j = row % p;
        for (var h = 0u; h < CHILDREN; h++) {
            let child = row_child(n, win, p, cols, a, j, h);
            if (child.y > 0u) {
                //#rows(1u, select(0u, 1u, unit == 0u))
                let at = coarse_row(pr.q_crow, sel.level - 1u, seq, child.x);
                least = min(least, coarse_stats[2u * at]);
            }
        }
        for (var h = 0u; h < CHILDREN; h++) {
            let child = row_child(n, win, p, cols, a, j, h);
            if (child.y > 0u) {
                //#rows(1u, select(0u, 1u, unit == 0u))
                let at = coarse_row(pr.q_crow, sel.level - 1u, seq, child.x);
                var x = coarse_stats[2u * at + 1u];
                if (unit < d) {
                    x = coarse_dout[at * d + unit];
                }
                sum += exp(least - coarse_stats[2u * at]) * x;
            }
        }
    }
    if (unit < d) {
        coarse_dout[out * d + unit] = sum;
    } else {
        coarse_stats[2u * out] = least;
        coarse_stats[2u * out + 1u] = sum;
    }
}
