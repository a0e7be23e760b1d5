// Backward of coarse queries, gradients of one level's learned query pooling (algorithm.md §8
// with §6), summed over the query heads by gather: one invocation per (weight element (c, j, t),
// chunk of the level's windows), looping over the chunk's (head, sequence, window)s in a fixed
// order (deterministic, no atomics):
//   dWQ_l[c,j,t] = sum_{bh, a} dQ~[a*p+j, c] * Q[a*w_l + t, c]  (a*w_l + t < n; 2D: the token at
// kernel index t of cell a, `tap_token`), and, for the last d*p invocations, one per bias
// element: dbQ_l[c,j] = sum_{bh, a} dQ~[a*p+j, c]. The windows of every head come in chunks of
// sel.arg1, sel.arg0 chunks (n / w_l per head: O(n) at level 1): with one chunk the invocation
// writes the gradient, with more its chunk's sum after dQ~'s rows (params.q_partials_at +
// element * chunks + chunk), which weights_backward_q_combine.wgsl adds in a fixed tree.
// The key and value weights' twin is weights_backward.wgsl, which has no binding left for
// these. CPU mirror: the `Pooled::Queries` call of `cpu::backward::pool_backward`.

#import params
#import geometry
#import level_select
#import sequences

@group(0) @binding(1) var<storage, read> q: array<f32>;                // (bh, n, d)
@group(0) @binding(2) var<storage, read_write> dcoarse_q: array<f32>;  // (bh, coarse_rows, d), then the partials
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
    let chunks = sel.arg0;
    let chunk = dispatch_workgroup(wg) % chunks;
    let g = (dispatch_workgroup(wg) / chunks) * WG + lid;
    if (g >= weights + d * p) {
        return;
    }
    let bias = g >= weights;
    let e = select(g, g - weights, bias);
    let c = select(g / (p * taps), e / p, bias);
    let j = select((g / taps) % p, e % p, bias);
    let t = g % taps;
    // The chunk's windows [lo, hi) of the level's windows over query heads and sequences.
    var per_head = info.windows;
    if (params.seqs > 0u) {
        per_head = seq_word(sec_rows(sel.level) + params.seqs) / p;
    }
    let lo = min(chunk * sel.arg1, query_heads() * per_head);
    let hi = min(lo + sel.arg1, query_heads() * per_head);
    var sum = 0.0;
    for (var u = lo; u < hi; u++) {
        let at = locate(u * p, info.windows * p, sec_rows(sel.level), query_heads());
        let pr = problem(at.x, at.y);
        let a = at.z / p;
        let grad = dcoarse_q[coarse_row(pr.q_crow, sel.level, at.y, a * p + j) * d + c];
        if (bias) {
            // dQ~ (`//#rows`: the counting variant of the tests only,
            // `shaders::compose_counting`; the total once per (j, t): channel 0).
            //#rows(1u, select(0u, 1u, c == 0u))
            sum += grad;
        } else {
            let token = tap_token(pr.n, w, cols, a, t);
            // dQ~, then Q of a tap inside the sequence.
            //#rows(select(1u, 2u, token != NO_TOKEN), select(0u, select(1u, 2u, token != NO_TOKEN), c == 0u))
            if (token != NO_TOKEN) {
                sum += grad * q[(pr.q_row + token) * d + c];
            }
        }
    }
    if (chunks > 1u) {
        dcoarse_q[params.q_partials_at + g * chunks + chunk] = sum;
    } else if (bias) {
        dbq[sel.level * d * p + e] = sum;
    } else {
        dwq[info.weight_offset + g] = sum;
    }
}
