// consume_queries of `backward_dkv_fine.wgsl` with subgroup operations (devices with
// Features::SUBGROUP): the staged query rows (q, dO) shared across the subgroup by broadcasts
// (`subgroup_rows.wgsl` says why), four queries at a time, as the forward's
// `tile_rows_subgroup.wgsl` takes keys. All lanes of a subgroup call it together (start and
// count are uniform; first is not, so a query this key does not meet is masked, not skipped).

#import subgroup_rows

// Lane j's elements j, j + SG, ... of staged query row `row` (backward_queries.wgsl).
fn q_share(row: u32) -> array<vec4<f32>, SG_ROW> {
    var x: array<vec4<f32>, SG_ROW>;
    for (var t = 0u; t < SG_ROW; t++) {
        x[t] = tile_q[share_index(row, t)];
    }
    return x;
}

// The same for staged dO row `row`.
fn do_share(row: u32) -> array<vec4<f32>, SG_ROW> {
    var x: array<vec4<f32>, SG_ROW>;
    for (var t = 0u; t < SG_ROW; t++) {
        x[t] = tile_do[share_index(row, t)];
    }
    return x;
}

// Folds staged queries r < count whose position start + r is >= `first` into this key's sums:
// dK_t += dS_it q_i and dV_t += P_it dO_i, P_it = exp(q_i . k_t - LSE_i),
// dS_it = P_it (dO_i . v_t - D_i).
fn consume_queries(start: u32, count: u32, first: u32) {
    if (!sg_full) {
        consume_queries_plain(start, count, first);
        return;
    }
    let zero = vec4<f32>(0.0);
    let one = vec4<f32>(1.0);
    for (var r = 0u; r < count; r += 4u) {
        let rows = vec4<u32>(r, r + 1u, r + 2u, r + 3u);
        var ok = (rows < vec4<u32>(count)) & (vec4<u32>(start) + rows >= vec4<u32>(first));
        if (WINDOW) {
            ok = ok & (vec4<u32>(start) + rows < vec4<u32>(win_q_end));
        }
        // Rows past the tile's queries hold stale data: computed, then masked by ok (select,
        // not multiply: a masked row may be NaN).
        let q0 = q_share(r);
        let q1 = q_share(r + 1u);
        let q2 = q_share(r + 2u);
        let q3 = q_share(r + 3u);
        let o0 = do_share(r);
        let o1 = do_share(r + 1u);
        let o2 = do_share(r + 2u);
        let o3 = do_share(r + 3u);
        var s0 = zero;
        var s1 = zero;
        var s2 = zero;
        var s3 = zero;
        var g0 = zero;
        var g1 = zero;
        var g2 = zero;
        var g3 = zero;
        //#each_c4 s0 += k_row[{c4}] * subgroupBroadcast(q0[{t}], {j}u); s1 += k_row[{c4}] * subgroupBroadcast(q1[{t}], {j}u); s2 += k_row[{c4}] * subgroupBroadcast(q2[{t}], {j}u); s3 += k_row[{c4}] * subgroupBroadcast(q3[{t}], {j}u); g0 += v_row[{c4}] * subgroupBroadcast(o0[{t}], {j}u); g1 += v_row[{c4}] * subgroupBroadcast(o1[{t}], {j}u); g2 += v_row[{c4}] * subgroupBroadcast(o2[{t}], {j}u); g3 += v_row[{c4}] * subgroupBroadcast(o3[{t}], {j}u);
        let last = BK - 1u;
        let lse = vec4<f32>(tile_lse[min(r, last)], tile_lse[min(r + 1u, last)],
                            tile_lse[min(r + 2u, last)], tile_lse[min(r + 3u, last)]);
        let delta = vec4<f32>(tile_delta[min(r, last)], tile_delta[min(r + 1u, last)],
                              tile_delta[min(r + 2u, last)], tile_delta[min(r + 3u, last)]);
        // Softcap: P from the capped logit, dS through the cap's slope.
        let raw = vec4<f32>(dot(s0, one), dot(s1, one), dot(s2, one), dot(s3, one));
        let dp = vec4<f32>(dot(g0, one), dot(g1, one), dot(g2, one), dot(g3, one));
        let pr = select(zero, exp(capped4(raw) - lse), ok);
        let ds = select(zero, pr * (dp - delta) * cap_slope4(raw), ok);
        //#each_c4 dk_acc[{c4}] += select(zero, ds.x * subgroupBroadcast(q0[{t}], {j}u), ok.x) + select(zero, ds.y * subgroupBroadcast(q1[{t}], {j}u), ok.y) + select(zero, ds.z * subgroupBroadcast(q2[{t}], {j}u), ok.z) + select(zero, ds.w * subgroupBroadcast(q3[{t}], {j}u), ok.w); dv_acc[{c4}] += select(zero, pr.x * subgroupBroadcast(o0[{t}], {j}u), ok.x) + select(zero, pr.y * subgroupBroadcast(o1[{t}], {j}u), ok.y) + select(zero, pr.z * subgroupBroadcast(o2[{t}], {j}u), ok.z) + select(zero, pr.w * subgroupBroadcast(o3[{t}], {j}u), ok.w);
    }
}
