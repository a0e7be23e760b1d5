// Backward, gradients of one level's learned downsampling weights (algorithm.md §8), summed
// over the K/V heads (the weights are shared by heads; a K/V head's dK~ already sums its
// group of query heads) by gather: one invocation per weight
// element (c, j, t), looping over heads and windows in a fixed order (deterministic, no
// atomics):  dWK_l[c,j,t] = sum_{bh, a} dK~[a*p+j, c] * K[a*w_l + t, c]  (a*w_l + t < n;
// 2D: t = dy s_l + dx of the s_l x s_l kernel, the token at that offset in cell a, `tap_token`),
// and, for the last d*p invocations, one per bias element (c, j):
//   dbK_l[c,j] = sum_{bh, a} dK~[a*p+j, c];  likewise for V.
// CPU mirror: the `Downsample::Learned` branch of `cpu::backward::downsample_backward`.

#import params
#import geometry
#import level_select

@group(0) @binding(1) var<storage, read> k: array<f32>;                // (bh / kv_group, n, d)
@group(0) @binding(2) var<storage, read> v: array<f32>;                // (bh / kv_group, n, d)
@group(0) @binding(3) var<storage, read> dcoarse_k: array<f32>;        // (bh / kv_group, coarse_rows, d)
@group(0) @binding(4) var<storage, read> dcoarse_v: array<f32>;        // (bh / kv_group, coarse_rows, d)
@group(0) @binding(5) var<storage, read_write> dwk: array<f32>;        // levels' (d, p, w_l) (2D: (d, p, s_l, s_l)), concatenated
@group(0) @binding(6) var<storage, read_write> dwv: array<f32>;
@group(0) @binding(7) var<storage, read_write> dbk: array<f32>;        // levels' (d, p), concatenated
@group(0) @binding(8) var<storage, read_write> dbv: array<f32>;

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let info = params.levels[sel.level];
    let d = params.d;
    let p = params.p;
    let n = params.n;
    let w = info.window;
    let cols = params.grid_w;
    let taps = kernel_len(w);
    let weights = d * p * taps;
    let g = dispatch_workgroup(wg) * WG + lid;
    if (g >= weights + d * p) {
        return;
    }
    var sk = 0.0;
    var sv = 0.0;
    if (g < weights) {
        let c = g / (p * taps);
        let j = (g / taps) % p;
        let t = g % taps;
        for (var bh = 0u; bh < params.batch_heads / params.kv_group; bh++) {
            let rows = (bh * params.coarse_rows + info.row_offset + j) * d + c;
            let toks = bh * n * d + c;
            // The windows (2D: cells) whose tap t lies on a token, in increasing order.
            for (var a = 0u; a < info.windows; a++) {
                let token = tap_token(n, w, cols, a, t);
                if (token != NO_TOKEN) {
                    let tok = toks + token * d;
                    sk += dcoarse_k[rows + a * p * d] * k[tok];
                    sv += dcoarse_v[rows + a * p * d] * v[tok];
                }
            }
        }
        dwk[info.weight_offset + g] = sk;
        dwv[info.weight_offset + g] = sv;
    } else {
        let e = g - weights;
        let c = e / p;
        let j = e % p;
        for (var bh = 0u; bh < params.batch_heads / params.kv_group; bh++) {
            let rows = (bh * params.coarse_rows + info.row_offset + j) * d + c;
            for (var a = 0u; a < info.windows; a++) {
                sk += dcoarse_k[rows + a * p * d];
                sv += dcoarse_v[rows + a * p * d];
            }
        }
        dbk[sel.level * d * p + e] = sk;
        dbv[sel.level * d * p + e] = sv;
    }
}
