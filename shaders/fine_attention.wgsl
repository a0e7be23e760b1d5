// Fused fine-query FMA (algorithm.md §3, §5): one workgroup = one tile of up to WG queries of
// one fine block a0 (all of whose queries share one gather list); one softmax, computed online,
// over the near-field fine keys and every level's far-list coarse keys. Writes O and the LSE.
// CPU mirror: `cpu::fma_forward`.

#import params

@group(0) @binding(1) var<storage, read> q: array<f32>;            // (bh, n, d)
@group(0) @binding(2) var<storage, read> k: array<f32>;            // (bh, n, d)
@group(0) @binding(3) var<storage, read> v: array<f32>;            // (bh, n, d)
@group(0) @binding(4) var<storage, read> coarse_k: array<f32>;     // (bh, coarse_rows, d)
@group(0) @binding(5) var<storage, read> coarse_v: array<f32>;     // (bh, coarse_rows, d)
@group(0) @binding(6) var<storage, read_write> out: array<f32>;    // (bh, n, d)
@group(0) @binding(7) var<storage, read_write> lse: array<f32>;    // (bh, n)

#import online_softmax

// Stages coarse rows [row0, row0 + count) of level `lvl` (index l - 1), with each key's logit
// offset: ln |S| under the count correction, ABSENT for an empty sub-window.
fn stage_coarse_tile(bh: u32, lvl: u32, row0: u32, count: u32, lid: u32) {
    let d = params.d;
    let info = params.levels[lvl];
    let head = (bh * params.coarse_rows + info.row_offset) * d;
    for (var idx = lid; idx < BK * D4; idx += WG) {
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
    for (var r = lid; r < BK; r += WG) {
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

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let wid = linear_workgroup(wg);
    if (wid >= params.total_workgroups) {
        return;
    }
    let n = params.n;
    let m = params.m;
    let blocks = (n + m - 1u) / m;
    let tiles = blocks * params.tiles_per_block;
    let bh = wid / tiles;
    let tile = wid % tiles;
    let a0 = tile / params.tiles_per_block;
    let i0 = a0 * m + (tile % params.tiles_per_block) * WG;
    let i1 = min(min(i0 + WG, (a0 + 1u) * m), n);
    let i = i0 + lid;
    let in_tile = i < i1;
    let head = bh * n * params.d;
    let causal = params.causal != 0u;

    begin_row(head, i, in_tile);

    // Level 0, the near field: blocks a0-1, a0, a0+1 (causal: a0-1, a0 up to the last query).
    let t_lo = select(0u, (a0 - 1u) * m, a0 > 0u);
    let t_hi = select(min((a0 + 2u) * m, n), i1, causal);
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

    // Coarse levels: window a = floor(a0 / 2^(l-1)); its far list is two runs of windows.
    // Bidirectional: a even {a-2}, {a+2, a+3}; a odd {a-3, a-2}, {a+2}.
    // Causal: a even {a-2}; a odd {a-3, a-2}.
    for (var lvl = 0u; lvl < params.num_levels; lvl++) {
        let a = i32(a0 >> lvl);
        let odd = (a & 1) == 1;
        attend_windows(bh, lvl, select(a - 2, a - 3, odd), a - 2, lid);
        if (!causal) {
            attend_windows(bh, lvl, a + 2, select(a + 3, a + 2, odd), lid);
        }
    }

    if (in_tile) {
        finish_row(head, bh * n + i, i);
    }
}
