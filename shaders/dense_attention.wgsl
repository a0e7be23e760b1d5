// Exact dense attention, softmax(Q K^T / sqrt(d)) V, the yardstick for FMA: the same tiled
// online softmax as the FMA pass (one invocation per query row, keys in tiles of BK staged in
// workgroup memory), over every key (causal: keys t <= i). CPU mirror: `cpu::dense_attention`.

#import params

@group(0) @binding(1) var<storage, read> q: array<f32>;            // (bh, n, d)
@group(0) @binding(2) var<storage, read> k: array<f32>;            // (bh, n, d)
@group(0) @binding(3) var<storage, read> v: array<f32>;            // (bh, n, d)
@group(0) @binding(6) var<storage, read_write> out: array<f32>;    // (bh, n, d)
@group(0) @binding(7) var<storage, read_write> lse: array<f32>;    // (bh, n)

#import online_softmax
#import near_field

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let wid = linear_workgroup(wg);
    if (wid >= params.total_workgroups) {
        return;
    }
    let n = params.n;
    let tiles = params.tiles_per_block;
    let bh = wid / tiles;
    let i0 = (wid % tiles) * WG;
    let i1 = min(i0 + WG, n);
    let i = i0 + lid;
    let in_tile = i < i1;
    let head = bh * n * params.d;
    let causal = params.causal != 0u;

    begin_row(head, i, in_tile);
    let t_hi = select(n, i1, causal);
    attend_fine_keys(head, 0u, t_hi, i, causal, lid);
    if (in_tile) {
        finish_row(head, bh * n + i, i);
    }
}
