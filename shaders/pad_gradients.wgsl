// The padding of a padded variable-length batch's backward (`crate::Sequences::padded`): every
// row at or beyond its batch row's length gets dQ = 0, dK = 0, dV = 0 (a padding token is
// neither attended nor attended from, so nothing depends on it), so a caller never reads stale
// memory there. One invocation per row of dQ (K/V rows are the first batch kv_heads n of them).
// Rows within the length are the gradient passes' and are left alone. Runs last. CPU mirror:
// the padding rows of `cpu::varlen::fma_backward_varlen`.

#import params
#import geometry
#import level_select
#import sequences

@group(0) @binding(1) var<storage, read_write> dq: array<f32>;   // (batch, heads, n, d)
@group(0) @binding(2) var<storage, read_write> dk: array<f32>;   // (batch, heads / kv_group, n, d)
@group(0) @binding(3) var<storage, read_write> dv: array<f32>;   // (batch, heads / kv_group, n, d)

// Zeros row `row` of `heads` heads per batch row if it is padding.
fn is_padding(row: u32, heads: u32) -> bool {
    let n_pad = params.q_head_stride;
    let b = row / (heads * n_pad);
    let i = row % n_pad;
    return i >= seq_word(b + 1u) - seq_word(b);
}

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let row = dispatch_workgroup(wg) * WG + lid;
    let d = params.d;
    let rows = params.seqs * params.heads * params.q_head_stride;
    if (row < rows && is_padding(row, params.heads)) {
        for (var c = 0u; c < d; c++) {
            dq[row * d + c] = 0.0;
        }
    }
    let kv_heads = params.heads / params.kv_group;
    if (row < params.seqs * kv_heads * params.q_head_stride && is_padding(row, kv_heads)) {
        for (var c = 0u; c < d; c++) {
            dk[row * d + c] = 0.0;
            dv[row * d + c] = 0.0;
        }
    }
}
