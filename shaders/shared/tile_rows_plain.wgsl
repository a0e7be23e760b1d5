// consume_tile without subgroup operations (every device; the web), one key at a time.
// Why not four at a time as the subgroup variant: grouping was only 5-8% faster here and made
// Mesa's GL compiler 4x slower on these kernels (docs/perf.md, change 4).

fn tile_rows_begin() {}

// Folds the first `count` staged keys into this invocation's row; only keys r < visible
// (causal limit) whose bias is not ABSENT take part. Two sweeps per tile (scores and their
// maximum, then weights and values) so the accumulator is rescaled once per tile, not per key.
fn consume_tile(count: u32, visible: u32) {
    let n_keys = min(count, visible);
    var s: array<f32, BK>;
    var tile_max = ABSENT;
    var seen_any = false;
    for (var r = 0u; r < count; r++) {
        if (r < n_keys) {
            let bias = tile_bias[r];
            if (bias > ABSENT * 0.5 && (!WINDOW || r >= win_first)) {
                var dot4 = vec4<f32>(0.0);
                for (var c4 = 0u; c4 < D4; c4++) {
                    dot4 += q_row[c4] * tile_k[r * D4 + c4];
                }
                // The softcap caps the score; a coarse key's count correction comes after.
                let score = capped(dot4.x + dot4.y + dot4.z + dot4.w) + bias;
                s[r] = score;
                tile_max = max(tile_max, score);
                seen_any = true;
            }
        }
    }
    if (!seen_any) {
        return;
    }
    let new_max = max(run_max, tile_max);
    let correction = exp(run_max - new_max);
    run_sum *= correction;
    for (var c4 = 0u; c4 < D4; c4++) {
        acc[c4] *= correction;
    }
    run_max = new_max;
    // The keep test repeats the first sweep's instead of looking at s[r], so that a NaN score
    // (a NaN in q or k) poisons this row as it would in dense attention rather than vanishing.
    for (var r = 0u; r < count; r++) {
        if (r < n_keys && tile_bias[r] > ABSENT * 0.5 && (!WINDOW || r >= win_first)) {
            let w = exp(s[r] - new_max);
            run_sum += w;
            for (var c4 = 0u; c4 < D4; c4++) {
                acc[c4] += w * tile_v[r * D4 + c4];
            }
        }
    }
}

