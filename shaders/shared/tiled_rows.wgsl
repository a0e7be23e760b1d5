// The micro-tile sizes and row loads of the kernels in FlashAttention-2's shape
// (`fine_attention_tiled.wgsl`, `dense_tiled.wgsl`): a workgroup of THREADS =
// ceil(WG / TQ) * LANES invocations in row groups of LANES, each owning TQ query rows; K/V
// tiles of BK keys.
// CPU mirror: none (a schedule). Sizes: `plan::fine_tiled`, `plan::dense_tiled`.
// Needs from the importer: consts WG, BK, D4, TQ, LANES; bindings q, k, v.

const GROUPS: u32 = (WG + TQ - 1u) / TQ;      // row groups
const ROWS: u32 = GROUPS * TQ;                // WG rounded up to whole groups
const THREADS: u32 = GROUPS * LANES;
const TK: u32 = (BK + LANES - 1u) / LANES;    // scores per row and invocation per tile
const NV: u32 = (D4 + LANES - 1u) / LANES;    // output vec4 columns per row and invocation
const QS: u32 = D4 + 1u;                      // padded row stride of Q and K (vec4s)
const BK4: u32 = (BK + 3u) / 4u;              // a P row's vec4s
const PS: u32 = BK4 + 1u;                     // padded row stride of P (vec4s)

// The logit a lane reports for a row that saw a key in a tile, at least: above ABSENT / 2, so
// a row whose every visible score is NaN (a NaN in q or k; max() may drop NaNs) still counts
// as having seen a key, and its exp(NaN - max) poisons it as in dense attention. No real
// score is this low.
const SEEN: f32 = -1e29;

// The 4 elements of row `row` (element offset) of a (., d) tensor from vec4 column c4,
// zero-padded past d. Four scalar loads: the bindings are f32 arrays (d need not be a
// multiple of 4); neighbouring invocations take neighbouring vec4s, so the loads coalesce.
fn load_q4(row: u32, c4: u32, d: u32) -> vec4<f32> {
    var x = vec4<f32>(0.0);
    for (var e = 0u; e < 4u; e++) {
        let c = c4 * 4u + e;
        if (c < d) {
            x[e] = q[row + c];
        }
    }
    return x;
}

fn load_k4(row: u32, c4: u32, d: u32) -> vec4<f32> {
    var x = vec4<f32>(0.0);
    for (var e = 0u; e < 4u; e++) {
        let c = c4 * 4u + e;
        if (c < d) {
            x[e] = k[row + c];
        }
    }
    return x;
}

fn load_v4(row: u32, c4: u32, d: u32) -> vec4<f32> {
    var x = vec4<f32>(0.0);
    for (var e = 0u; e < 4u; e++) {
        let c = c4 * 4u + e;
        if (c < d) {
            x[e] = v[row + c];
        }
    }
    return x;
}

// Whether any element of x is infinite or NaN (by its exponent bits: WGSL implementations may
// assume finite floats, so no comparison of x with itself).
fn non_finite(x: vec4<f32>) -> bool {
    let e = bitcast<vec4<u32>>(x) & vec4<u32>(0x7f800000u);
    return any(e == vec4<u32>(0x7f800000u));
}
