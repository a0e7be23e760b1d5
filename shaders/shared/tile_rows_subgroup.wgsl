// The tile reads of `online_softmax.wgsl` with subgroup operations (devices with
// Features::SUBGROUP; SG = the adapter's smallest subgroup size, prepended by `compose_for`).
// Every invocation needs the same staged key and value rows; instead of each one loading all
// D4 vec4s of a row, the lanes of a subgroup load one vec4 each (lane j: elements j, j + SG, ...)
// and pass them around with subgroupShuffle. Why: lavapipe turns every workgroup-memory load
// into a loop over its SIMD lanes, so this cuts the kernels' dominant cost by up to SG times;
// on a GPU it trades shared-memory bandwidth for shuffles.
// Correct for any subgroup size: a subgroup that does not have exactly SG active lanes (a
// workgroup smaller than SG, a partial last subgroup, a device whose subgroups are larger than
// its minimum) takes the plain path. All lanes of a subgroup call these functions together
// (online_softmax's loops are uniform over the workgroup), as shuffles require.

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
    // Unrolled by `compose_for`, for each c4 < D4 (t = c4 / SG, j = c4 % SG):
    //     d0 += q_row[c4] * subgroupBroadcast(k0[t], j); ... d3 likewise
    // (subgroupBroadcast needs a constant lane; with a computed one, subgroupShuffle, lavapipe
    // made the pass 1.4x slower than the plain one instead of 2x faster).
    //#unroll dots
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
    // Unrolled by `compose_for`, for each c4 < D4 (select, not w * v: a masked key's stale or
    // future value may be NaN):
    //     acc[c4] += select(zero, w.x * subgroupBroadcast(v0[t], j), ok.x) + ... (y, z, w)
    //#unroll accumulate
}
