// consume_tile of `online_softmax.wgsl` with subgroup operations (devices with
// Features::SUBGROUP; SG = the adapter's smallest subgroup size, prepended by `compose_for`).
// Every invocation needs the same staged key and value rows; instead of each one loading all
// D4 vec4s of a row, the lanes of a subgroup load one vec4 each (lane j: elements j, j + SG, ...)
// and pass them around with subgroupBroadcast. Why: lavapipe turns every workgroup-memory load
// into a loop over its SIMD lanes, so this cuts the kernels' dominant cost by up to SG times;
// on a GPU it trades shared-memory bandwidth for shuffles.
// Correct for any subgroup size: a subgroup that does not have exactly SG active lanes (a
// workgroup smaller than SG, a partial last subgroup, a device whose subgroups are larger than
// its minimum) takes the plain path. All lanes of a subgroup call these functions together
// (consume_tile's loops are uniform over the workgroup), as broadcasts require.

// Row elements each lane loads: ceil(D4 / SG).
const SG_ROW: u32 = (D4 + SG - 1u) / SG;

var<private> sg_lane: u32;
var<private> sg_full: bool;

// Finds this invocation's lane and whether its subgroup is full. Uniform control flow.
fn tile_rows_begin() {
    sg_lane = subgroupExclusiveAdd(1u);
    sg_full = subgroupAdd(1u) == SG;
}

// This lane's share of staged row `row` of tile_k (lane j holds elements j, j + SG, ...;
// clamped reads past the row's end are never used).
fn k_share(row: u32) -> array<vec4<f32>, SG_ROW> {
    var x: array<vec4<f32>, SG_ROW>;
    let base = min(row, BK - 1u) * D4;
    for (var t = 0u; t < SG_ROW; t++) {
        x[t] = tile_k[base + min(t * SG + sg_lane, D4 - 1u)];
    }
    return x;
}

// The same for tile_v.
fn v_share(row: u32) -> array<vec4<f32>, SG_ROW> {
    var x: array<vec4<f32>, SG_ROW>;
    let base = min(row, BK - 1u) * D4;
    for (var t = 0u; t < SG_ROW; t++) {
        x[t] = tile_v[base + min(t * SG + sg_lane, D4 - 1u)];
    }
    return x;
}

// Dot products of row rho's q with staged keys r .. r + 3, for every row rho < QR, where
// ok (any row's keys; elsewhere the result is not used).
fn tile_dots(r: u32, ok: vec4<bool>) -> array<vec4<f32>, QR> {
    if (!sg_full) {
        return tile_dots_plain(r, ok);
    }
    // Rows past the tile's keys hold stale data: their dots are computed and masked by ok
    // (select, not multiply), so every lane takes part in every shuffle.
    let k0 = k_share(r);
    let k1 = k_share(r + 1u);
    let k2 = k_share(r + 2u);
    let k3 = k_share(r + 3u);
    var d0: array<vec4<f32>, QR>;
    var d1: array<vec4<f32>, QR>;
    var d2: array<vec4<f32>, QR>;
    var d3: array<vec4<f32>, QR>;
    // Unrolled by `compose_for`, for each c4 < D4 (t = c4 / SG, j = c4 % SG):
    //     let b0 = subgroupBroadcast(k0[t], j); ... b3 likewise;
    //     d0[rho] += q_row[rho * D4 + c4] * b0; ... d3 likewise, for each rho < QR
    // (subgroupBroadcast needs a constant lane; with a computed one, subgroupShuffle, lavapipe
    // made the pass 1.4x slower than the plain one instead of 2x faster). Each broadcast
    // element serves the QR rows of the lane.
    //#unroll dots
    let one = vec4<f32>(1.0);
    var out: array<vec4<f32>, QR>;
    for (var rho = 0u; rho < QR; rho++) {
        out[rho] = vec4<f32>(dot(d0[rho], one), dot(d1[rho], one), dot(d2[rho], one),
                             dot(d3[rho], one));
    }
    return out;
}

// acc of row rho += w[rho].x * V[r] + ... + w[rho].w * V[r + 3] over the keys where ok[rho].
fn tile_accumulate(r: u32, w: array<vec4<f32>, QR>, ok: array<vec4<bool>, QR>) {
    if (!sg_full) {
        tile_accumulate_plain(r, w, ok);
        return;
    }
    let v0 = v_share(r);
    let v1 = v_share(r + 1u);
    let v2 = v_share(r + 2u);
    let v3 = v_share(r + 3u);
    let zero = vec4<f32>(0.0);
    // Unrolled by `compose_for`, for each c4 < D4 (select, not w * v: a masked key's stale or
    // future value may be NaN):
    //     let b0 = subgroupBroadcast(v0[t], j); ... b3 likewise;
    //     acc[rho * D4 + c4] += select(zero, w[rho].x * b0, ok[rho].x) + ... (y, z, w)
    //#unroll accumulate
}

// The plain path of a subgroup that is not full.

// key_ok of keys r .. r + 3.
fn keys_ok(r: u32, n_keys: u32) -> vec4<bool> {
    return vec4<bool>(key_ok(r, n_keys), key_ok(r + 1u, n_keys), key_ok(r + 2u, n_keys),
                      key_ok(r + 3u, n_keys));
}

// Dot products of this invocation's rows with staged keys r .. r + 3, where ok (elsewhere
// the result is not used). Keys go four at a time: each q_row element is loaded once per four
// keys instead of once per key (register blocking; lavapipe keeps these per-invocation arrays
// in memory).
fn tile_dots_plain(r: u32, ok: vec4<bool>) -> array<vec4<f32>, QR> {
    var d0: array<vec4<f32>, QR>;
    var d1: array<vec4<f32>, QR>;
    var d2: array<vec4<f32>, QR>;
    var d3: array<vec4<f32>, QR>;
    if (all(ok)) {
        for (var c4 = 0u; c4 < D4; c4++) {
            let k0 = tile_k[r * D4 + c4];
            let k1 = tile_k[(r + 1u) * D4 + c4];
            let k2 = tile_k[(r + 2u) * D4 + c4];
            let k3 = tile_k[(r + 3u) * D4 + c4];
            for (var rho = 0u; rho < QR; rho++) {
                let x = q_row[rho * D4 + c4];
                d0[rho] += x * k0;
                d1[rho] += x * k1;
                d2[rho] += x * k2;
                d3[rho] += x * k3;
            }
        }
    } else if (any(ok)) {
        // A partial group (tile end, causal diagonal, empty sub-window): key by key.
        for (var c4 = 0u; c4 < D4; c4++) {
            for (var rho = 0u; rho < QR; rho++) {
                let x = q_row[rho * D4 + c4];
                if (ok.x) { d0[rho] += x * tile_k[r * D4 + c4]; }
                if (ok.y) { d1[rho] += x * tile_k[(r + 1u) * D4 + c4]; }
                if (ok.z) { d2[rho] += x * tile_k[(r + 2u) * D4 + c4]; }
                if (ok.w) { d3[rho] += x * tile_k[(r + 3u) * D4 + c4]; }
            }
        }
    }
    let one = vec4<f32>(1.0);
    var out: array<vec4<f32>, QR>;
    for (var rho = 0u; rho < QR; rho++) {
        out[rho] = vec4<f32>(dot(d0[rho], one), dot(d1[rho], one), dot(d2[rho], one),
                             dot(d3[rho], one));
    }
    return out;
}

// acc of row rho += w[rho].x * V[r] + ... over the keys where ok[rho]: a key that does not
// take part contributes nothing, not 0 * (its value), which is NaN when a masked future value
// is.
fn tile_accumulate_plain(r: u32, w: array<vec4<f32>, QR>, ok: array<vec4<bool>, QR>) {
    for (var rho = 0u; rho < QR; rho++) {
        let o = ok[rho];
        let wr = w[rho];
        if (all(o)) {
            for (var c4 = 0u; c4 < D4; c4++) {
                acc[rho * D4 + c4] += wr.x * tile_v[r * D4 + c4] + wr.y * tile_v[(r + 1u) * D4 + c4]
                    + wr.z * tile_v[(r + 2u) * D4 + c4] + wr.w * tile_v[(r + 3u) * D4 + c4];
            }
        } else if (any(o)) {
            for (var c4 = 0u; c4 < D4; c4++) {
                var a = acc[rho * D4 + c4];
                if (o.x) { a += wr.x * tile_v[r * D4 + c4]; }
                if (o.y) { a += wr.y * tile_v[(r + 1u) * D4 + c4]; }
                if (o.z) { a += wr.z * tile_v[(r + 2u) * D4 + c4]; }
                if (o.w) { a += wr.w * tile_v[(r + 3u) * D4 + c4]; }
                acc[rho * D4 + c4] = a;
            }
        }
    }
}

// Folds the first `count` staged keys into this invocation's rows; only keys r < visible[rho]
// (causal limit of row rho) whose bias is not ABSENT take part. Two sweeps per tile (scores and
// their maximum, then weights and values) so each accumulator is rescaled once per tile, not
// per key. Every invocation of the workgroup runs every iteration (count is uniform; a key that
// does not take part is masked, not skipped): the subgroup variant needs all lanes of a
// subgroup together. A row that sees no key keeps its state (weights 0, correction 1).
fn consume_tile(count: u32, visible: array<u32, QR>) {
    var n_keys: array<u32, QR>;
    for (var rho = 0u; rho < QR; rho++) {
        n_keys[rho] = min(count, visible[rho]);
    }
    let groups = (count + 3u) / 4u;
    const G: u32 = (BK + 3u) / 4u;
    var s: array<vec4<f32>, QR * G>;
    var tile_max: array<f32, QR>;
    for (var rho = 0u; rho < QR; rho++) {
        tile_max[rho] = ABSENT;
    }
    for (var g = 0u; g < groups; g++) {
        let r = g * 4u;
        var ok: array<vec4<bool>, QR>;
        var any_ok = vec4<bool>(false);
        for (var rho = 0u; rho < QR; rho++) {
            ok[rho] = keys_ok(r, n_keys[rho]);
            any_ok = any_ok | ok[rho];
        }
        let bias = vec4<f32>(tile_bias[min(r, BK - 1u)], tile_bias[min(r + 1u, BK - 1u)],
                             tile_bias[min(r + 2u, BK - 1u)], tile_bias[min(r + 3u, BK - 1u)]);
        let dots = tile_dots(r, any_ok);
        for (var rho = 0u; rho < QR; rho++) {
            let masked = select(vec4<f32>(ABSENT), dots[rho] + bias, ok[rho]);
            s[rho * G + g] = masked;
            tile_max[rho] = max(tile_max[rho],
                                max(max(masked.x, masked.y), max(masked.z, masked.w)));
        }
    }
    for (var rho = 0u; rho < QR; rho++) {
        let new_max = max(run_max[rho], tile_max[rho]);
        let correction = exp(run_max[rho] - new_max);
        run_sum[rho] *= correction;
        for (var c4 = 0u; c4 < D4; c4++) {
            acc[rho * D4 + c4] *= correction;
        }
        run_max[rho] = new_max;
    }
    // The keep test repeats the first sweep's instead of looking at s, so that a NaN score
    // (a NaN in q or k) poisons this row as it would in dense attention rather than vanishing.
    for (var g = 0u; g < groups; g++) {
        let r = g * 4u;
        var ok: array<vec4<bool>, QR>;
        var w: array<vec4<f32>, QR>;
        for (var rho = 0u; rho < QR; rho++) {
            ok[rho] = keys_ok(r, n_keys[rho]);
            w[rho] = select(vec4<f32>(0.0), exp(s[rho * G + g] - run_max[rho]), ok[rho]);
            run_sum[rho] += w[rho].x + w[rho].y + w[rho].z + w[rho].w;
        }
        tile_accumulate(r, w, ok);
    }
}
