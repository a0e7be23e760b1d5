// Exact dense decoding, second pass: one workgroup per (head row, query) combines the partial
// softmaxes of its segments (decode_dense.wgsl) with the log-sum-exp rule (a segment is a
// "key" whose logit is its max, whose value is its weighted sum and which adds its sum to Z),
// in a fixed order, and writes O and the LSE. The row's sink (SINKS) joins here, once, as a
// first partial of Z = 1 and no value. CPU mirror: the merge rule of algorithm.md §6.

#import decode_params
#import level_select

@group(0) @binding(1) var<storage, read> lens: array<u32>;            // (2, batch)
@group(0) @binding(2) var<storage, read> partials: array<f32>;        // (group query rows, chunk_max, segments, d + 2)
@group(0) @binding(3) var<storage, read_write> out: array<f32>;       // (query rows, chunk, d)
@group(0) @binding(4) var<storage, read_write> lse: array<f32>;       // (query rows, chunk)

#import decode_softmax

fn partial4(at: u32, c4: u32) -> vec4<f32> {
    let b = at + c4 * 4u;
    let rem = params.d - c4 * 4u;
    return vec4<f32>(partials[b], select(0.0, partials[b + 1u], rem > 1u),
                     select(0.0, partials[b + 2u], rem > 2u), select(0.0, partials[b + 3u], rem > 3u));
}

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let wid = dispatch_workgroup(wg);
    if (wid >= params.group_rows * params.qgroup * params.chunk) {
        return;
    }
    let d = params.d;
    let c = wid % params.chunk;
    // Query row `bhq` of the group's `local_q` (cache row local_q / qgroup).
    let local_q = wid / params.chunk;
    let bh = params.bh_base + local_q / params.qgroup;
    let bhq = params.bh_base * params.qgroup + local_q;
    let seq = bh / params.heads;
    if (seq < params.b_lo || seq >= params.b_hi) {
        return;
    }
    let i = lens[params.lens_in + seq] + c;
    softmax_begin(lid, vec4<f32>(0.0));
    softmax_sink(lid, bhq);
    let total = i / params.segment + 1u;
    let row0 = local_q * params.partial_stride + c * params.segments * (d + 2u);
    for (var t0 = 0u; t0 < total; t0 += WG) {
        let g = t0 + lid;
        var s = ABSENT;
        var z = 0.0;
        if (g < total) {
            let at = row0 + g * (d + 2u);
            z = partials[at + 1u];
            s = select(ABSENT, partials[at], z > 0.0);
        }
        tile_s[lid] = s;
        tile_z[lid] = z;
        workgroupBarrier();
        let any = softmax_weigh(lid);
        workgroupBarrier();
        let c4 = value_c4(lid);
        if (any && value_lane(lid) < VALUE_LANES) {
            for (var r = value_lane(lid); r < min(WG, total - t0); r += VALUE_LANES) {
                softmax_add(r, partial4(row0 + (t0 + r) * (d + 2u) + 2u, c4));
            }
        }
        workgroupBarrier();
    }
    softmax_combine(lid);
    let row = bhq * params.chunk + c;
    if (lid < D4) {
        let x = red_acc[lid] / red_z[0];
        for (var e = 0u; e < 4u; e++) {
            let ch = lid * 4u + e;
            if (ch < d) {
                out[row * d + ch] = x[e];
            }
        }
    }
    if (lid == 0u) {
        lse[row] = run_max + log(red_z[0]);
    }
}
