// Roofline proxy for the benchmarks (not a library pass): C = A B, f32, row-major,
// A (M, K), B (K, N). Register-tiled: a 16 x 16 workgroup computes a 64 x 64 tile of C, each
// invocation a 4 x 4 block, with A and B staged through workgroup memory in 64 x 16 slices.
// No CPU mirror: the benchmark checks C against a CPU product on a sampled row.

struct Dims {
    m: u32,
    n: u32,
    k: u32,
    _pad: u32,
}

@group(0) @binding(0) var<uniform> dims: Dims;
@group(0) @binding(1) var<storage, read> a: array<f32>;
@group(0) @binding(2) var<storage, read> b: array<f32>;
@group(0) @binding(3) var<storage, read_write> c: array<f32>;

const TILE: u32 = 64u;
const KT: u32 = 16u;

var<workgroup> a_tile: array<array<f32, TILE>, KT>; // [k][row]
var<workgroup> b_tile: array<array<f32, TILE>, KT>; // [k][col]

@compute @workgroup_size(16, 16)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let row0 = wg.y * TILE;
    let col0 = wg.x * TILE;
    let flat = lid.y * 16u + lid.x;
    var acc: array<vec4<f32>, 4>;
    for (var k0 = 0u; k0 < dims.k; k0 += KT) {
        // 256 invocations stage 64 x 16 values of A and of B: 4 each.
        for (var e = 0u; e < 4u; e++) {
            let idx = flat * 4u + e;      // 0 .. 1023
            let r = idx / KT;             // tile row of A / column of B
            let kk = idx % KT;
            let ar = row0 + r;
            let ak = k0 + kk;
            a_tile[kk][r] = select(0.0, a[ar * dims.k + ak], ar < dims.m && ak < dims.k);
            let bk = k0 + (idx / TILE);
            let bc = col0 + (idx % TILE);
            b_tile[idx / TILE][idx % TILE] = select(0.0, b[bk * dims.n + bc], bk < dims.k && bc < dims.n);
        }
        workgroupBarrier();
        for (var kk = 0u; kk < KT; kk++) {
            let av = vec4<f32>(a_tile[kk][lid.y * 4u], a_tile[kk][lid.y * 4u + 1u], a_tile[kk][lid.y * 4u + 2u], a_tile[kk][lid.y * 4u + 3u]);
            let bv = vec4<f32>(b_tile[kk][lid.x * 4u], b_tile[kk][lid.x * 4u + 1u], b_tile[kk][lid.x * 4u + 2u], b_tile[kk][lid.x * 4u + 3u]);
            acc[0] += av.x * bv;
            acc[1] += av.y * bv;
            acc[2] += av.z * bv;
            acc[3] += av.w * bv;
        }
        workgroupBarrier();
    }
    for (var i = 0u; i < 4u; i++) {
        let r = row0 + lid.y * 4u + i;
        for (var j = 0u; j < 4u; j++) {
            let col = col0 + lid.x * 4u + j;
            if (r < dims.m && col < dims.n) {
                c[r * dims.n + col] = acc[i][j];
            }
        }
    }
}
