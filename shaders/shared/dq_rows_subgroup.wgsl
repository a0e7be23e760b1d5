// consume_keys of `backward_dq.wgsl` with subgroup operations (devices with Features::SUBGROUP):
// the staged key and value rows shared across the subgroup by broadcasts (`subgroup_rows.wgsl`
// says why), four keys at a time, as the forward's `tile_rows_subgroup.wgsl`. All lanes of a
// subgroup call it together (count is uniform; visible is not, so a key this row does not see
// is masked, not skipped).

#import subgroup_key_rows

// Folds the first min(count, visible) staged keys into this row's dQ:
// dQ_i += dS_ij k_j with dS_ij = P_ij (dO_i . v_j - D_i), P_ij = exp(q_i . k_j + bias_j - LSE_i).
fn consume_keys(count: u32, visible: u32) {
    if (!sg_full) {
        consume_keys_plain(count, visible);
        return;
    }
    let n_keys = min(count, visible);
    let zero = vec4<f32>(0.0);
    let one = vec4<f32>(1.0);
    for (var r = 0u; r < count; r += 4u) {
        let bias = vec4<f32>(tile_bias[min(r, BK - 1u)], tile_bias[min(r + 1u, BK - 1u)],
                             tile_bias[min(r + 2u, BK - 1u)], tile_bias[min(r + 3u, BK - 1u)]);
        var ok = (vec4<u32>(r, r + 1u, r + 2u, r + 3u) < vec4<u32>(n_keys))
            & (bias > vec4<f32>(ABSENT * 0.5));
        if (WINDOW) {
            ok = ok & (vec4<u32>(r, r + 1u, r + 2u, r + 3u) >= vec4<u32>(win_first));
        }
        // Rows past the tile's keys hold stale data: computed, then masked by ok (select, not
        // multiply: a masked key's stale or future row may be NaN).
        let k0 = k_share(r);
        let k1 = k_share(r + 1u);
        let k2 = k_share(r + 2u);
        let k3 = k_share(r + 3u);
        let v0 = v_share(r);
        let v1 = v_share(r + 1u);
        let v2 = v_share(r + 2u);
        let v3 = v_share(r + 3u);
        var s0 = zero;
        var s1 = zero;
        var s2 = zero;
        var s3 = zero;
        var g0 = zero;
        var g1 = zero;
        var g2 = zero;
        var g3 = zero;
        //#each_c4 s0 += q_row[{c4}] * subgroupBroadcast(k0[{t}], {j}u); s1 += q_row[{c4}] * subgroupBroadcast(k1[{t}], {j}u); s2 += q_row[{c4}] * subgroupBroadcast(k2[{t}], {j}u); s3 += q_row[{c4}] * subgroupBroadcast(k3[{t}], {j}u); g0 += do_row[{c4}] * subgroupBroadcast(v0[{t}], {j}u); g1 += do_row[{c4}] * subgroupBroadcast(v1[{t}], {j}u); g2 += do_row[{c4}] * subgroupBroadcast(v2[{t}], {j}u); g3 += do_row[{c4}] * subgroupBroadcast(v3[{t}], {j}u);
        // Softcap: the cap before the count correction (bias), dS through its slope.
        let raw = vec4<f32>(dot(s0, one), dot(s1, one), dot(s2, one), dot(s3, one));
        let s = capped4(raw) + bias;
        let dp = vec4<f32>(dot(g0, one), dot(g1, one), dot(g2, one), dot(g3, one));
        let ds = select(zero, exp(s - row_lse) * (dp - row_delta) * cap_slope4(raw), ok);
        //#each_c4 dq_acc[{c4}] += select(zero, ds.x * subgroupBroadcast(k0[{t}], {j}u), ok.x) + select(zero, ds.y * subgroupBroadcast(k1[{t}], {j}u), ok.y) + select(zero, ds.z * subgroupBroadcast(k2[{t}], {j}u), ok.z) + select(zero, ds.w * subgroupBroadcast(k3[{t}], {j}u), ok.w);
    }
}
