// Query tiles of the dK/dV passes: q, dO, LSE and D = rowsum(dO * O) of up to BK query rows,
// staged in workgroup memory (the transpose of the key tiles of the forward).
// Needs from the importer: consts BK, D4, WG; bindings q, dout, stats.

var<workgroup> tile_q: array<vec4<f32>, BK * D4>;
var<workgroup> tile_do: array<vec4<f32>, BK * D4>;
var<workgroup> tile_lse: array<f32, BK>;
var<workgroup> tile_delta: array<f32, BK>;

// Stages query rows [start, start + count) of the problem whose token 0 is row q_row of Q, dO
// and the stats (`Problem::q_row`; count <= BK), zero-padded to D4 vec4s per row; rows from
// count on keep stale data, which no consumer reads. Call in uniform control flow.
fn stage_queries(q_row: u32, start: u32, count: u32, lid: u32) {
    let d = params.d;
    // Every invocation walks the staged q and dO rows; the workgroup reads each once.
    //#rows(2u * count, select(0u, 2u * count, lid == 0u))
    let head = q_row * d;
    // Only the rows the consumers read (i < count): a short tile costs what it holds.
    for (var idx = lid; idx < count * D4; idx += WG) {
        let r = idx / D4;
        let c4 = idx % D4;
        var qq = vec4<f32>(0.0);
        var gg = vec4<f32>(0.0);
        if (r < count) {
            let base = head + (start + r) * d;
            for (var e = 0u; e < 4u; e++) {
                let c = c4 * 4u + e;
                if (c < d) {
                    qq[e] = q[base + c];
                    gg[e] = dout[base + c];
                }
            }
        }
        tile_q[idx] = qq;
        tile_do[idx] = gg;
    }
    for (var r = lid; r < count; r += WG) {
        var l = 0.0;
        var dl = 0.0;
        if (r < count) {
            let row = q_row + start + r;
            l = stats[2u * row];
            dl = stats[2u * row + 1u];
        }
        tile_lse[r] = l;
        tile_delta[r] = dl;
    }
}
