// Fine keys at full resolution (level 0, and every key of the dense baseline): staging tiles
// of K and V rows and attending to a contiguous range of them, with the causal mask.
// CPU mirror: the `SeenKey::Fine` arm of `cpu::fma_forward`, and `cpu::dense_attention`.
// Needs from the importer: online_softmax; bindings k, v.

// Stages fine keys/values [start, start + count) of the head at element offset `head`
// (count <= BK), zero-padded to D4 vec4s per row. Call in uniform control flow.
fn stage_fine_tile(head: u32, start: u32, count: u32, lid: u32) {
    let d = params.d;
    // Only the rows consume_tile reads (r < count): a short tile costs what it holds.
    for (var idx = lid; idx < count * D4; idx += WG) {
        let r = idx / D4;
        let c4 = idx % D4;
        var kk = vec4<f32>(0.0);
        var vv = vec4<f32>(0.0);
        if (r < count) {
            let base = head + (start + r) * d;
            for (var e = 0u; e < 4u; e++) {
                let c = c4 * 4u + e;
                if (c < d) {
                    kk[e] = k[base + c];
                    vv[e] = v[base + c];
                }
            }
        }
        tile_k[idx] = kk;
        tile_v[idx] = vv;
    }
    for (var r = lid; r < count; r += WG) {
        tile_bias[r] = 0.0;
    }
}


// Attends query row i (of a workgroup whose rows all share the range) to fine keys
// [t_lo, t_hi) of the head at element offset `head`, in tiles of BK; causal: keys t <= i only.
// t_lo, t_hi and causal must be uniform over the workgroup (barriers inside).
fn attend_fine_keys(head: u32, t_lo: u32, t_hi: u32, i: u32, causal: bool, lid: u32) {
    for (var t0 = t_lo; t0 < t_hi; t0 += BK) {
        let count = min(BK, t_hi - t0);
        workgroupBarrier();
        stage_fine_tile(head, t0, count, lid);
        workgroupBarrier();
        var visible = count;
        if (causal) {
            visible = select(0u, i - t0 + 1u, i >= t0);
        }
        consume_tile(count, visible);
    }
}
