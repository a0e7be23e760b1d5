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

fn load4(buf_is_ring: bool, at: u32) -> array<vec4<f32>, D4> {
    var r: array<vec4<f32>, D4>;
    let d = params.d;
    for (var c4 = 0u; c4 < D4; c4++) {
        var x = vec4<f32>(0.0);
        for (var e = 0u; e < 4u; e++) {
            let c = c4 * 4u + e;
            if (c < d) {
                if (buf_is_ring) {
                    x[e] = ring[at + c];
                } else {
                    x[e] = coarse[at + c];
                }
            }
        }
        r[c4] = x;
    }
    return r;
}

// Folds one key (at element offset `key_at` of the ring or the coarse buffer, its value
// `val_at`, logit offset `bias`) into this invocation's share.
fn fold_key(is_ring: bool, key_at: u32, val_at: u32, bias: f32) {
    let kk = load4(is_ring, key_at);
    var dot4 = vec4<f32>(0.0);
    for (var c4 = 0u; c4 < D4; c4++) {
        dot4 += q_row[c4] * kk[c4];
    }
    let wt = split_weight(dot4.x + dot4.y + dot4.z + dot4.w + bias);
    let vv = load4(is_ring, val_at);
    for (var c4 = 0u; c4 < D4; c4++) {
        part_acc[c4] += wt * vv[c4];
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
        fold_key(true, ring_at(local, 0u, t), ring_at(local, 1u, t), 0.0);
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
                    fold_key(false, coarse_at(local, 0u, lvl, fw, j), coarse_at(local, 1u, lvl, fw, j), bias);
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
