// Decoding: after a step's passes, every sequence that took part is `chunk` tokens longer.
// Done on the GPU (not by the host writing the lengths) so that several steps recorded into
// one encoder before a submit each see their own positions. CPU mirror: `Decoder::len`.

#import decode_params
#import level_select

@group(0) @binding(1) var<storage, read_write> lens: array<u32>;      // (batch)

@compute @workgroup_size(WG)
fn main(@builtin(local_invocation_index) lid: u32) {
    for (var b = params.b_lo + lid; b < params.b_hi; b += WG) {
        lens[b] += params.chunk;
    }
}
