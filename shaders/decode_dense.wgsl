// Exact dense decoding over the cache's history (flash-decoding): the chunk's queries against
// every key so far, split over the cache's length so the whole device works even for one
// query. This pass: one workgroup per (head row, query, segment of S keys of one history page
// (page = the level selector's `level`)), writing the segment's partial softmax; decode_merge
// combines them. CPU mirror: `cpu::dense_attention_rows` (causal, the query last).

#import decode_params
#import level_select

@group(0) @binding(1) var<storage, read> q: array<f32>;               // (bh, in_rows, d)
@group(0) @binding(2) var<storage, read> lens: array<u32>;            // (batch)
@group(0) @binding(3) var<storage, read> page_k: array<f32>;          // (group rows, T, d)
@group(0) @binding(4) var<storage, read> page_v: array<f32>;          // (group rows, T, d)
@group(0) @binding(5) var<storage, read_write> partials: array<f32>;  // (group rows, chunk_max, segments, d + 2)

#import split_softmax

var<private> q_row: array<vec4<f32>, D4>;

// Elements 4 c4 .. 4 c4 + 3 of the page row at element offset `at`, zeros beyond d (built from
// four loads, as decode_attention.wgsl's ring4 and for the same reason).
fn key4(at: u32, c4: u32) -> vec4<f32> {
    let b = at + c4 * 4u;
    let rem = params.d - c4 * 4u;
    return vec4<f32>(page_k[b], select(0.0, page_k[b + 1u], rem > 1u),
                     select(0.0, page_k[b + 2u], rem > 2u), select(0.0, page_k[b + 3u], rem > 3u));
}

fn value4(at: u32, c4: u32) -> vec4<f32> {
    let b = at + c4 * 4u;
    let rem = params.d - c4 * 4u;
    return vec4<f32>(page_v[b], select(0.0, page_v[b + 1u], rem > 1u),
                     select(0.0, page_v[b + 2u], rem > 2u), select(0.0, page_v[b + 3u], rem > 3u));
}

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let per_page = params.page_tokens / params.segment;
    let wid = dispatch_workgroup(wg);
    if (wid >= params.group_rows * params.chunk * per_page) {
        return;
    }
    let d = params.d;
    let seg_local = wid % per_page;
    let c = (wid / per_page) % params.chunk;
    let local = wid / (per_page * params.chunk);
    let bh = params.bh_base + local;
    let seq = bh / params.heads;
    if (seq < params.b_lo || seq >= params.b_hi) {
        return;
    }
    let i = lens[seq] + c;
    let page = sel.level;
    let t0 = page * params.page_tokens + seg_local * params.segment;
    if (t0 > i) {
        return; // the merge reads segments up to i / S only; uniform over the workgroup
    }
    let t1 = min(t0 + params.segment, i + 1u);
    let q_at = input_at(bh, c);
    for (var c4 = 0u; c4 < D4; c4++) {
        var x = vec4<f32>(0.0);
        for (var e = 0u; e < 4u; e++) {
            let ch = c4 * 4u + e;
            if (ch < d) {
                x[e] = q[q_at + ch];
            }
        }
        q_row[c4] = x * params.scale;
    }
    split_begin();
    let page_base = local * params.page_tokens * d;
    for (var t = t0 + lid; t < t1; t += WG) {
        let at = page_base + (t - page * params.page_tokens) * d;
        var dot4 = vec4<f32>(0.0);
        for (var c4 = 0u; c4 < D4; c4++) {
            dot4 += q_row[c4] * key4(at, c4);
        }
        let wt = split_weight(dot4.x + dot4.y + dot4.z + dot4.w);
        for (var c4 = 0u; c4 < D4; c4++) {
            part_acc[c4] += wt * value4(at, c4);
        }
    }
    split_combine(lid);
    let seg = t0 / params.segment;
    let at = local * params.partial_stride + (c * params.segments + seg) * (d + 2u);
    if (lid == 0u) {
        partials[at] = red_max[0];
        partials[at + 1u] = red_sum[0];
    }
    if (lid < D4) {
        for (var e = 0u; e < 4u; e++) {
            let ch = lid * 4u + e;
            if (ch < d) {
                partials[at + 2u + ch] = row_acc[lid][e];
            }
        }
    }
}
