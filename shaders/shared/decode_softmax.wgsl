// The softmax of ONE query row over a workgroup (flash-decoding), for rows that have too few
// queries to fill a workgroup with one row per invocation (decoding: one new token per head).
// Keys come in tiles of WG: each invocation scores one key of the tile (key-parallel, its row
// of K dotted with the query held in workgroup memory), then each invocation accumulates one
// vec4 of channels over a share of the tile's keys (channel-parallel: a single vec4 register
// per invocation, no per-invocation array of the head dimension, which compilers tend to
// keep in memory). Every invocation follows the same running maximum, so the rescaling is
// uniform, and the final sums run in a fixed order: two runs give the same bits.
// The softmax variants (docs/variants.md) are here too, each on where its pipeline constant
// (SOFTCAP, SINKS, WINDOW: `plan::SoftmaxFlags`) is true, so a plain decoder folds them away.
// CPU mirror: `cpu::variants::softmax_row_sink` (the same softmax with the sink, another
// summation order).
// Needs from the importer: consts WG, D4 (D4 <= WG); params.d, params.scale, params.softcap,
// params.sinks, params.heads, params.qgroup.

var<workgroup> q_shared: array<vec4<f32>, D4>;
var<workgroup> tile_s: array<f32, WG>;     // the tile's logits (ABSENT: no key)
var<workgroup> tile_w: array<f32, WG>;     // their weights exp(s - running max)
var<workgroup> tile_z: array<f32, WG>;     // what each weight adds to Z: 1 for a key, a partial's sum
var<workgroup> tile_at: array<u32, WG>;    // where each key's value row starts (importer's encoding)
var<workgroup> red_acc: array<vec4<f32>, WG>;
var<workgroup> red_z: array<f32, WG>;

var<private> run_max: f32;   // the same in every invocation
var<private> acc: vec4<f32>; // channels 4 c4 .. 4 c4 + 3 of the weighted values, over this lane's keys
var<private> run_z: f32;     // this lane's share of Z

// Channel group of invocation lid in the value phase, and its lane among those of that group
// (invocations from D4 * (WG / D4) on have no channels and idle there).
fn value_c4(lid: u32) -> u32 {
    return lid % D4;
}
fn value_lane(lid: u32) -> u32 {
    return lid / D4;
}
const VALUE_LANES: u32 = WG / D4;

// Starts a row: the query, scaled by 1/sqrt(d), into workgroup memory (invocation lid < D4
// gives channels 4 lid .. 4 lid + 3 as `q4`; the others' is unused). Barrier after it.
fn softmax_begin(lid: u32, q4: vec4<f32>) {
    if (lid < D4) {
        q_shared[lid] = q4 * params.scale;
    }
    run_max = ABSENT;
    acc = vec4<f32>(0.0);
    run_z = 0.0;
}

// The row's sink (SINKS): a key of logit S_h whose value is zero, so the row starts with
// running maximum S_h and Z = 1 (counted once: lane 0 holds it, softmax_combine adds lanes).
// `bhq` is the global query row (batch * heads + h); its head h picks the sink. Call after
// softmax_begin.
fn softmax_sink(lid: u32, bhq: u32) {
    if (SINKS) {
        let h = bhq % (params.heads * params.qgroup);
        run_max = params.sinks[h / 4u][h % 4u];
        run_z = select(0.0, 1.0, lid == 0u);
    }
}

// tanh(x) from exp(-2|x|), which never overflows (the forward's `cap_tanh` of
// shared/variants.wgsl, whose other functions read the forward's parameter block).
fn decode_tanh(x: f32) -> f32 {
    let t = exp(-2.0 * abs(x));
    return sign(x) * (1.0 - t) / (1.0 + t);
}

// The logit of a raw score l = q . k / sqrt(d): C tanh(l / C) under the softcap (SOFTCAP). A
// coarse key's count correction is added after, by the caller.
fn decode_logit(score: f32) -> f32 {
    if (SOFTCAP) {
        return params.softcap * decode_tanh(score / params.softcap);
    }
    return score;
}

// After every invocation wrote tile_s[lid], tile_z[lid] (tile_at[lid]) and a barrier: the
// tile's maximum (found by one invocation: on a CPU adapter every workgroup-memory load is a
// loop over the SIMD lanes, so one reader is cheaper than all), the rescaling of what came
// before, and this invocation's key weight in tile_w. Returns whether any key of the tile
// exists (uniform). Barrier after it before tile_w is read. Barriers inside.
fn softmax_weigh(lid: u32) -> bool {
    if (lid == 0u) {
        var m = ABSENT;
        for (var r = 0u; r < WG; r++) {
            m = max(m, tile_s[r]);
        }
        red_z[0] = m;
    }
    workgroupBarrier();
    let m = red_z[0];
    if (m <= ABSENT * 0.5) {
        return false;
    }
    let new_max = max(run_max, m);
    let c = exp(run_max - new_max);
    acc *= c;
    run_z *= c;
    run_max = new_max;
    let s = tile_s[lid];
    tile_w[lid] = select(0.0, exp(s - new_max), s > ABSENT * 0.5);
    return true;
}

// Adds key r of the tile (its value's channels `v4`, those of value_c4(lid)) to this lane.
fn softmax_add(r: u32, v4: vec4<f32>) {
    let w = tile_w[r];
    acc += w * v4;
    run_z += w * tile_z[r];
}

// Combines the lanes: afterwards red_acc[c4] (c4 < D4) holds the row's weighted value sum and
// red_z[0] its Z, relative to run_max. Call in uniform control flow; barrier inside.
fn softmax_combine(lid: u32) {
    workgroupBarrier();
    red_acc[lid] = acc;
    red_z[lid] = select(0.0, run_z, value_c4(lid) == 0u && value_lane(lid) < VALUE_LANES);
    workgroupBarrier();
    if (lid < D4) {
        var a = vec4<f32>(0.0);
        for (var l = 0u; l < VALUE_LANES; l++) {
            a += red_acc[l * D4 + lid];
        }
        red_acc[lid] = a;
    }
    if (lid == 0u) {
        var z = 0.0;
        for (var l = 0u; l < VALUE_LANES; l++) {
            z += red_z[l * D4];
        }
        red_z[0] = z;
    }
    workgroupBarrier();
}
