// Fine keys at full resolution (level 0, and every key of the dense baseline): attending to a
// contiguous range of them, a tile at a time, with the causal mask.
// CPU mirror: the `SeenKey::Fine` arm of `cpu::fma_forward`, and `cpu::dense_attention`.
// Needs from the importer: key_tiles, online_softmax.

// Attends query row i (of a workgroup whose rows all share the range) to fine keys
// [t_lo, t_hi) of the head at element offset `head`, in tiles of BK; causal: keys t <= i only;
// WINDOW: keys in the row's window of a sequence of n keys only.
// t_lo, t_hi and causal must be uniform over the workgroup (barriers inside).
fn attend_fine_keys(head: u32, t_lo: u32, t_hi: u32, i: u32, n: u32, causal: bool, lid: u32) {
    let band = window_keys(i32(i), n);
    for (var t0 = t_lo; t0 < t_hi; t0 += BK) {
        let count = min(BK, t_hi - t0);
        workgroupBarrier();
        stage_fine_tile(head, t0, count, lid);
        workgroupBarrier();
        var visible = count;
        if (causal) {
            visible = select(0u, i - t0 + 1u, i >= t0);
        }
        if (WINDOW) {
            visible = window_tile(band, t0, visible);
        }
        consume_tile(count, visible);
    }
}
