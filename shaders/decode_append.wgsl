// Decoding (algorithm.md §10), step 1 of 3: the chunk's keys and values enter the near-field
// ring of their head, token t in slot t mod R (only the last R tokens of a longer chunk: the
// earlier ones would be overwritten before any query reads them). One invocation per
// (head row of the group, token, channel). CPU mirror: `cpu::decode::Decoder::append`.

#import decode_params
#import level_select

@group(0) @binding(1) var<storage, read> k: array<f32>;             // (cache rows, in_rows, d)
@group(0) @binding(2) var<storage, read> v: array<f32>;             // (cache rows, in_rows, d)
@group(0) @binding(3) var<storage, read> lens: array<u32>;          // (batch): tokens so far
@group(0) @binding(4) var<storage, read_write> ring: array<f32>;    // (group rows, 2, R, d)

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let d = params.d;
    let g = dispatch_workgroup(wg) * WG + lid;
    if (g >= params.group_rows * params.chunk * d) {
        return;
    }
    let ch = g % d;
    let c = (g / d) % params.chunk;
    let local = g / (d * params.chunk);
    let bh = params.bh_base + local;
    let b = bh / params.heads;
    if (b < params.b_lo || b >= params.b_hi || c + params.ring < params.chunk) {
        return;
    }
    let t = lens[b] + c;
    let src = input_at(bh, c) + ch;
    ring[ring_at(local, 0u, t) + ch] = k[src];
    ring[ring_at(local, 1u, t) + ch] = v[src];
}
