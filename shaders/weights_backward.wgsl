// Backward, gradients of one level's learned downsampling weights (algorithm.md §8), summed
// over the K/V heads (the weights are shared by heads; a K/V head's dK~ already sums its
// group of query heads) by gather: one invocation per weight
// element (c, j, t), looping over heads and windows in a fixed order (deterministic, no
// atomics):  dWK_l[c,j,t] = sum_{bh, a} dK~[a*p+j, c] * K[a*w_l + t, c]  (a*w_l + t < n),
// and, for the last d*p invocations, one per bias element (c, j):
//   dbK_l[c,j] = sum_{bh, a} dK~[a*p+j, c];  likewise for V.
// CPU mirror: the `Downsample::Learned` branch of `cpu::backward::downsample_backward`.

#import params
#import level_select

@group(0) @binding(1) var<storage, read> k: array<f32>;                // (bh / kv_group, n, d)
@group(0) @binding(2) var<storage, read> v: array<f32>;                // (bh / kv_group, n, d)
@group(0) @binding(3) var<storage, read> dcoarse_k: array<f32>;        // (bh / kv_group, coarse_rows, d)
@group(0) @binding(4) var<storage, read> dcoarse_v: array<f32>;        // (bh / kv_group, coarse_rows, d)
@group(0) @binding(5) var<storage, read_write> dwk: array<f32>;        // levels' (d, p, w_l), concatenated
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
    let weights = d * p * w;
    let g = dispatch_workgroup(wg) * WG + lid;
    if (g >= weights + d * p) {
        return;
    }
    var sk = 0.0;
    var sv = 0.0;
    if (g < weights) {
        let c = g / (p * w);
        let j = (g / w) % p;
        let t = g % w;
        for (var bh = 0u; bh < params.batch_heads / params.kv_group; bh++) {
            let rows = (bh * params.coarse_rows + info.row_offset + j) * d + c;
            let toks = bh * n * d + c;
            for (var a = 0u; a * w + t < n; a++) {
                let tok = toks + (a * w + t) * d;
                sk += dcoarse_k[rows + a * p * d] * k[tok];
                sv += dcoarse_v[rows + a * p * d] * v[tok];
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
