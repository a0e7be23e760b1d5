// Backward of coarse queries, one round of the tree that adds weights_backward_q.wgsl's partial
// sums: the learned query weight and bias gradients of one level over chunks of the level's
// windows (each chunk's sum at params.q_partials_at + element * chunks + chunk of dQ~'s buffer,
// element g < d p taps + d p as weights_backward_q numbers them). Round r (stride F^r,
// F = FAN_IN): one invocation per (element, group g) adds the partials g F^(r+1) + i F^r,
// i = 0 .. F - 1 (those below sel.arg0 chunks), in increasing i, into partial g F^(r+1); the last
// round (F^(r+1) >= chunks) writes dWQ (or dbQ). A fixed tree (`plan::combine_rounds`): the same
// bits every run. CPU mirror: the `Pooled::Queries` call of `cpu::backward::pool_backward` (the
// same sums, associated differently).

#import params
#import geometry
#import level_select
#import combine_tree

@group(0) @binding(1) var<storage, read_write> dcoarse_q: array<f32>;    // dQ~, then the partials
@group(0) @binding(2) var<storage, read_write> dwq: array<f32>;          // levels' (d, p, w_l) (2D: (d, p, s_l, s_l)), concatenated
@group(0) @binding(3) var<storage, read_write> dbq: array<f32>;          // levels' (d, p), concatenated


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
    var sum = 0.0;
    for (var i = 0u; i < FAN_IN; i++) {
        let k = first + i * stride;
        if (k < chunks) {
            // A partial (`//#rows`: the counting variant of the tests only,
            // `shaders::compose_counting`), the total once per (j, t) (channel 0).
            //#rows(1u, select(0u, 1u, g < p * kernel_len(info.window) || (g >= weights && g - weights < p)))
            sum += dcoarse_q[params.q_partials_at + g * chunks + k];
        }
    }
    if (span < chunks) {
        dcoarse_q[params.q_partials_at + g * chunks + first] = sum;
    } else if (g >= weights) {
        dbq[sel.level * d * p + g - weights] = sum;
    } else {
        dwq[info.weight_offset + g] = sum;
    }
}
