// The softmax of ONE query row split over a workgroup's invocations (flash-decoding): each
// invocation folds a share of the keys into its own running (max, sum, weighted value sum),
// then the workgroup combines them with the log-sum-exp rule in a fixed tree (so the result
// does not depend on timing: two runs give the same bits). Used where a row has too few
// queries to fill a workgroup with one row per invocation (decoding: one new token per head).
// CPU mirror: `cpu::softmax_row` (the same softmax, another summation order).
// Needs from the importer: consts WG (a power of two), D4; params.d.

var<private> part_max: f32;
var<private> part_sum: f32;
var<private> part_acc: array<vec4<f32>, D4>;

var<workgroup> red_max: array<f32, WG>;
var<workgroup> red_sum: array<f32, WG>;
var<workgroup> red_acc: array<vec4<f32>, WG>;
// The combined row after split_combine: sum of weights (max in red_max[0]) and weighted values.
var<workgroup> row_acc: array<vec4<f32>, D4>;

fn split_begin() {
    part_max = ABSENT;
    part_sum = 0.0;
    for (var c4 = 0u; c4 < D4; c4++) {
        part_acc[c4] = vec4<f32>(0.0);
    }
}

// Folds one key of logit `score` into this invocation's share and returns its weight relative
// to the running maximum (the caller adds weight * value into part_acc).
fn split_weight(score: f32) -> f32 {
    if (score > part_max) {
        let correction = exp(part_max - score);
        part_sum *= correction;
        for (var c4 = 0u; c4 < D4; c4++) {
            part_acc[c4] *= correction;
        }
        part_max = score;
    }
    let w = exp(score - part_max);
    part_sum += w;
    return w;
}

// Folds a partial result (max, sum, unnormalised weighted values in `acc`) into this share.
fn split_fold_partial(m: f32, s: f32, acc: array<vec4<f32>, D4>) {
    if (s <= 0.0) {
        return;
    }
    let new_max = max(part_max, m);
    let a = exp(part_max - new_max);
    let b = exp(m - new_max);
    part_sum = part_sum * a + s * b;
    for (var c4 = 0u; c4 < D4; c4++) {
        part_acc[c4] = part_acc[c4] * a + acc[c4] * b;
    }
    part_max = new_max;
}

// Combines every invocation's share: afterwards red_max[0] is the row's max M, red_sum[0] its
// sum Z and row_acc its weighted value sum, all relative to M. Call in uniform control flow.
fn split_combine(lid: u32) {
    red_max[lid] = part_max;
    workgroupBarrier();
    for (var half = WG / 2u; half > 0u; half /= 2u) {
        if (lid < half) {
            red_max[lid] = max(red_max[lid], red_max[lid + half]);
        }
        workgroupBarrier();
    }
    let m = red_max[0];
    let f = select(0.0, exp(part_max - m), part_sum > 0.0);
    workgroupBarrier();
    red_sum[lid] = part_sum * f;
    workgroupBarrier();
    for (var half = WG / 2u; half > 0u; half /= 2u) {
        if (lid < half) {
            red_sum[lid] += red_sum[lid + half];
        }
        workgroupBarrier();
    }
    for (var c4 = 0u; c4 < D4; c4++) {
        red_acc[lid] = part_acc[c4] * f;
        workgroupBarrier();
        for (var half = WG / 2u; half > 0u; half /= 2u) {
            if (lid < half) {
                red_acc[lid] += red_acc[lid + half];
            }
            workgroupBarrier();
        }
        if (lid == 0u) {
            row_acc[c4] = red_acc[0];
        }
        workgroupBarrier();
    }
}
