// Pooling of one level (algorithm.md §4, §6): coarse keys and values, and with coarse queries
// the coarse queries too, Average or Learned. One invocation per (tensor, head, coarse row,
// channel); each workgroup pools one tensor (so its branch on the tensor is uniform) and
// consecutive invocations read consecutive channels. Average is hierarchical: level 1 from the
// tokens, level l >= 2 from level l-1's rows (S(l,a,j) is the union of two level l-1
// sub-windows, so the count-weighted mean of their means is its mean), which makes pooling
// O(n d) over all levels instead of O(n d L). Learned mode convolves the tokens at every level,
// w_l taps per coarse row (n / 4 at the top level): a level of more than `plan::POOL_TAPS` taps
// walks them in chunks of sel.arg1 taps, sel.arg0 chunks, one invocation each, which write
// partial sums after the tensor's coarse rows (pool_partials_at) for the rounds of
// downsample_combine.wgsl to add in a fixed tree; so no invocation's walk grows with n.
// CPU mirror: `src/cpu/downsample.rs` (which pools every level from the tokens). 1D and 2D
// through the geometry interface (geometry.wgsl, geometry_grid.wgsl).

// `//#rows(serial, total)` lines count the rows an invocation reads (one row of K, V, Q or
// coarse rows per element read, the total once per row: channel 0), in the counting variant
// of the tests only (`shaders::compose_counting`); elsewhere they are comments.

#import params
#import geometry
#import level_select
#import sequences
#import pool_units

@group(0) @binding(1) var<storage, read> k: array<f32>;              // (bh / kv_group, n, d)
@group(0) @binding(2) var<storage, read> v: array<f32>;              // (bh / kv_group, n, d)
@group(0) @binding(3) var<storage, read> q: array<f32>;              // (bh, n, d)
// Learned weights [keys | values | queries], each the levels' (d, p, w_l) concatenated
// (params.weight_stride apart), then from params.bias_base the biases likewise, each the
// levels' (d, p) (one binding for both: WebGPU's eight storage bindings per stage).
@group(0) @binding(4) var<storage, read> w: array<f32>;
@group(0) @binding(6) var<storage, read_write> coarse_k: array<f32>; // (bh / kv_group, coarse_rows, d)
@group(0) @binding(7) var<storage, read_write> coarse_v: array<f32>; // (bh / kv_group, coarse_rows, d)
@group(0) @binding(8) var<storage, read_write> coarse_q: array<f32>; // (bh, coarse_rows, d)

// Element `idx` of the tensor being pooled: 0 keys, 1 values, 2 queries.
fn input(tensor: u32, idx: u32) -> f32 {
    if (tensor == 0u) {
        return k[idx];
    }
    if (tensor == 1u) {
        return v[idx];
    }
    return q[idx];
}

// Element `idx` of the coarse rows of the tensor being pooled (a finer level's, already written).
fn coarse_input(tensor: u32, idx: u32) -> f32 {
    if (tensor == 0u) {
        return coarse_k[idx];
    }
    if (tensor == 1u) {
        return coarse_v[idx];
    }
    return coarse_q[idx];
}

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let info = params.levels[sel.level];
    let d = params.d;
    let p = params.p;
    let win = info.window;
    let cols = params.grid_w;
    // Learned taps in `chunks` chunks of `span` (one chunk: every tap, as Average always).
    let chunks = max(sel.arg0, 1u);
    let span = sel.arg1;
    let pu = pool_unit(dispatch_workgroup(wg), lid, sel.level, d * chunks);
    if (!pu.ok) {
        return;
    }
    let tensor = pu.tensor;
    let c = pu.rest % d;
    let chunk = pu.rest / d;
    let row = pu.row;
    let seq = pu.seq;
    let n = pu.n;
    let crow = pu.crow;
    let a = row / p;
    let j = row % p;
    var out = coarse_row(crow, sel.level, seq, row) * d + c;
    if (chunks > 1u) {
        // The chunk's partial sum, (head row, chunk, channel) after the coarse rows.
        out = pool_partials_at(tensor) + pu.u;
    }
    var s = 0.0;
    if (params.learned == 0u && sel.level > 0u) {
        // S(l, a, j) is the union of CHILDREN level l-1 rows (1D: two sub-windows; 2D: two bands
        // of two cells); any may be empty at the end.
        let prev = params.levels[sel.level - 1u];
        var total = 0u;
        for (var h = 0u; h < CHILDREN; h++) {
            let child = row_child(n, win, p, cols, a, j, h);
            let count = child.y;
            if (count > 0u) {
                //#rows(1u, select(0u, 1u, c == 0u))
                let row_in = coarse_row(crow, sel.level - 1u, seq, child.x);
                s += f32(count) * coarse_input(tensor, row_in * d + c);
                total += count;
            }
        }
        if (total > 0u) {
            s /= f32(total);
        }
    } else {
        // From the tokens. Element offset of row 0 of the head: wraps like fine_attention's when
        // a split head's bindings start at row_base > 0. A split head pools level 1 (Average)
        // a chunk at a time: chunks are whole fine blocks (2D: whole rows of fine cells), so
        // every window of m tokens (2D: cell of m x m) lies in one chunk and this dispatch
        // covers exactly the windows of its chunk.
        let base = (pu.tok_row - params.row_base) * d;
        if (params.learned == 0u) {
            let count = row_count(n, win, p, cols, row);
            for (var t = 0u; t < count; t++) {
                //#rows(1u, select(0u, 1u, c == 0u))
                s += input(tensor, base + row_token(n, win, p, cols, row, t) * d + c);
            }
            if (count > 0u) {
                s /= f32(count);
            }
        } else {
            // Depthwise convolution, kernel = stride = w_l (2D: w_l x w_l); tokens beyond n
            // (the grid) count as zero. This invocation's taps: its chunk's, or all of them.
            let taps = group_taps(n, win, cols, a);
            var t0 = 0u;
            var t1 = taps;
            if (chunks > 1u) {
                t0 = min(chunk * span, taps);
                t1 = min(t0 + span, taps);
            }
            let wrow = tensor * params.weight_stride + info.weight_offset
                + (c * p + j) * kernel_len(win);
            for (var t = t0; t < t1; t++) {
                //#rows(1u, select(0u, 1u, c == 0u))
                let tap = group_tap(n, win, cols, a, t);
                s += w[wrow + tap.y] * input(tensor, base + tap.x * d + c);
            }
            // The bias once: in chunk 0's partial.
            if (chunk == 0u) {
                s += w[params.bias_base + tensor * params.bias_stride + sel.level * d * p + c * p + j];
            }
        }
    }
    if (tensor == 0u) {
        coarse_k[out] = s;
    } else if (tensor == 1u) {
        coarse_v[out] = s;
    } else {
        coarse_q[out] = s;
    }
}
