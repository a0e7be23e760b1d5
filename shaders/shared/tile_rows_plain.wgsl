// consume_tile without subgroup operations (every device; the web), one key at a time.
// Why not four at a time as the subgroup variant: grouping was only 5-8% faster here and made
// Mesa's GL compiler 4x slower on these kernels (docs/perf.md, change 4).

fn tile_rows_begin() {}

// Folds the first `count` staged keys into this invocation's rows; only keys r < visible[rho]
// (causal limit of row rho) whose bias is not ABSENT take part. Two sweeps per tile (scores and
// their maximum, then weights and values) so each accumulator is rescaled once per tile, not
// per key. Each staged element is loaded once for all QR rows of the invocation. (With
// QR = 1, r < last is r < n_keys[0]: `QR == 1u ||` folds the repeated test away.)
fn consume_tile(count: u32, visible: array<u32, QR>) {
    var n_keys: array<u32, QR>;
    var last = 0u; // keys r >= last are masked for every row
    for (var rho = 0u; rho < QR; rho++) {
        n_keys[rho] = min(count, visible[rho]);
        last = max(last, n_keys[rho]);
    }
    var s: array<f32, QR * BK>;
    var tile_max: array<f32, QR>;
    var seen_any: array<bool, QR>;
    for (var rho = 0u; rho < QR; rho++) {
        tile_max[rho] = ABSENT;
    }
    for (var r = 0u; r < count; r++) {
        if (r < last) {
            let bias = tile_bias[r];
            if (bias > ABSENT * 0.5) {
                var dot4: array<vec4<f32>, QR>;
                for (var c4 = 0u; c4 < D4; c4++) {
                    let kk = tile_k[r * D4 + c4];
                    for (var rho = 0u; rho < QR; rho++) {
                        dot4[rho] += q_row[rho * D4 + c4] * kk;
                    }
                }
                for (var rho = 0u; rho < QR; rho++) {
                    if (QR == 1u || r < n_keys[rho]) {
                        let x = dot4[rho];
                        let score = x.x + x.y + x.z + x.w + bias;
                        s[rho * BK + r] = score;
                        tile_max[rho] = max(tile_max[rho], score);
                        seen_any[rho] = true;
                    }
                }
            }
        }
    }
    var any_seen = false;
    for (var rho = 0u; rho < QR; rho++) {
        if (seen_any[rho]) {
            any_seen = true;
            let new_max = max(run_max[rho], tile_max[rho]);
            let correction = exp(run_max[rho] - new_max);
            run_sum[rho] *= correction;
            for (var c4 = 0u; c4 < D4; c4++) {
                acc[rho * D4 + c4] *= correction;
            }
            run_max[rho] = new_max;
        }
    }
    if (!any_seen) {
        return;
    }
    // The keep test repeats the first sweep's instead of looking at s[r], so that a NaN score
    // (a NaN in q or k) poisons this row as it would in dense attention rather than vanishing.
    for (var r = 0u; r < count; r++) {
        if (r < last && tile_bias[r] > ABSENT * 0.5) {
            var w: array<f32, QR>;
            for (var rho = 0u; rho < QR; rho++) {
                if (QR == 1u || r < n_keys[rho]) {
                    w[rho] = exp(s[rho * BK + r] - run_max[rho]);
                    run_sum[rho] += w[rho];
                }
            }
            for (var c4 = 0u; c4 < D4; c4++) {
                let vv = tile_v[r * D4 + c4];
                for (var rho = 0u; rho < QR; rho++) {
                    if (QR == 1u || r < n_keys[rho]) {
                        acc[rho * D4 + c4] += w[rho] * vv;
                    }
                }
            }
        }
    }
}
