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

// ---- The gathered far field of a fine block (fine queries): every level's far-list coarse
// keys of block a0 in one sequence, staged BK at a time, so a block pays two barriers and one
// rescale per BK coarse keys instead of per run of at most 2p keys (2 runs x L levels).

// Run `run` (0: the windows before a, 1: after; bidirectional: a even {a-2}, {a+2, a+3}; a odd
// {a-3, a-2}, {a+2}) of window a's far list at level index `lvl`, clipped to the windows that
// exist: (first, last) inclusive, empty when first > last.
fn far_run(lvl: u32, a: i32, run: u32) -> vec2<i32> {
    let odd = (a & 1) == 1;
    var lo = select(a - 2, a - 3, odd);
    var hi = a - 2;
    if (run == 1u) {
        lo = a + 2;
        hi = select(a + 3, a + 2, odd);
    }
    return vec2<i32>(max(lo, 0), min(hi, i32(params.levels[lvl].windows) - 1));
}

// Coarse rows of a clipped run.
fn run_rows(r: vec2<i32>) -> u32 {
    return select(0u, u32(r.y - r.x + 1) * params.p, r.x <= r.y);
}

// Coarse keys that fine block a0 sees over `levels` levels (causal: the runs before only).
fn far_total(a0: u32, causal: bool, levels: u32) -> u32 {
    let runs = select(2u, 1u, causal);
    var total = 0u;
    for (var lvl = 0u; lvl < levels; lvl++) {
        for (var run = 0u; run < runs; run++) {
            total += run_rows(far_run(lvl, i32(a0 >> lvl), run));
        }
    }
    return total;
}

// The g-th key of block a0's gathered far field: (level index, row within the level).
fn far_key(a0: u32, causal: bool, g: u32) -> vec2<u32> {
    let runs = select(2u, 1u, causal);
    var rest = g;
    for (var lvl = 0u; lvl < params.num_levels; lvl++) {
        for (var run = 0u; run < runs; run++) {
            let r = far_run(lvl, i32(a0 >> lvl), run);
            let rows = run_rows(r);
            if (rest < rows) {
                return vec2<u32>(lvl, u32(r.x) * params.p + rest);
            }
            rest -= rows;
        }
    }
    return vec2<u32>(0u, 0u); // not reached for g < far_total
}

// Stages keys [g0, g0 + count) of block a0's gathered far field (count <= BK). Each invocation
// stages whole rows: it finds its row's level once (a walk over the levels) instead of once per
// element; the far field is a few dozen rows, so the lost load coalescing costs little.
fn stage_far_gathered(bh: u32, a0: u32, causal: bool, g0: u32, count: u32, lid: u32) {
    let d = params.d;
    for (var r = lid; r < count; r += WG) {
        let key = far_key(a0, causal, g0 + r);
        let info = params.levels[key.x];
        let base = (bh * params.coarse_rows + info.row_offset + key.y) * d;
        for (var c4 = 0u; c4 < D4; c4++) {
            var kk = vec4<f32>(0.0);
            var vv = vec4<f32>(0.0);
            for (var e = 0u; e < 4u; e++) {
                let c = c4 * 4u + e;
                if (c < d) {
                    kk[e] = coarse_k[base + c];
                    vv[e] = coarse_v[base + c];
                }
            }
            tile_k[r * D4 + c4] = kk;
            tile_v[r * D4 + c4] = vv;
        }
        var bias = ABSENT;
        let size = sub_window_count(info.window, key.y / params.p, key.y % params.p);
        if (size > 0u) {
            bias = select(0.0, log(f32(size)), params.count_correction != 0u);
        }
        tile_bias[r] = bias;
    }
}

// Attends to every level's far list of fine block a0 (levels 1..`levels`), gathered.
// Arguments uniform over the workgroup (barriers inside).
fn attend_far_field(bh: u32, a0: u32, causal: bool, levels: u32, lid: u32) {
    let total = far_total(a0, causal, levels);
    for (var g0 = 0u; g0 < total; g0 += BK) {
        let count = min(BK, total - g0);
        workgroupBarrier();
        stage_far_gathered(bh, a0, causal, g0, count, lid);
        workgroupBarrier();
        consume_tile(count, count);
    }
}
