// This lane's shares of the staged key and value rows (`key_tiles.wgsl`), for the subgroup
// variants of the forward (`tile_rows_subgroup.wgsl`) and of the dQ pass
// (`dq_rows_subgroup.wgsl`); `subgroup_rows.wgsl` says how the lanes split a row.

#import subgroup_rows

// Lane j's elements j, j + SG, ... of staged key row `row`.
fn k_share(row: u32) -> array<vec4<f32>, SG_ROW> {
    var x: array<vec4<f32>, SG_ROW>;
    for (var t = 0u; t < SG_ROW; t++) {
        x[t] = tile_k[share_index(row, t)];
    }
    return x;
}

// The same for staged value row `row`.
fn v_share(row: u32) -> array<vec4<f32>, SG_ROW> {
    var x: array<vec4<f32>, SG_ROW>;
    for (var t = 0u; t < SG_ROW; t++) {
        x[t] = tile_v[share_index(row, t)];
    }
    return x;
}
