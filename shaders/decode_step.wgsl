// Decoding (algorithm.md §10): a whole FMA step in one pass. Workgroups [0, A) attend, one per
// (head row, query) (shared/decode_attend.wgsl), the others do the cache upkeep
// (shared/decode_cache.wgsl), all at once: the step's own near keys and values are read from
// the step's K, V rather than from the ring (the same bits), the ring slots written hold
// tokens no query of the step reads (R = 2m - 1 + max_chunk), and the coarse windows written
// are not read by the step's queries when the chunk has at most m + 1 tokens (a query at i
// reads windows up to i / w - 2 < start / w at every level, w >= m), which is when the plan
// runs this pass; the lengths are written into the half this record does not read. Average
// pooling only (Learned weights would take two bindings beyond WebGPU's 8 storage bindings per
// pass: those steps run decode_ingest + decode_attention). CPU mirror:
// `cpu::decode::Decoder::step`.

#import decode_params
#import level_select

@group(0) @binding(1) var<storage, read> q: array<f32>;             // (query rows, in_rows, d)
@group(0) @binding(2) var<storage, read> k: array<f32>;             // (cache rows, in_rows, d)
@group(0) @binding(3) var<storage, read> v: array<f32>;             // (cache rows, in_rows, d)
@group(0) @binding(4) var<storage, read_write> lens: array<u32>;    // (2, batch)
@group(0) @binding(5) var<storage, read_write> ring: array<f32>;    // (group rows, 2, R, d)
@group(0) @binding(6) var<storage, read_write> coarse: array<f32>;  // (group rows, 2, levels, slots, p, d)
@group(0) @binding(7) var<storage, read_write> out: array<f32>;     // (query rows, chunk, d)
@group(0) @binding(8) var<storage, read_write> lse: array<f32>;     // (query rows, chunk)

#import decode_softmax
#import decode_attend
#import decode_cache

// A near row in the step's K, V (bit 30 of near_at's offset) rather than the ring.
const INPUT_ROW: u32 = 0x40000000u;

var<workgroup> start_shared: u32;

// Read once and shared: `lens` is writable in this pass, so its loads are not uniform.
fn row_start(seq: u32, lid: u32) -> u32 {
    if (lid == 0u) {
        start_shared = start_of(seq);
    }
    return workgroupUniformLoad(&start_shared);
}

// Tokens of this step come from its K, V (the upkeep writes them into the ring meanwhile).
fn near_at(local: u32, bh: u32, kv: u32, t: u32, start: u32) -> u32 {
    if (t >= start) {
        return input_at(bh, t - start) | INPUT_ROW;
    }
    return ring_at(local, kv, t);
}

fn input4(at: u32, kv: u32, c4: u32) -> vec4<f32> {
    let b = at + c4 * 4u;
    let rem = params.d - c4 * 4u;
    if (kv == 0u) {
        return vec4<f32>(k[b], select(0.0, k[b + 1u], rem > 1u),
                         select(0.0, k[b + 2u], rem > 2u), select(0.0, k[b + 3u], rem > 3u));
    }
    return vec4<f32>(v[b], select(0.0, v[b + 1u], rem > 1u),
                     select(0.0, v[b + 2u], rem > 2u), select(0.0, v[b + 3u], rem > 3u));
}

fn near4(at: u32, kv: u32, c4: u32) -> vec4<f32> {
    if ((at & INPUT_ROW) != 0u) {
        return input4(at & ~INPUT_ROW, kv, c4);
    }
    return ring4(at, c4);
}

// Average pooling only (see above): never called.
fn learned_weight(i: u32) -> f32 {
    return 0.0;
}

fn learned_bias(i: u32) -> f32 {
    return 0.0;
}

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let wid = dispatch_workgroup(wg);
    let attending = params.group_rows * params.qgroup * params.chunk;
    if (wid < attending) {
        attend(wid, lid);
    } else {
        let g = (wid - attending) * WG + lid;
        if (g < upkeep_units()) {
            upkeep(g);
        }
    }
}
