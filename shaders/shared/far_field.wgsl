// The far field at one coarse level: staging coarse keys and values (each key with its logit
// offset, ln |S(l,b,j)| under the count correction) and attending to a window's far list.
// Shared by fine_attention (a fine query's far lists) and coarse_attention (a coarse query's).
// CPU mirror: the `SeenKey::Coarse` arm of `cpu::fma_forward`; far lists: `levels::far_list`.
// Needs from the importer: online_softmax; bindings coarse_k, coarse_v.

// Stages coarse rows [row0, row0 + count) of level `lvl` (index l - 1), with each key's logit
// offset: ln |S| under the count correction, ABSENT for an empty sub-window.
fn stage_coarse_tile(bh: u32, lvl: u32, row0: u32, count: u32, lid: u32) {
    let d = params.d;
    let info = params.levels[lvl];
    let head = (bh * params.coarse_rows + info.row_offset) * d;
    // Only the rows consume_tile reads (r < count): a short tile costs what it holds.
    for (var idx = lid; idx < count * D4; idx += WG) {
        let r = idx / D4;
        let c4 = idx % D4;
        var kk = vec4<f32>(0.0);
        var vv = vec4<f32>(0.0);
        if (r < count) {
            let base = head + (row0 + r) * d;
            for (var e = 0u; e < 4u; e++) {
                let c = c4 * 4u + e;
                if (c < d) {
                    kk[e] = coarse_k[base + c];
                    vv[e] = coarse_v[base + c];
                }
            }
        }
        tile_k[idx] = kk;
        tile_v[idx] = vv;
    }
    for (var r = lid; r < count; r += WG) {
        var bias = ABSENT;
        if (r < count) {
            let row = row0 + r;
            let size = sub_window_count(info.window, row / params.p, row % params.p);
            if (size > 0u) {
                bias = select(0.0, log(f32(size)), params.count_correction != 0u);
            }
        }
        tile_bias[r] = bias;
    }
}

// Attends to the coarse windows [b_lo, b_hi] (inclusive, signed, clipped to what exists) of
// level index `lvl`.
fn attend_windows(bh: u32, lvl: u32, b_lo: i32, b_hi: i32, lid: u32) {
    let windows = i32(params.levels[lvl].windows);
    let lo = max(b_lo, 0);
    let hi = min(b_hi, windows - 1);
    if (lo > hi) {
        return;
    }
    let p = params.p;
    let row_end = u32(hi + 1) * p;
    for (var row0 = u32(lo) * p; row0 < row_end; row0 += BK) {
        let count = min(BK, row_end - row0);
        workgroupBarrier();
        stage_coarse_tile(bh, lvl, row0, count, lid);
        workgroupBarrier();
        consume_tile(count, count);
    }
}

// Attends to the far list of window `a` at level index `lvl`, as two runs of windows.
// Bidirectional: a even {a-2}, {a+2, a+3}; a odd {a-3, a-2}, {a+2}.
// Causal: a even {a-2}; a odd {a-3, a-2}. Arguments uniform over the workgroup.
fn attend_far_list(bh: u32, lvl: u32, a: i32, causal: bool, lid: u32) {
    let odd = (a & 1) == 1;
    attend_windows(bh, lvl, select(a - 2, a - 3, odd), a - 2, lid);
    if (!causal) {
        attend_windows(bh, lvl, a + 2, select(a + 3, a + 2, odd), lid);
    }
}
