// consume_tile of `online_softmax.wgsl` with subgroup operations (devices with
// Features::SUBGROUP; SG = the adapter's smallest subgroup size, prepended by `compose_for`).
// The lanes of a subgroup load the staged key and value rows once and share them by broadcasts
// (`subgroup_rows.wgsl` says why and how); the keys go four at a time. All lanes of a subgroup
// call these functions together (consume_tile's loops are uniform over the workgroup), as
// broadcasts require.

#import subgroup_key_rows

fn tile_dots(r: u32, ok: vec4<bool>) -> vec4<f32> {
    if (!sg_full) {
        return tile_dots_plain(r, ok);
    }
    // Rows past the tile's keys hold stale data: their dots are computed and masked by ok
    // (select, not multiply), so every lane takes part in every shuffle.
    let k0 = k_share(r);
    let k1 = k_share(r + 1u);
    let k2 = k_share(r + 2u);
    let k3 = k_share(r + 3u);
    var d0 = vec4<f32>(0.0);
    var d1 = vec4<f32>(0.0);
    var d2 = vec4<f32>(0.0);
    var d3 = vec4<f32>(0.0);
    // Written out by `compose_for` for each c4 < D4, {t} = c4 / SG, {j} = c4 % SG
    // (subgroupBroadcast needs a constant lane; with a computed one, subgroupShuffle, lavapipe
    // made the pass 1.4x slower than the plain one instead of 2x faster).
    //#each_c4 d0 += q_row[{c4}] * subgroupBroadcast(k0[{t}], {j}u); d1 += q_row[{c4}] * subgroupBroadcast(k1[{t}], {j}u); d2 += q_row[{c4}] * subgroupBroadcast(k2[{t}], {j}u); d3 += q_row[{c4}] * subgroupBroadcast(k3[{t}], {j}u);
    let one = vec4<f32>(1.0);
    return vec4<f32>(dot(d0, one), dot(d1, one), dot(d2, one), dot(d3, one));
}

fn tile_accumulate(r: u32, w: vec4<f32>, ok: vec4<bool>) {
    if (!sg_full) {
        tile_accumulate_plain(r, w, ok);
        return;
    }
    let v0 = v_share(r);
    let v1 = v_share(r + 1u);
    let v2 = v_share(r + 2u);
    let v3 = v_share(r + 3u);
    let zero = vec4<f32>(0.0);
    // Select, not w * v: a masked key's stale or future value may be NaN.
    //#each_c4 acc[{c4}] += select(zero, w.x * subgroupBroadcast(v0[{t}], {j}u), ok.x) + select(zero, w.y * subgroupBroadcast(v1[{t}], {j}u), ok.y) + select(zero, w.z * subgroupBroadcast(v2[{t}], {j}u), ok.z) + select(zero, w.w * subgroupBroadcast(v3[{t}], {j}u), ok.w);
}

// The plain path of a subgroup that is not full.

// key_ok of keys r .. r + 3.
fn keys_ok(r: u32, n_keys: u32) -> vec4<bool> {
    return vec4<bool>(key_ok(r, n_keys), key_ok(r + 1u, n_keys), key_ok(r + 2u, n_keys),
                      key_ok(r + 3u, n_keys));
}

// Dot products of this invocation's q_row with staged keys r .. r + 3, where ok (elsewhere
// the result is not used). Keys go four at a time: each q_row element is loaded once per four
// keys instead of once per key (register blocking; lavapipe keeps these per-invocation arrays
// in memory).
fn tile_dots_plain(r: u32, ok: vec4<bool>) -> vec4<f32> {
    var d0 = vec4<f32>(0.0);
    var d1 = vec4<f32>(0.0);
    var d2 = vec4<f32>(0.0);
    var d3 = vec4<f32>(0.0);
    if (all(ok)) {
        for (var c4 = 0u; c4 < D4; c4++) {
            let x = q_row[c4];
            d0 += x * tile_k[r * D4 + c4];
            d1 += x * tile_k[(r + 1u) * D4 + c4];
            d2 += x * tile_k[(r + 2u) * D4 + c4];
            d3 += x * tile_k[(r + 3u) * D4 + c4];
        }
    } else if (any(ok)) {
        // A partial group (tile end, causal diagonal, empty sub-window): key by key.
        for (var c4 = 0u; c4 < D4; c4++) {
            let x = q_row[c4];
            if (ok.x) { d0 += x * tile_k[r * D4 + c4]; }
            if (ok.y) { d1 += x * tile_k[(r + 1u) * D4 + c4]; }
            if (ok.z) { d2 += x * tile_k[(r + 2u) * D4 + c4]; }
            if (ok.w) { d3 += x * tile_k[(r + 3u) * D4 + c4]; }
        }
    }
    let one = vec4<f32>(1.0);
    return vec4<f32>(dot(d0, one), dot(d1, one), dot(d2, one), dot(d3, one));
}

// acc += w.x * V[r] + ... + w.w * V[r + 3] over the keys where ok: a key that does not take
// part contributes nothing, not 0 * (its value), which is NaN when a masked future value is.
fn tile_accumulate_plain(r: u32, w: vec4<f32>, ok: vec4<bool>) {
    if (all(ok)) {
        for (var c4 = 0u; c4 < D4; c4++) {
            acc[c4] += w.x * tile_v[r * D4 + c4] + w.y * tile_v[(r + 1u) * D4 + c4]
                + w.z * tile_v[(r + 2u) * D4 + c4] + w.w * tile_v[(r + 3u) * D4 + c4];
        }
    } else if (any(ok)) {
        for (var c4 = 0u; c4 < D4; c4++) {
            var a = acc[c4];
            if (ok.x) { a += w.x * tile_v[r * D4 + c4]; }
            if (ok.y) { a += w.y * tile_v[(r + 1u) * D4 + c4]; }
            if (ok.z) { a += w.z * tile_v[(r + 2u) * D4 + c4]; }
            if (ok.w) { a += w.w * tile_v[(r + 3u) * D4 + c4]; }
            acc[c4] = a;
        }
    }
}

// Folds the first `count` staged keys into this invocation's row; only keys r < visible
// (causal limit) whose bias is not ABSENT take part. Two sweeps per tile (scores and their
// maximum, then weights and values) so the accumulator is rescaled once per tile, not per key.
// Every invocation of the workgroup runs every iteration (count is uniform; a key that does not
// take part is masked, not skipped): the subgroup variant needs all lanes of a subgroup
// together. An invocation that sees no key keeps its state (weights 0, correction 1).
fn consume_tile(count: u32, visible: u32) {
    let n_keys = min(count, visible);
    let groups = (count + 3u) / 4u;
    var s: array<vec4<f32>, (BK + 3u) / 4u>;
    var tile_max = ABSENT;
    for (var g = 0u; g < groups; g++) {
        let r = g * 4u;
        let ok = keys_ok(r, n_keys);
        let bias = vec4<f32>(tile_bias[min(r, BK - 1u)], tile_bias[min(r + 1u, BK - 1u)],
                             tile_bias[min(r + 2u, BK - 1u)], tile_bias[min(r + 3u, BK - 1u)]);
        // The softcap caps the score; a coarse key's count correction comes after.
        let masked = select(vec4<f32>(ABSENT), capped4(tile_dots(r, ok)) + bias, ok);
        s[g] = masked;
        tile_max = max(tile_max, max(max(masked.x, masked.y), max(masked.z, masked.w)));
    }
    let new_max = max(run_max, tile_max);
    let correction = exp(run_max - new_max);
    run_sum *= correction;
    for (var c4 = 0u; c4 < D4; c4++) {
        acc[c4] *= correction;
    }
    run_max = new_max;
    // The keep test repeats the first sweep's instead of looking at s, so that a NaN score
    // (a NaN in q or k) poisons this row as it would in dense attention rather than vanishing.
    for (var g = 0u; g < groups; g++) {
        let r = g * 4u;
        let ok = keys_ok(r, n_keys);
        let w = select(vec4<f32>(0.0), exp(s[g] - new_max), ok);
        run_sum += w.x + w.y + w.z + w.w;
        tile_accumulate(r, w, ok);
    }
}

