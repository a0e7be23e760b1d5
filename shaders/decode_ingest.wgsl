// Decoding (algorithm.md §10): a record's cache upkeep in one pass (shared/decode_cache.wgsl:
// the ring, the coarse slots, the lengths), one invocation per unit; a prefill's chunks, and
// the step before an attention that cannot share its pass (decode_attention.wgsl, the dense
// passes). CPU mirror: `cpu::decode::Decoder::append` and `pool`.

#import decode_params
#import level_select

@group(0) @binding(1) var<storage, read> k: array<f32>;             // (cache rows, in_rows, d)
@group(0) @binding(2) var<storage, read> v: array<f32>;             // (cache rows, in_rows, d)
@group(0) @binding(3) var<storage, read_write> lens: array<u32>;    // (2, batch)
@group(0) @binding(4) var<storage, read_write> ring: array<f32>;    // (group rows, 2, R, d)
@group(0) @binding(5) var<storage, read_write> coarse: array<f32>;  // (group rows, 2, levels, slots, p, d)
// Learned weights [keys | values | queries] of every level ((d, p, w_l) each, weight_stride
// apart), biases likewise ((d, p) each); 16-byte dummies in Average mode.
@group(0) @binding(6) var<storage, read> weights: array<f32>;
@group(0) @binding(7) var<storage, read> biases: array<f32>;

#import decode_cache

fn learned_weight(i: u32) -> f32 {
    return weights[i];
}

fn learned_bias(i: u32) -> f32 {
    return biases[i];
}

// Which units this pipeline runs, fixed at composition by its specialisation's BK (no decode
// pass stages key tiles; `plan::decode::UPKEEP_*`): every unit (one dispatch: a GPU's), or one
// role alone (a dispatch per role: a CPU adapter's; the lengths ride with the ring). llvmpipe runs both sides of a branch under
// a lane mask unless the condition is a constant, so there one pipeline for the three roles
// made every invocation pay for all three; a constant condition leaves only its role's code.
const UPKEEP_ALL: u32 = 1u;
const UPKEEP_RING_LENS: u32 = 2u; // the ring's units, then the lengths' (each a copy or two)
const UPKEEP_SLOTS: u32 = 3u;

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let g = dispatch_workgroup(wg) * WG + lid;
    if (BK == UPKEEP_RING_LENS) {
        let a = append_units();
        if (g < a) {
            append_one(g);
        } else if (g < a + params.lens_count) {
            advance_one(g - a);
        }
    } else if (BK == UPKEEP_SLOTS) {
        if (g < pool_units()) {
            pool_one(g);
        }
    } else if (g < upkeep_units()) {
        upkeep(g);
    }
}
