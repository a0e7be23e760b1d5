// Exact dense decoding over the cache's history (flash-decoding): the chunk's queries against
// every key so far, split over the cache's length so the whole device works even for one
// query. This pass: one workgroup per (head row, query, segment of S keys of one history page
// (page = the level selector's `level`, its segments dispatched = `arg0`)), writing the
// segment's partial softmax (its max, its sum and its unnormalised weighted values);
// decode_merge combines them. S is the record's (`params.segment`, sized by the plan for the
// adapter: `plan::DenseSplit`). Keys in tiles of WG (decode_softmax.wgsl). Softcap: each
// logit capped here; sinks: joined by the merge (a segment's partial has none); a window never
// comes here (the windowed decode runs decode_attention over the ring). CPU mirror:
// `cpu::dense_attention_rows` (causal, the query last).

#import decode_params
#import level_select

@group(0) @binding(1) var<storage, read> q: array<f32>;               // (query rows, in_rows, d)
@group(0) @binding(2) var<storage, read> lens: array<u32>;            // (2, batch)
@group(0) @binding(3) var<storage, read> page_k: array<f32>;          // (group rows, T, d)
@group(0) @binding(4) var<storage, read> page_v: array<f32>;          // (group rows, T, d)
@group(0) @binding(5) var<storage, read_write> partials: array<f32>;  // (group query rows, chunk_max, segments, d + 2)

#import decode_softmax

// Elements 4 c4 .. 4 c4 + 3 of a row at element offset `at`, zeros beyond d (built from four
// loads, as decode_attention.wgsl's ring4 and for the same reason).
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

fn q4(at: u32, c4: u32) -> vec4<f32> {
    let b = at + c4 * 4u;
    let rem = params.d - c4 * 4u;
    return vec4<f32>(q[b], select(0.0, q[b + 1u], rem > 1u),
                     select(0.0, q[b + 2u], rem > 2u), select(0.0, q[b + 3u], rem > 3u));
}

// BK = SEGMENTS_INTERLEAVED (a CPU adapter's: `DecodeTuning::interleave_segments`): the
// workgroups of a (query row, token) take the page's segments in bit-reversed order, so that
// every contiguous run of them holds as many of the segments up to the longest sequence
// (llvmpipe gives each thread a contiguous run of a dispatch's workgroups, and up to half of
// the dispatched segments are past the longest sequence); else in order. `per_page` is a
// power of two (`plan::DenseCut::covered`); were it not, the order is kept. Which workgroup
// computes a segment changes nothing in it: the partial is its segment's, the merge adds them
// in segment order.
const SEGMENTS_INTERLEAVED: u32 = 5u;

fn segment_of(w: u32, per_page: u32) -> u32 {
    if (BK == SEGMENTS_INTERLEAVED && per_page > 1u && (per_page & (per_page - 1u)) == 0u) {
        return reverseBits(w) >> (32u - countTrailingZeros(per_page));
    }
    return w;
}

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    // Segments of this page dispatched per (query row, token): those up to the longest
    // sequence (the plan's count, rounded up to a power of two).
    let per_page = sel.arg0;
    let wid = dispatch_workgroup(wg);
    if (wid >= params.group_rows * params.qgroup * params.chunk * per_page) {
        return;
    }
    let d = params.d;
    let seg_local = segment_of(wid % per_page, per_page);
    let c = (wid / per_page) % params.chunk;
    // Query row `bhq` of the group's `local_q`, reading cache row `local` (its K/V head).
    let local_q = wid / (per_page * params.chunk);
    let local = local_q / params.qgroup;
    let bh = params.bh_base + local;
    let bhq = params.bh_base * params.qgroup + local_q;
    let seq = bh / params.heads;
    if (seq < params.b_lo || seq >= params.b_hi) {
        return;
    }
    let i = lens[params.lens_in + seq] + c;
    let page = sel.level;
    let first = page * params.page_tokens + seg_local * params.segment;
    if (first > i) {
        return; // the merge reads segments up to i / S only; uniform over the workgroup
    }
    let total = min(params.segment, i + 1u - first);
    softmax_begin(lid, q4(query_at(bhq, c), min(lid, D4 - 1u)));
    workgroupBarrier();
    // Element offset of the segment's first key in the bound page.
    let base = (local * params.page_tokens + seg_local * params.segment) * d;
    for (var t0 = 0u; t0 < total; t0 += WG) {
        let g = t0 + lid;
        var s = ABSENT;
        if (g < total) {
            var dot4 = vec4<f32>(0.0);
            for (var c4 = 0u; c4 < D4; c4++) {
                dot4 += q_shared[c4] * key4(base + g * d, c4);
            }
            s = decode_logit(dot4.x + dot4.y + dot4.z + dot4.w);
        }
        tile_s[lid] = s;
        tile_z[lid] = 1.0;
        workgroupBarrier();
        let any = softmax_weigh(lid);
        workgroupBarrier();
        let c4 = value_c4(lid);
        if (any && value_lane(lid) < VALUE_LANES) {
            for (var r = value_lane(lid); r < min(WG, total - t0); r += VALUE_LANES) {
                softmax_add(r, value4(base + (t0 + r) * d, c4));
            }
        }
        workgroupBarrier();
    }
    softmax_combine(lid);
    let seg = first / params.segment;
    let at = local_q * params.partial_stride + (c * params.segments + seg) * (d + 2u);
    if (lid == 0u) {
        partials[at] = run_max;
        partials[at + 1u] = red_z[0];
    }
    if (lid < D4) {
        for (var e = 0u; e < 4u; e++) {
            let ch = lid * 4u + e;
            if (ch < d) {
                partials[at + 2u + ch] = red_acc[lid][e];
            }
        }
    }
}
