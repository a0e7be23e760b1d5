// Coarse keys and values of one level (algorithm.md §4), Average or Learned. One invocation
// per (head, coarse row, channel); consecutive invocations read consecutive channels.
// CPU mirror: `src/cpu/downsample.rs`.

#import params

struct LevelSelect {
    level: u32,        // index into params.levels (level l - 1)
    workgroups_x: u32, // x size of this level's folded dispatch
}

@group(0) @binding(1) var<storage, read> k: array<f32>;           // (bh, n, d)
@group(0) @binding(2) var<storage, read> v: array<f32>;           // (bh, n, d)
@group(0) @binding(3) var<storage, read> wk: array<f32>;          // levels' (d, p, w_l), concatenated
@group(0) @binding(4) var<storage, read> wv: array<f32>;
@group(0) @binding(5) var<storage, read> bk: array<f32>;          // levels' (d, p), concatenated
@group(0) @binding(6) var<storage, read> bv: array<f32>;
@group(0) @binding(7) var<storage, read_write> coarse_k: array<f32>; // (bh, coarse_rows, d)
@group(0) @binding(8) var<storage, read_write> coarse_v: array<f32>;
@group(1) @binding(0) var<uniform> sel: LevelSelect;

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let info = params.levels[sel.level];
    let d = params.d;
    let p = params.p;
    let rows = info.windows * p;
    let g = (wg.x + wg.y * sel.workgroups_x) * WG + lid;
    if (g >= params.batch_heads * rows * d) {
        return;
    }
    let c = g % d;
    let row = (g / d) % rows;
    let bh = g / (d * rows);
    let a = row / p;
    let j = row % p;
    let w = info.window;
    let head = bh * params.n * d;
    var sk = 0.0;
    var sv = 0.0;
    if (params.learned == 0u) {
        let count = sub_window_count(w, a, j);
        let start = a * w + j * (w / p);
        for (var t = 0u; t < count; t++) {
            let idx = head + (start + t) * d + c;
            sk += k[idx];
            sv += v[idx];
        }
        if (count > 0u) {
            sk /= f32(count);
            sv /= f32(count);
        }
    } else {
        // Depthwise convolution, kernel = stride = w_l; tokens beyond n count as zero.
        let start = a * w;
        let len = min(w, params.n - start);
        let wrow = info.weight_offset + (c * p + j) * w;
        for (var t = 0u; t < len; t++) {
            let idx = head + (start + t) * d + c;
            sk += wk[wrow + t] * k[idx];
            sv += wv[wrow + t] * v[idx];
        }
        let b = sel.level * d * p + c * p + j;
        sk += bk[b];
        sv += bv[b];
    }
    let out = (bh * params.coarse_rows + info.row_offset + row) * d + c;
    coarse_k[out] = sk;
    coarse_v[out] = sv;
}
