// Backward, gradients of one level's learned downsampling weights (algorithm.md §8), summed
// over the K/V heads (the weights are shared by heads; a K/V head's dK~ already sums its
// group of query heads) by gather: one invocation per weight element (c, j, t) and chunk of
// the level's windows, looping over the chunk's (K/V head, sequence, window)s in a fixed order
// (deterministic, no atomics):  dWK_l[c,j,t] = sum_{bh, a} dK~[a*p+j, c] * K[a*w_l + t, c]
// (a*w_l + t < n; 2D: t = dy s_l + dx of the s_l x s_l kernel, the token at that offset in cell
// a, `tap_token`), and, for the last d*p invocations, one per bias element (c, j):
//   dbK_l[c,j] = sum_{bh, a} dK~[a*p+j, c];  likewise for V.
// The windows of every head (and sequence) in order, n / w_l per head at level l (O(n) at
// level 1), come in chunks of sel.arg1, sel.arg0 chunks: with one chunk the invocation writes
// the gradient; with more it writes its chunk's two sums (K, V) after dV~'s rows
// (params.partials_at + (element * chunks + chunk) * 2), which weights_backward_combine.wgsl
// adds in a fixed tree (docs/perf.md change 17).
// CPU mirror: the `Downsample::Learned` branch of `cpu::backward::pool_backward`.

#import params
#import geometry
#import level_select
#import problems

@group(0) @binding(1) var<storage, read> k: array<f32>;                // (bh / kv_group, n, d)
@group(0) @binding(2) var<storage, read> v: array<f32>;                // (bh / kv_group, n, d)
// (bh / kv_group, coarse_rows, d) as f32 bits (u32 so the table words after them read exactly)
@group(0) @binding(3) var<storage, read> dcoarse_k: array<u32>;
// (bh / kv_group, coarse_rows, d), then (from params.partials_at) the chunks' partial sums
@group(0) @binding(4) var<storage, read_write> dcoarse_v: array<f32>;
@group(0) @binding(5) var<storage, read_write> dwk: array<f32>;        // levels' (d, p, w_l) (2D: (d, p, s_l, s_l)), concatenated
@group(0) @binding(6) var<storage, read_write> dwv: array<f32>;
@group(0) @binding(7) var<storage, read_write> dbk: array<f32>;        // levels' (d, p), concatenated
@group(0) @binding(8) var<storage, read_write> dbv: array<f32>;

// A variable-length batch's sequence table: copied after dK~ (all 8 storage bindings of
// WebGPU's default limit are taken).
fn seq_word(i: u32) -> u32 {
    return dcoarse_k[params.table_at + i];
}

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let info = params.levels[sel.level];
    let d = params.d;
    let p = params.p;
    let w = info.window;
    let kv_heads = query_heads() / params.kv_group;
    let cols = params.grid_w;
    let taps = kernel_len(w);
    let weights = d * p * taps;
    let chunks = sel.arg0;
    let chunk = dispatch_workgroup(wg) % chunks;
    let g = (dispatch_workgroup(wg) / chunks) * WG + lid;
    if (g >= weights + d * p) {
        return;
    }
    // The chunk's windows [lo, hi) of the level's windows over K/V heads and sequences.
    var per_head = info.windows;
    if (params.seqs > 0u) {
        per_head = seq_word(sec_rows(sel.level) + params.seqs) / p;
    }
    let lo = min(chunk * sel.arg1, kv_heads * per_head);
    let hi = min(lo + sel.arg1, kv_heads * per_head);
    let bias = g >= weights;
    let e = select(g, g - weights, bias);
    let c = select(g / (p * taps), e / p, bias);
    let j = select((g / taps) % p, e % p, bias);
    let t = g % taps;
    var sk = 0.0;
    var sv = 0.0;
    for (var u = lo; u < hi; u++) {
        // Window u: its K/V head, sequence and window (a coarse row index over p).
        let at = locate(u * p, info.windows * p, sec_rows(sel.level), kv_heads);
        let pr = problem(at.x * params.kv_group, at.y);
        let a = at.z / p;
        let row = coarse_row(pr.kv_crow, sel.level, at.y, a * p + j) * d + c;
        let gk = bitcast<f32>(dcoarse_k[row]);
        let gv = dcoarse_v[row];
        if (bias) {
            //#rows(2u, select(0u, 2u, c == 0u))
            sk += gk;
            sv += gv;
        } else {
            let token = tap_token(pr.n, w, cols, a, t);
            // dK~ and dV~, then K and V of a tap inside the sequence (the total once per
            // (j, t): channel 0).
            //#rows(select(2u, 4u, token != NO_TOKEN), select(0u, select(2u, 4u, token != NO_TOKEN), c == 0u))
            if (token != NO_TOKEN) {
                let tok = (pr.kv_row + token) * d + c;
                sk += gk * k[tok];
                sv += gv * v[tok];
            }
        }
    }
    if (chunks > 1u) {
        let at = params.partials_at + (g * chunks + chunk) * 2u;
        dcoarse_v[at] = sk;
        dcoarse_v[at + 1u] = sv;
    } else if (bias) {
        dbk[sel.level * d * p + e] = sk;
        dbv[sel.level * d * p + e] = sv;
    } else {
        dwk[info.weight_offset + g] = sk;
        dwv[info.weight_offset + g] = sv;
    }
}
