// Backward of coarse queries, gradients of one level's learned query pooling (algorithm.md §8
// with §6), summed over the query heads by gather: one invocation per weight element (c, j, t),
// looping over heads, sequences and windows in a fixed order (deterministic, no atomics):
//   dWQ_l[c,j,t] = sum_{bh, a} dQ~[a*p+j, c] * Q[a*w_l + t, c]  (a*w_l + t < n; 2D: the token at
// kernel index t of cell a, `tap_token`), and, for the last d*p invocations, one per bias
// element: dbQ_l[c,j] = sum_{bh, a} dQ~[a*p+j, c]. The key and value weights' twin is
// weights_backward.wgsl, which has no binding left for these. CPU mirror: the
// `Pooled::Queries` call of `cpu::backward::pool_backward`.

#import params
#import geometry
#import level_select
#import sequences

@group(0) @binding(1) var<storage, read> q: array<f32>;                // (bh, n, d)
@group(0) @binding(2) var<storage, read> dcoarse_q: array<f32>;        // (bh, coarse_rows, d)
@group(0) @binding(3) var<storage, read_write> dwq: array<f32>;        // levels' (d, p, w_l) (2D: (d, p, s_l, s_l)), concatenated
@group(0) @binding(4) var<storage, read_write> dbq: array<f32>;        // levels' (d, p), concatenated

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let info = params.levels[sel.level];
    let d = params.d;
    let p = params.p;
    let w = info.window;
    let cols = params.grid_w;
    let taps = kernel_len(w);
    let weights = d * p * taps;
    let g = dispatch_workgroup(wg) * WG + lid;
    if (g >= weights + d * p) {
        return;
    }
    let bias = g >= weights;
    let e = select(g, g - weights, bias);
    let c = select(g / (p * taps), e / p, bias);
    let j = select((g / taps) % p, e % p, bias);
    let t = g % taps;
    var sum = 0.0;
    for (var h = 0u; h < query_heads(); h++) {
        for (var s = 0u; s < max(params.seqs, 1u); s++) {
            let pr = problem(h, s);
            let rows = coarse_row(pr.q_crow, sel.level, s, j) * d + c;
            // The windows (2D: cells) in increasing order; a weight sums those whose tap t
            // lies on a token.
            for (var a = 0u; a < level_windows(pr, sel.level); a++) {
                let grad = dcoarse_q[rows + a * p * d];
                if (bias) {
                    sum += grad;
                } else {
                    let token = tap_token(pr.n, w, cols, a, t);
                    if (token != NO_TOKEN) {
                        sum += grad * q[(pr.q_row + token) * d + c];
                    }
                }
            }
        }
    }
    if (bias) {
        dbq[sel.level * d * p + e] = sum;
    } else {
        dwq[info.weight_offset + g] = sum;
    }
}
