// Exact dense decoding, second pass: one workgroup per (head row, query) combines the partial
// softmaxes of its segments (decode_dense.wgsl) with the log-sum-exp rule, in a fixed order,
// and writes O and the LSE. CPU mirror: the merge rule of algorithm.md §6.

#import decode_params
#import level_select

@group(0) @binding(1) var<storage, read> lens: array<u32>;            // (batch)
@group(0) @binding(2) var<storage, read> partials: array<f32>;        // (group rows, chunk_max, segments, d + 2)
@group(0) @binding(3) var<storage, read_write> out: array<f32>;       // (bh, chunk, d)
@group(0) @binding(4) var<storage, read_write> lse: array<f32>;       // (bh, chunk)

#import split_softmax

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let wid = dispatch_workgroup(wg);
    if (wid >= params.group_rows * params.chunk) {
        return;
    }
    let d = params.d;
    let c = wid % params.chunk;
    let local = wid / params.chunk;
    let bh = params.bh_base + local;
    let seq = bh / params.heads;
    if (seq < params.b_lo || seq >= params.b_hi) {
        return;
    }
    let i = lens[seq] + c;
    split_begin();
    let last = i / params.segment;
    for (var seg = lid; seg <= last; seg += WG) {
        let at = local * params.partial_stride + (c * params.segments + seg) * (d + 2u);
        var acc: array<vec4<f32>, D4>;
        for (var c4 = 0u; c4 < D4; c4++) {
            var x = vec4<f32>(0.0);
            for (var e = 0u; e < 4u; e++) {
                let ch = c4 * 4u + e;
                if (ch < d) {
                    x[e] = partials[at + 2u + ch];
                }
            }
            acc[c4] = x;
        }
        split_fold_partial(partials[at], partials[at + 1u], acc);
    }
    split_combine(lid);
    let row = bh * params.chunk + c;
    if (lid < D4) {
        let x = row_acc[lid] / red_sum[0];
        for (var e = 0u; e < 4u; e++) {
            let ch = lid * 4u + e;
            if (ch < d) {
                out[row * d + ch] = x[e];
            }
        }
    }
    if (lid == 0u) {
        lse[row] = red_max[0] + log(red_sum[0]);
    }
}
