// Backward, one round of the tree that adds the coarse dK~/dV~ pass's partial sums
// (backward_dkv_coarse.wgsl: a coarse row's readers, 3 w_l queries at level l, walked in chunks
// of sel.arg1 by separate workgroups, each writing its chunk's sums after dK~'s and dV~'s rows,
// at params.partials_at + (u * chunks + k) * d for row u and chunk k).
// Round r (stride F^r, F = FAN_IN): one invocation per (row u, group g, vec4 of channels) adds
// the partials g F^(r+1) + i F^r, i = 0 .. F - 1 (those below the row's chunks), in increasing
// i, into partial g F^(r+1); the last round (F^(r+1) >= chunks) writes the row of dK~ and dV~
// itself. The tree is fixed by the plan (`plan::combine_rounds`), not by timing: the same bits
// every run; each invocation reads at most F partials, so a round's chain does not grow with n
// and the rounds grow as log_F of the chunks.
// CPU mirror: the `Slot::Coarse` sums in `cpu::backward::fma_backward_in` (the same sums,
// associated differently).

#import params
#import geometry
#import level_select
#import combine_tree
#import sequences

@group(0) @binding(1) var<storage, read_write> dcoarse_k: array<f32>;    // (bh / kv_group, coarse_rows, d), then the partials
@group(0) @binding(2) var<storage, read_write> dcoarse_v: array<f32>;    // (bh / kv_group, coarse_rows, d), then the partials


@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let info = params.levels[sel.level];
    let p = params.p;
    let d = params.d;
    let chunks = sel.arg0;
    let stride = sel.arg1;
    let span = tree_span(stride);
    let groups = tree_groups(chunks, stride);
    let idx = dispatch_workgroup(wg) * WG + lid;
    let c0 = (idx % D4) * 4u;
    let g = (idx / D4) % groups;
    // A group of the level's rows (params.dkv_row_lo; dkv_rows = 0: the whole level), whose
    // partials start at partials_at: row u is the group's row u - dkv_row_lo.
    let gu = idx / (D4 * groups);
    if (params.dkv_rows != 0u && gu >= params.dkv_rows) {
        return;
    }
    let u = gu + params.dkv_row_lo;
    // Row u of the level over the K/V heads (and a variable-length batch's sequences), as the
    // coarse dK~/dV~ pass numbers its rows.
    let at = locate(u, info.windows * p, sec_rows(sel.level), query_heads() / params.kv_group);
    if (at.x == 0xffffffffu) {
        return;
    }
    let first = g * span;
    var sk = vec4<f32>(0.0);
    var sv = vec4<f32>(0.0);
    for (var i = 0u; i < FAN_IN; i++) {
        let k = first + i * stride;
        if (k < chunks) {
            //#rows(2u, select(0u, 2u, c0 == 0u))
            let src_at = params.partials_at + (gu * chunks + k) * d + c0;
            for (var e = 0u; e < 4u; e++) {
                if (c0 + e < d) {
                    sk[e] += dcoarse_k[src_at + e];
                    sv[e] += dcoarse_v[src_at + e];
                }
            }
        }
    }
    var to = params.partials_at + (gu * chunks + first) * d + c0;
    if (span >= chunks) {
        let kpr = problem(at.x * params.kv_group, at.y);
        to = coarse_row(kpr.kv_crow, sel.level, kpr.s, at.z) * d + c0;
    }
    for (var e = 0u; e < 4u; e++) {
        if (c0 + e < d) {
            dcoarse_k[to + e] = sk[e];
            dcoarse_v[to + e] = sv[e];
        }
    }
}
