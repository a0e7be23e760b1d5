// Decoding's cache upkeep (algorithm.md §10), one invocation per unit of work, in one pass
// with whatever else a record runs (decode_ingest.wgsl alone, decode_step.wgsl beside the
// attention): the chunk's keys and values into the near-field ring, every level's coarse
// slots as their windows fill, and the sequences' lengths advanced into the other half of
// `lens`. The three touch disjoint memory and read only the step's K, V and the lengths
// this record reads, so they need no order among themselves.
// Needs from the importer: bindings k, v (read), lens, ring, coarse (read_write);
// learned_weight(i), learned_bias(i) (the Learned pooling's weights and biases; never called
// in Average mode).
// CPU mirror: `cpu::decode::Decoder::append` and `pool`.

// Units of the ring: one per (head row of the group, token, channel).
fn append_units() -> u32 {
    return params.group_rows * params.chunk * params.d;
}

// Units of the coarse slots: one per (head row, tensor, level, window slot, j, channel).
fn pool_units() -> u32 {
    return params.group_rows * 2u * params.levels * params.slots * params.p * params.d;
}

// Every unit of the upkeep: the ring's, the slots', then one per sequence whose length this
// record writes.
fn upkeep_units() -> u32 {
    return append_units() + pool_units() + params.lens_count;
}

// Unit g < upkeep_units() of the upkeep.
fn upkeep(g: u32) {
    let a = append_units();
    let s = pool_units();
    if (g < a) {
        append_one(g);
    } else if (g < a + s) {
        pool_one(g - a);
    } else {
        advance_one(g - a - s);
    }
}

// The length of sequence `seq` before this record.
fn start_of(seq: u32) -> u32 {
    return lens[params.lens_in + seq];
}

// Sequence `seq` after this record: `chunk` tokens longer if it takes part, else as it was.
fn advance_one(seq: u32) {
    var len = start_of(seq);
    if (seq >= params.b_lo && seq < params.b_hi) {
        len += params.chunk;
    }
    lens[params.lens_out + seq] = len;
}

// Token t of the chunk enters the ring in slot t mod R (only the last R tokens of a longer
// chunk: the earlier ones would be overwritten before any query reads them).
fn append_one(g: u32) {
    let d = params.d;
    let ch = g % d;
    let c = (g / d) % params.chunk;
    let local = g / (d * params.chunk);
    let bh = params.bh_base + local;
    let seq = bh / params.heads;
    if (seq < params.b_lo || seq >= params.b_hi || c + params.ring < params.chunk) {
        return;
    }
    let t = start_of(seq) + c;
    let src = input_at(bh, c) + ch;
    ring[ring_at(local, 0u, t) + ch] = k[src];
    ring[ring_at(local, 1u, t) + ch] = v[src];
}

// Window a of level l lives in slot a mod `slots`: while incomplete the slot holds its running
// sum (Learned: bias plus the weighted tokens so far), and when its last token arrives, its
// final row (Average: the sum over the full sub-window count). So a window's key and value are
// computed once, from tokens each seen once, and no query reads an incomplete window (causal
// far lists end before the query's own window starts). Sums in token order.
fn pool_one(g: u32) {
    let d = params.d;
    let p = params.p;
    let per_row = 2u * params.levels * params.slots * p * d;
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
    let start = start_of(seq);
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
        s = learned_bias(kv * params.bias_stride + lvl * d * p + ch * p + j);
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
            s += learned_weight(wrow + t - w0) * x;
        } else {
            s += x;
        }
    }
    if (w0 + win <= end && !learned) {
        s /= f32(sub); // complete: every sub-window holds w_l / p tokens
    }
    coarse[at] = s;
}
