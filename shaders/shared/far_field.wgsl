// The far field of a fine block (fine queries): every level's far-list coarse keys of block a0
// in one sequence (`coarse_tiles.wgsl`), staged BK at a time, so a block pays two barriers and
// one rescale per BK coarse keys instead of per run of at most 2p keys (2 runs x L levels).
// CPU mirror: the `SeenKey::Coarse` arm of `cpu::fma_forward`.
// Needs from the importer: key_tiles, online_softmax, geometry, sequences; bindings coarse_k,
// coarse_v. The problem `pr` gives the sequence's length and its K/V head's coarse rows.

#import coarse_tiles

// Attends to every level's far list of fine block a0 (levels 1..`levels`) of problem pr,
// gathered, from its K/V head's coarse rows.
// Arguments uniform over the workgroup (barriers inside).
fn attend_far_field(pr: Problem, a0: u32, causal: bool, levels: u32, lid: u32) {
    let total = far_total(pr, a0, causal, levels);
    for (var g0 = 0u; g0 < total; g0 += BK) {
        let count = min(BK, total - g0);
        workgroupBarrier();
        stage_far_gathered(pr, a0, causal, g0, count, lid);
        workgroupBarrier();
        consume_tile(count, count);
    }
}
