// Backward, one round of the tree that adds weights_backward.wgsl's partial sums: the learned
// weight and bias gradients of one level, summed over chunks of the level's windows (each
// chunk's (K, V) pair at params.partials_at + (element * chunks + chunk) * 2 of dV~'s buffer,
// element g < d p taps + d p as weights_backward numbers them).
// Round r (stride F^r, F = FAN_IN): one invocation per (element, group g) adds the partials
// g F^(r+1) + i F^r, i = 0 .. F - 1 (those below sel.arg0 chunks), in increasing i, into partial
// g F^(r+1); the last round (F^(r+1) >= chunks) writes dWK, dWV (or dbK, dbV) instead. A fixed
// tree (`plan::combine_rounds`): the same bits every run.
// CPU mirror: the `Downsample::Learned` branch of `cpu::backward::downsample_backward` (the
// same sums, associated differently).

#import params
#import geometry
#import level_select
#import combine_tree

@group(0) @binding(1) var<storage, read_write> dcoarse_v: array<f32>;    // dV~, then the partials
@group(0) @binding(2) var<storage, read_write> dwk: array<f32>;          // levels' (d, p, w_l) (2D: (d, p, s_l, s_l)), concatenated
@group(0) @binding(3) var<storage, read_write> dwv: array<f32>;
@group(0) @binding(4) var<storage, read_write> dbk: array<f32>;          // levels' (d, p), concatenated
@group(0) @binding(5) var<storage, read_write> dbv: array<f32>;


@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let info = params.levels[sel.level];
    let d = params.d;
    let p = params.p;
    let weights = d * p * kernel_len(info.window);
    let chunks = sel.arg0;
    let stride = sel.arg1;
    let span = tree_span(stride);
    let groups = tree_groups(chunks, stride);
    let idx = dispatch_workgroup(wg) * WG + lid;
    let g = idx / groups;
    if (g >= weights + d * p) {
        return;
    }
    let first = (idx % groups) * span;
    var sk = 0.0;
    var sv = 0.0;
    for (var i = 0u; i < FAN_IN; i++) {
        let k = first + i * stride;
        if (k < chunks) {
            // A (K, V) pair: 2 rows, the total once per (j, t) (channel 0).
            //#rows(2u, select(0u, 2u, g < p * kernel_len(info.window) || (g >= weights && g - weights < p)))
            let at = params.partials_at + (g * chunks + k) * 2u;
            sk += dcoarse_v[at];
            sv += dcoarse_v[at + 1u];
        }
    }
    if (span < chunks) {
        let at = params.partials_at + (g * chunks + first) * 2u;
        dcoarse_v[at] = sk;
        dcoarse_v[at + 1u] = sv;
    } else if (g >= weights) {
        dbk[sel.level * d * p + g - weights] = sk;
        dbv[sel.level * d * p + g - weights] = sv;
    } else {
        dwk[info.weight_offset + g] = sk;
        dwv[info.weight_offset + g] = sv;
    }
}
