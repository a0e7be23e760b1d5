// Backward, step 1 (algorithm.md §8): D_i = rowsum(dO_i * O_i) for every query row, stored
// next to a copy of the saved LSE_i so the later passes read both from one binding (WebGPU
// allows 8 storage bindings per stage; the dQ pass needs the rest). One invocation per real
// row (a variable-length batch: per token of every sequence and head, `shared/problems.wgsl`).
// CPU mirror: `delta` in `cpu::backward::fma_backward`.

#import params
#import geometry
#import level_select
#import sequences

@group(0) @binding(1) var<storage, read> o: array<f32>;              // (bh, n, d)
@group(0) @binding(2) var<storage, read> dout: array<f32>;           // (bh, n, d)
@group(0) @binding(3) var<storage, read> lse: array<f32>;            // (bh, n)
@group(0) @binding(4) var<storage, read_write> stats: array<f32>;    // (bh, n, 2): LSE_i, D_i

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    // Rows [chunk_lo, chunk_hi) of every head (all of them, 0 and n, unless the head is split
    // across bindings: then the bound rows of one chunk, which start at global row row_base).
    let span = params.chunk_hi - params.chunk_lo;
    let at = locate(dispatch_workgroup(wg) * WG + lid, span, sec_tok(), query_heads());
    if (at.x == 0xffffffffu) {
        return;
    }
    let row = problem(at.x, at.y).q_row + params.chunk_lo + at.z - params.row_base;
    let d = params.d;
    let base = row * d;
    var acc = 0.0;
    for (var c = 0u; c < d; c++) {
        acc += dout[base + c] * o[base + c];
    }
    stats[2u * row] = lse[row];
    stats[2u * row + 1u] = acc;
}
