// Per-level local attention at coarse resolution (algorithm.md §6, coarse queries): one
// workgroup = the p coarse queries (or a tile of WG of them) of one window a at one level; they
// share a's far list, so its coarse keys are staged once for all of them. Each coarse query
// writes its partial result as (o~ = Y / Z, lse~ = M + ln Z), which carries the same
// information as (max, sum, weighted value sum); (0, ABSENT) when the far list is empty.
// CPU mirror: `cpu::coarse` (the coarse-query arm of `cpu::fma_forward`).

#import params
#import level_select

@group(0) @binding(1) var<storage, read> q: array<f32>;            // coarse queries (bh, coarse_rows, d)
@group(0) @binding(4) var<storage, read> coarse_k: array<f32>;     // (bh, coarse_rows, d)
@group(0) @binding(5) var<storage, read> coarse_v: array<f32>;     // (bh, coarse_rows, d)
@group(0) @binding(6) var<storage, read_write> out: array<f32>;    // partial o~ (bh, coarse_rows, d)
@group(0) @binding(7) var<storage, read_write> lse: array<f32>;    // partial lse~ (bh, coarse_rows)

#import online_softmax
#import far_field

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let info = params.levels[sel.level];
    let p = params.p;
    let tiles = (p + WG - 1u) / WG;
    let per_head = info.windows * tiles;
    let wid = level_workgroup(wg);
    if (wid >= params.batch_heads * per_head) {
        return;
    }
    let bh = wid / per_head;
    let a = (wid % per_head) / tiles;
    let u = ((wid % per_head) % tiles) * WG + lid;
    let in_tile = u < p;
    // Rows of this level, in the concatenated per-head buffers.
    let head = (bh * params.coarse_rows + info.row_offset) * params.d;
    let r = a * p + u;

    begin_row(head, r, in_tile);
    // Coarse queries are bidirectional only (the config refuses causal + coarse).
    attend_far_list(bh, sel.level, i32(a), false, lid);

    if (in_tile) {
        if (run_sum > 0.0) {
            finish_row(head, bh * params.coarse_rows + info.row_offset + r, r);
        } else {
            for (var c = 0u; c < params.d; c++) {
                out[head + r * params.d + c] = 0.0;
            }
            lse[bh * params.coarse_rows + info.row_offset + r] = ABSENT;
        }
    }
}
