// One round of the tree that adds the Learned downsample pass's partial sums (downsample.wgsl:
// a level of more than `plan::POOL_TAPS` taps walks each coarse row's w_l taps in sel.arg0
// chunks, each writing its sum at pool_partials_at(tensor) + (head row * chunks + chunk) * d + c
// of its tensor's coarse buffer). Round of stride sel.arg1: one invocation per (tensor, head,
// coarse row, group, channel) adds the group's partials in the order of combine_tree.wgsl, into
// the group's first partial, or (last round) into the coarse row. Fixed by the plan
// (`plan::combine_rounds`): the same bits every run.
// CPU mirror: the Learned branch of `cpu::downsample` (the same sums, associated differently).

#import params
#import geometry
#import level_select
#import sequences
#import pool_units
#import combine_tree

@group(0) @binding(6) var<storage, read_write> coarse_k: array<f32>; // (bh / kv_group, coarse_rows, d), then the partials
@group(0) @binding(7) var<storage, read_write> coarse_v: array<f32>; // (bh / kv_group, coarse_rows, d), then the partials
@group(0) @binding(8) var<storage, read_write> coarse_q: array<f32>; // (bh, coarse_rows, d), then the partials

fn load(tensor: u32, idx: u32) -> f32 {
    if (tensor == 0u) {
        return coarse_k[idx];
    }
    if (tensor == 1u) {
        return coarse_v[idx];
    }
    return coarse_q[idx];
}

fn store(tensor: u32, idx: u32, x: f32) {
    if (tensor == 0u) {
        coarse_k[idx] = x;
    } else if (tensor == 1u) {
        coarse_v[idx] = x;
    } else {
        coarse_q[idx] = x;
    }
}

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let d = params.d;
    let chunks = sel.arg0;
    let stride = sel.arg1;
    let groups = tree_groups(chunks, stride);
    let pu = pool_unit(dispatch_workgroup(wg), lid, sel.level, d * groups);
    if (!pu.ok) {
        return;
    }
    let c = pu.rest % d;
    let g = pu.rest / d;
    let at = pool_partials_at(pu.tensor) + pu.hr * chunks * d + c;
    var s = 0.0;
    for (var i = 0u; i < FAN_IN; i++) {
        let k = tree_member(g, i, stride);
        if (k < chunks) {
            //#rows(1u, select(0u, 1u, c == 0u))
            s += load(pu.tensor, at + k * d);
        }
    }
    var to = at + tree_member(g, 0u, stride) * d;
    if (tree_last(chunks, stride)) {
        to = coarse_row(pu.crow, sel.level, pu.seq, pu.row) * d + c;
    }
    store(pu.tensor, to, s);
}
