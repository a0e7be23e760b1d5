// The padding of a padded variable-length batch (`crate::Sequences::padded`): every row at or
// beyond its batch row's length gets O = 0 and LSE = -inf (no key is attended from it), so a
// caller never reads stale memory there. One invocation per row of O. Rows within the length
// are the attention passes' and are left alone. CPU mirror: the padding rows of
// `cpu::varlen::fma_forward_varlen`.

#import params
#import geometry
#import level_select
#import sequences

@group(0) @binding(6) var<storage, read_write> out: array<f32>;    // (batch, heads, n, d)
@group(0) @binding(7) var<storage, read_write> lse: array<f32>;    // (batch, heads, n)

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    // Padded rows have q_head_stride tokens; batch row b holds params.heads heads of them.
    let n_pad = params.q_head_stride;
    let row = dispatch_workgroup(wg) * WG + lid;
    if (row >= params.seqs * params.heads * n_pad) {
        return;
    }
    let b = row / (params.heads * n_pad);
    let i = row % n_pad;
    if (i < seq_table[b + 1u] - seq_table[b]) {
        return;
    }
    for (var c = 0u; c < params.d; c++) {
        out[row * params.d + c] = 0.0;
    }
    lse[row] = neg_inf(); // a store, no arithmetic on it
}
