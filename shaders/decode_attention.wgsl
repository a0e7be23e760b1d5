// Decoding (algorithm.md §10), step 3 of 3: the chunk's queries attend to what the cache holds
// for them, O(m + p L) keys each instead of i: the near field (blocks a0 - 1 and a0 up to
// the query itself) from the ring, and every level's causal far list from the coarse slots.
// One workgroup per (head row, query): its keys are split over the invocations and combined
// with the log-sum-exp rule (split_softmax.wgsl). The row equals row i of the causal forward
// (fine_attention.wgsl) up to summation order. CPU mirror: `cpu::decode::Decoder::attend`.

#import decode_params
#import level_select

@group(0) @binding(1) var<storage, read> q: array<f32>;             // (bh, in_rows, d)
@group(0) @binding(2) var<storage, read> lens: array<u32>;          // (batch)
@group(0) @binding(3) var<storage, read> ring: array<f32>;          // (group rows, 2, R, d)
@group(0) @binding(4) var<storage, read> coarse: array<f32>;        // (group rows, 2, levels, slots, p, d)
@group(0) @binding(5) var<storage, read_write> out: array<f32>;     // (bh, chunk, d)
@group(0) @binding(6) var<storage, read_write> lse: array<f32>;     // (bh, chunk)

#import split_softmax

var<private> q_row: array<vec4<f32>, D4>;

// Elements 4 c4 .. 4 c4 + 3 of the row at element offset `at` of the ring (or of the coarse
// slots), zeros beyond d. Whole vec4s are built from four loads rather than element by element
// with a dynamic component index, which compilers (llvmpipe's among them) turn into slow code.
// The tail's loads past the row read the next row or are clamped (WGSL's robust access) and are
// discarded by the select.
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

// Folds fine key t (from the ring) into this invocation's share.
fn fold_fine(local: u32, t: u32) {
    let k_at = ring_at(local, 0u, t);
    var dot4 = vec4<f32>(0.0);
    for (var c4 = 0u; c4 < D4; c4++) {
        dot4 += q_row[c4] * ring4(k_at, c4);
    }
    let wt = split_weight(dot4.x + dot4.y + dot4.z + dot4.w);
    let v_at = ring_at(local, 1u, t);
    for (var c4 = 0u; c4 < D4; c4++) {
        part_acc[c4] += wt * ring4(v_at, c4);
    }
}

// Folds coarse key j of window a at level index lvl, logit offset `bias`, into the share.
fn fold_coarse(local: u32, lvl: u32, a: u32, j: u32, bias: f32) {
    let k_at = coarse_at(local, 0u, lvl, a, j);
    var dot4 = vec4<f32>(0.0);
    for (var c4 = 0u; c4 < D4; c4++) {
        dot4 += q_row[c4] * coarse4(k_at, c4);
    }
    let wt = split_weight(dot4.x + dot4.y + dot4.z + dot4.w + bias);
    let v_at = coarse_at(local, 1u, lvl, a, j);
    for (var c4 = 0u; c4 < D4; c4++) {
        part_acc[c4] += wt * coarse4(v_at, c4);
    }
}

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let wid = dispatch_workgroup(wg);
    if (wid >= params.group_rows * params.chunk) {
        return;
    }
    let d = params.d;
    let m = params.m;
    let p = params.p;
    let c = wid % params.chunk;
    let local = wid / params.chunk;
    let bh = params.bh_base + local;
    let seq = bh / params.heads;
    if (seq < params.b_lo || seq >= params.b_hi) {
        return; // uniform over the workgroup
    }
    let i = lens[seq] + c;
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

    // Level 0: blocks a0 - 1 and a0, keys t <= i.
    let a0 = i / m;
    let lo = select(0u, (a0 - 1u) * m, a0 > 0u);
    for (var t = lo + lid; t <= i; t += WG) {
        fold_fine(local, t);
    }
    // Levels 1..: the causal far list of the query's window a: a - 2, and a - 3 when a is odd
    // (complete windows, w_l / p tokens per coarse key). Keys are dealt round-robin.
    var key = 0u;
    for (var lvl = 0u; lvl < params.levels; lvl++) {
        let win = params.level_info[lvl].window;
        let a = i / win;
        if (a < 2u) {
            break; // and every higher level too
        }
        let bias = select(0.0, log(f32(win / p)), params.count_correction != 0u);
        let runs = select(1u, 2u, (a & 1u) == 1u);
        for (var r = 0u; r < runs; r++) {
            let fw = a - 2u - r;
            for (var j = 0u; j < p; j++) {
                if (key % WG == lid) {
                    fold_coarse(local, lvl, fw, j, bias);
                }
                key++;
            }
        }
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
