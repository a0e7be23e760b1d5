// Decoding (algorithm.md §10): a step's queries attend to the cache after decode_ingest.wgsl
// has put the step's tokens into it (shared/decode_attend.wgsl: the near ring and every
// level's far list, one workgroup per (head row, query)). Used where the attention cannot
// share the upkeep's pass (decode_step.wgsl): Learned pooling (its weights take two more
// bindings than a pass may have) or a chunk longer than m + 1 tokens, whose queries may read a
// window completed in the same step. CPU mirror: `cpu::decode::Decoder::attend`.

#import decode_params
#import level_select

@group(0) @binding(1) var<storage, read> q: array<f32>;             // (query rows, in_rows, d)
@group(0) @binding(2) var<storage, read> lens: array<u32>;          // (2, batch)
@group(0) @binding(3) var<storage, read> ring: array<f32>;          // (group rows, 2, R, d)
@group(0) @binding(4) var<storage, read> coarse: array<f32>;        // (group rows, 2, levels, slots, p, d)
@group(0) @binding(5) var<storage, read_write> out: array<f32>;     // (query rows, chunk, d)
@group(0) @binding(6) var<storage, read_write> lse: array<f32>;     // (query rows, chunk)

#import decode_softmax
#import decode_attend

// Read-only storage: uniform as it is.
fn row_start(seq: u32, lid: u32) -> u32 {
    return lens[params.lens_in + seq];
}

// Every near key and value is in the ring (the upkeep ran before).
fn near_at(local: u32, bh: u32, kv: u32, t: u32, start: u32) -> u32 {
    return ring_at(local, kv, t);
}

fn near4(at: u32, kv: u32, c4: u32) -> vec4<f32> {
    return ring4(at, c4);
}

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    attend(dispatch_workgroup(wg), lid);
}
