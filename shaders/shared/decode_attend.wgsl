// Decoding (algorithm.md §10): the attention of one query row of a step to what the cache holds
// for it, O(m + p L) keys instead of i: the near field (blocks a0 - 1 and a0 up to the query
// itself) and every level's causal far list from the coarse slots. One workgroup per (head
// row, query), keys in tiles of WG (decode_softmax.wgsl). The row equals row i of the causal
// forward (fine_attention.wgsl) up to summation order. With a window (WINDOW: no coarse level,
// the ring holds the last L + C tokens) the keys are i - L ..= i, exact windowed attention;
// softcap and sinks as decode_softmax.wgsl applies them.
// Needs from the importer: bindings q, ring, coarse (read), out, lse (read_write);
// row_start(seq, lid) (the sequence's length before this record, uniform over the
// workgroup); near_at(local, bh, kv, t, start) (where near key or value t of cache row bh,
// `local` in this group, starts: an element offset with at most bit 30 set as a tag, since
// tile_at's bit 31 marks coarse rows) and near4(at, kv, c4) (elements 4 c4 .. 4 c4 + 3 of it).
// CPU mirror: `cpu::decode::Decoder::attend`.

// A value row in the coarse slots rather than the near field (tile_at's top bit; element
// offsets of one binding stay below 2^30: 2 GiB of 2-byte elements, 2^29 of 4-byte ones).
const COARSE_ROW: u32 = 0x80000000u;

// Elements 4 c4 .. 4 c4 + 3 of the row at element offset `at`, zeros beyond d. Whole vec4s
// are built from four loads rather than element by element with a dynamic component index,
// which compilers (llvmpipe's among them) turn into slow code. The tail's loads past the row
// read the next row or are clamped (WGSL's robust access) and are discarded by the select.
fn ring4(at: u32, c4: u32) -> vec4<f32> {
    let b = at + c4 * 4u;
    let rem = params.d - c4 * 4u;
    return vec4<f32>(ring[b], select(0.0, ring[b + 1u], rem > 1u),
                     select(0.0, ring[b + 2u], rem > 2u), select(0.0, ring[b + 3u], rem > 3u));
}

fn coarse4(at: u32, c4: u32) -> vec4<f32> {
    let b = at + c4 * 4u;
    let rem = params.d - c4 * 4u;
    return vec4<f32>(coarse[b], select(0.0, coarse[b + 1u], rem > 1u),
                     select(0.0, coarse[b + 2u], rem > 2u), select(0.0, coarse[b + 3u], rem > 3u));
}

fn q4(at: u32, c4: u32) -> vec4<f32> {
    let b = at + c4 * 4u;
    let rem = params.d - c4 * 4u;
    return vec4<f32>(q[b], select(0.0, q[b + 1u], rem > 1u),
                     select(0.0, q[b + 2u], rem > 2u), select(0.0, q[b + 3u], rem > 3u));
}

// Coarse keys of query i's far lists over every level: a - 2, and a - 3 when a is odd.
fn far_total(i: u32) -> u32 {
    var total = 0u;
    for (var lvl = 0u; lvl < params.levels; lvl++) {
        let a = i / params.level_info[lvl].window;
        if (a < 2u) {
            break; // and every higher level too
        }
        total += select(1u, 2u, (a & 1u) == 1u) * params.p;
    }
    return total;
}

// The f-th far key of query i: (level index, window, j).
fn far_key(i: u32, f: u32) -> vec3<u32> {
    var rest = f;
    for (var lvl = 0u; lvl < params.levels; lvl++) {
        let a = i / params.level_info[lvl].window;
        let count = select(1u, 2u, (a & 1u) == 1u) * params.p;
        if (rest < count) {
            return vec3<u32>(lvl, a - 2u - rest / params.p, rest % params.p);
        }
        rest -= count;
    }
    return vec3<u32>(0u); // not reached for f < far_total(i)
}

// Query `wid` of this group's (query row, token) list: one workgroup, called in uniform
// control flow with every invocation of it.
fn attend(wid: u32, lid: u32) {
    if (wid >= params.group_rows * params.qgroup * params.chunk) {
        return;
    }
    let m = params.m;
    let c = wid % params.chunk;
    // Query row `bhq` reads cache row `bh` (its K/V head): `local` of this group.
    let local_q = wid / params.chunk;
    let local = local_q / params.qgroup;
    let bh = params.bh_base + local;
    let bhq = params.bh_base * params.qgroup + local_q;
    let seq = bh / params.heads;
    if (seq < params.b_lo || seq >= params.b_hi) {
        return; // uniform over the workgroup
    }
    let start = row_start(seq, lid);
    let i = start + c;
    softmax_begin(lid, q4(query_at(bhq, c), min(lid, D4 - 1u)));
    softmax_sink(lid, bhq);
    workgroupBarrier();

    // Level 0: blocks a0 - 1 and a0, keys t <= i (a window: keys i - L ..= i); then the
    // coarse levels (none with a window).
    let a0 = i / m;
    var lo = select(0u, (a0 - 1u) * m, a0 > 0u);
    if (WINDOW) {
        lo = i - min(i, params.window_left);
    }
    let near = i + 1u - lo;
    let total = near + far_total(i);
    let correct = params.count_correction != 0u;
    for (var t0 = 0u; t0 < total; t0 += WG) {
        let g = t0 + lid;
        var s = ABSENT;
        var at = 0u;
        if (g < near) {
            let k_at = near_at(local, bh, 0u, lo + g, start);
            var dot4 = vec4<f32>(0.0);
            for (var c4 = 0u; c4 < D4; c4++) {
                dot4 += q_shared[c4] * near4(k_at, 0u, c4);
            }
            s = decode_logit(dot4.x + dot4.y + dot4.z + dot4.w);
            at = near_at(local, bh, 1u, lo + g, start);
        } else if (g < total) {
            let key = far_key(i, g - near);
            let k_at = coarse_at(local, 0u, key.x, key.y, key.z);
            var dot4 = vec4<f32>(0.0);
            for (var c4 = 0u; c4 < D4; c4++) {
                dot4 += q_shared[c4] * coarse4(k_at, c4);
            }
            // Complete windows: w_l / p tokens per coarse key.
            let bias = select(0.0, log(f32(params.level_info[key.x].window / params.p)), correct);
            s = decode_logit(dot4.x + dot4.y + dot4.z + dot4.w) + bias;
            at = coarse_at(local, 1u, key.x, key.y, key.z) | COARSE_ROW;
        }
        tile_s[lid] = s;
        tile_z[lid] = 1.0;
        tile_at[lid] = at;
        workgroupBarrier();
        let any = softmax_weigh(lid);
        workgroupBarrier();
        let c4 = value_c4(lid);
        if (any && value_lane(lid) < VALUE_LANES) {
            for (var r = value_lane(lid); r < min(WG, total - t0); r += VALUE_LANES) {
                let a = tile_at[r];
                var v4: vec4<f32>;
                if ((a & COARSE_ROW) != 0u) {
                    v4 = coarse4(a & ~COARSE_ROW, c4);
                } else {
                    v4 = near4(a, 1u, c4);
                }
                softmax_add(r, v4);
            }
        }
        workgroupBarrier();
    }

    softmax_combine(lid);
    let row = bhq * params.chunk + c;
    let d = params.d;
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
