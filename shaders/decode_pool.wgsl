// Decoding (algorithm.md §10), step 2 of 3: the coarse keys and values of every level, a
// window at a time as its tokens arrive. Window a of level l lives in slot a mod `slots`: while
// incomplete the slot holds its running sum (Learned: bias plus the weighted tokens so far), and
// when its last token arrives, its final row (Average: the sum over the full sub-window count).
// So a window's key and value are computed once, from tokens each seen once, and no query
// reads an incomplete window (causal far lists end before the query's own window starts).
// One invocation per (head row, tensor, level, window touched by the chunk, j, channel),
// summing in token order. CPU mirror: `cpu::decode::Decoder::pool`.

#import decode_params
#import level_select

@group(0) @binding(1) var<storage, read> k: array<f32>;             // (cache rows, in_rows, d)
@group(0) @binding(2) var<storage, read> v: array<f32>;             // (cache rows, in_rows, d)
@group(0) @binding(3) var<storage, read> lens: array<u32>;          // (batch)
// Learned weights [keys | values | queries] of every level ((d, p, w_l) each, weight_stride
// apart), biases likewise ((d, p) each); 16-byte dummies in Average mode.
@group(0) @binding(4) var<storage, read> w: array<f32>;
@group(0) @binding(5) var<storage, read> b: array<f32>;
@group(0) @binding(6) var<storage, read_write> coarse: array<f32>;  // (group rows, 2, levels, slots, p, d)

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let d = params.d;
    let p = params.p;
    let g = dispatch_workgroup(wg) * WG + lid;
    let per_row = 2u * params.levels * params.slots * p * d;
    if (g >= params.group_rows * per_row) {
        return;
    }
    let ch = g % d;
    let j = (g / d) % p;
    let k_slot = (g / (d * p)) % params.slots;
    let lvl = (g / (d * p * params.slots)) % params.levels;
    let kv = (g / (d * p * params.slots * params.levels)) % 2u;
    let local = g / per_row;
    let bh = params.bh_base + local;
    let seq = bh / params.heads;
    if (seq < params.b_lo || seq >= params.b_hi) {
        return;
    }
    let info = params.level_info[lvl];
    let win = info.window;
    let start = lens[seq];
    let end = start + params.chunk;
    // Windows [a_first, a_last] hold tokens of the chunk; only the last `slots` of them are
    // kept (a longer chunk's earlier windows are never read again).
    let a_first = start / win;
    let a_last = (end - 1u) / win;
    let a_keep = max(a_first, a_last + 1u - min(a_last + 1u, params.slots));
    let a = a_keep + k_slot;
    if (a > a_last) {
        return;
    }
    let w0 = a * win;
    let sub = win / p;
    let learned = params.learned != 0u;
    let at = coarse_at(local, kv, lvl, a, j) + ch;
    // The window's sum so far: carried from earlier steps, or where it starts.
    var s = 0.0;
    if (w0 < start) {
        s = coarse[at];
    } else if (learned) {
        s = b[kv * params.bias_stride + lvl * d * p + ch * p + j];
    }
    // This chunk's tokens of the window (Average: of sub-window j only), in order.
    var t_lo = max(start, w0);
    var t_hi = min(end, w0 + win);
    if (!learned) {
        t_lo = max(t_lo, w0 + j * sub);
        t_hi = min(t_hi, w0 + (j + 1u) * sub);
    }
    let wrow = kv * params.weight_stride + info.weight_offset + (ch * p + j) * win;
    for (var t = t_lo; t < t_hi; t++) {
        let src = input_at(bh, t - start) + ch;
        var x: f32;
        if (kv == 0u) {
            x = k[src];
        } else {
            x = v[src];
        }
        if (learned) {
            s += w[wrow + t - w0] * x;
        } else {
            s += x;
        }
    }
    if (w0 + win <= end && !learned) {
        s /= f32(sub); // complete: every sub-window holds w_l / p tokens
    }
    coarse[at] = s;
}
