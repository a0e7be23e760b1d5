// Backward, gradients of one level's learned downsampling weights (algorithm.md §8), summed
// over the K/V heads (the weights are shared by heads; a K/V head's dK~ already sums its
// group of query heads) by gather: one invocation per weight
// element (c, j, t), looping over heads and windows in a fixed order (deterministic, no
// atomics):  dWK_l[c,j,t] = sum_{bh, a} dK~[a*p+j, c] * K[a*w_l + t, c]  (a*w_l + t < n;
// 2D: t = dy s_l + dx of the s_l x s_l kernel, the token at that offset in cell a, `tap_token`),
// and, for the last d*p invocations, one per bias element (c, j):
//   dbK_l[c,j] = sum_{bh, a} dK~[a*p+j, c];  likewise for V.
// A variable-length batch sums over its sequences too (head by head, sequence by sequence).
// CPU mirror: the `Downsample::Learned` branch of `cpu::backward::pool_backward`.

#import params
#import geometry
#import level_select
#import problems

@group(0) @binding(1) var<storage, read> k: array<f32>;                // (bh / kv_group, n, d)
@group(0) @binding(2) var<storage, read> v: array<f32>;                // (bh / kv_group, n, d)
// (bh / kv_group, coarse_rows, d) as f32 bits (u32 so the table words after them read exactly)
@group(0) @binding(3) var<storage, read> dcoarse_k: array<u32>;
@group(0) @binding(4) var<storage, read> dcoarse_v: array<f32>;        // (bh / kv_group, coarse_rows, d)
@group(0) @binding(5) var<storage, read_write> dwk: array<f32>;        // levels' (d, p, w_l) (2D: (d, p, s_l, s_l)), concatenated
@group(0) @binding(6) var<storage, read_write> dwv: array<f32>;
@group(0) @binding(7) var<storage, read_write> dbk: array<f32>;        // levels' (d, p), concatenated
@group(0) @binding(8) var<storage, read_write> dbv: array<f32>;

// A variable-length batch's sequence table: copied after dK~ (all 8 storage bindings of
// WebGPU's default limit are taken).
fn seq_word(i: u32) -> u32 {
    return dcoarse_k[params.table_at + i];
}

// Problems per K/V head: its sequences (1 for a batch of equal sequences).
fn sequences_per_head() -> u32 {
    return max(params.seqs, 1u);
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
        for (var kh = 0u; kh < kv_heads; kh++) {
            for (var s = 0u; s < sequences_per_head(); s++) {
                let pr = problem(kh * params.kv_group, s);
                let rows = coarse_row(pr.kv_crow, sel.level, s, j) * d + c;
                let toks = pr.kv_row * d + c;
                // The windows (2D: cells) whose tap t lies on a token, in increasing order.
                for (var a = 0u; a < level_windows(pr, sel.level); a++) {
                    let token = tap_token(pr.n, w, cols, a, t);
                    if (token != NO_TOKEN) {
                        let tok = toks + token * d;
                        sk += bitcast<f32>(dcoarse_k[rows + a * p * d]) * k[tok];
                        sv += dcoarse_v[rows + a * p * d] * v[tok];
                    }
                }
            }
        }
        dwk[info.weight_offset + g] = sk;
        dwv[info.weight_offset + g] = sv;
    } else {
        let e = g - weights;
        let c = e / p;
        let j = e % p;
        for (var kh = 0u; kh < kv_heads; kh++) {
            for (var s = 0u; s < sequences_per_head(); s++) {
                let pr = problem(kh * params.kv_group, s);
                let rows = coarse_row(pr.kv_crow, sel.level, s, j) * d + c;
                for (var a = 0u; a < level_windows(pr, sel.level); a++) {
                    sk += bitcast<f32>(dcoarse_k[rows + a * p * d]);
                    sv += dcoarse_v[rows + a * p * d];
                }
            }
        }
        dbk[sel.level * d * p + e] = sk;
        dbv[sel.level * d * p + e] = sv;
    }
}
