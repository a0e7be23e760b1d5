// Staged tile rows shared across a subgroup (devices with Features::SUBGROUP; SG = the
// adapter's smallest subgroup size, prepended by `compose_for`): the part of the subgroup
// variant that the forward's `tile_rows_subgroup.wgsl` and the backward's `dq_rows_subgroup.wgsl`
// and `dkv_rows_subgroup.wgsl` have in common.
// Every invocation of a workgroup needs the same staged rows; instead of each one loading all
// D4 vec4s of a row, the lanes of a subgroup load one vec4 each (lane j: elements j, j + SG, ...)
// and pass them around with subgroupBroadcast, written out per element by `compose_for` (the
// users' each_c4 templates). Why: lavapipe turns every workgroup-memory load into a loop over its
// SIMD lanes, so this cuts the kernels' dominant cost by up to SG times; on a GPU it trades
// shared-memory bandwidth for shuffles (docs/perf.md, change 5).
// Correct for any subgroup size: a subgroup that does not have exactly SG active lanes (a
// workgroup smaller than SG, a partial last subgroup, a device whose subgroups are larger than
// its minimum) takes the plain path, which each user keeps beside its subgroup one.
// Needs from the importer: consts BK, D4, SG.

// Row elements each lane loads: ceil(D4 / SG).
const SG_ROW: u32 = (D4 + SG - 1u) / SG;

var<private> sg_lane: u32;
var<private> sg_full: bool;

// Finds this invocation's lane and whether its subgroup is full. Uniform control flow.
fn tile_rows_begin() {
    sg_lane = subgroupExclusiveAdd(1u);
    sg_full = subgroupAdd(1u) == SG;
}

// Where this lane's t-th element of staged row `row` sits in a tile of BK rows of D4 vec4s
// (lane j holds elements j, j + SG, ...; clamped past the row's or the tile's end, where the
// values are never used). Each user reads its own tiles with it (`k_share` in
// `subgroup_key_rows.wgsl`, `q_share` in `dkv_rows_subgroup.wgsl`): WGSL passes no pointer to
// workgroup memory into a function.
fn share_index(row: u32, t: u32) -> u32 {
    return min(row, BK - 1u) * D4 + min(t * SG + sg_lane, D4 - 1u);
}
