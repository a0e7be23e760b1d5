// The units of the downsample pass (downsample.wgsl) and of the rounds that add its chunks'
// partial sums (downsample_combine.wgsl): per pooled tensor (0 keys, 1 values, 2 queries), per
// head, per coarse row of the level, `per_row` consecutive units (the row's channels times its
// tap chunks, or times a round's groups). Each workgroup covers one tensor (so branches on the
// tensor are uniform) and consecutive invocations take consecutive units of a row, i.e.
// consecutive channels. K and V have query_heads() / kv_group heads (grouped-query attention:
// each is pooled once for its group of query heads), Q query_heads(): the workgroups of K,
// then V, then Q. Rust mirror: `plan::forward::pool_level`.
// Needs from the importer: params, geometry, level_select, sequences.

struct PoolUnit {
    tensor: u32, // 0 keys, 1 values, 2 queries
    u: u32,      // the unit's index within its tensor: (head row) * per_row + rest
    hr: u32,     // head * rows + the row's index among the dispatch's rows of that head
    rest: u32,   // the unit within its row, < per_row
    row: u32,    // the coarse row within its sequence's level
    seq: u32,    // its sequence (0 for a batch of equal sequences)
    crow: u32,   // first coarse row of its head (K/V head for tensors 0 and 1) before offsets
    tok_row: u32, // row of its head's token 0 in K, V or Q
    n: u32,      // tokens of its sequence
    ok: bool,    // false past the tensor's last unit or past the pooled tensors
}

// Rows per head of a dispatch of level `lvl`: the windows holding tokens of the chunk
// [chunk_lo, chunk_hi) (all of them unless split) times p, or every sequence's (varlen).
// .x: the first window, .y: the rows.
fn pool_rows(lvl: u32) -> vec2<u32> {
    let groups = chunk_groups(params.chunk_lo, params.chunk_hi, params.levels[lvl].window,
                              params.grid_w);
    var rows = (groups.y - groups.x) * params.p;
    if (params.seqs > 0u) {
        rows = seq_table[sec_rows(lvl) + params.seqs];
    }
    return vec2<u32>(groups.x, rows);
}

fn pool_unit(wid: u32, lid: u32, lvl: u32, per_row: u32) -> PoolUnit {
    var pu: PoolUnit;
    let p = params.p;
    let at = pool_rows(lvl);
    let rows = at.y;
    let kv_heads = query_heads() / params.kv_group;
    let kv_wgs = (kv_heads * rows * per_row + WG - 1u) / WG;
    pu.tensor = min(wid / kv_wgs, 2u);
    let heads = select(kv_heads, query_heads(), pu.tensor == 2u);
    pu.u = (wid - pu.tensor * kv_wgs) * WG + lid;
    pu.ok = pu.tensor < params.pooled && pu.u < heads * rows * per_row;
    if (!pu.ok) {
        return pu;
    }
    pu.rest = pu.u % per_row;
    pu.hr = pu.u / per_row;
    let head = pu.hr / rows; // a K/V head for tensors 0 and 1, a query head for 2
    pu.row = at.x * p + pu.hr % rows;
    pu.seq = 0u;
    if (params.seqs > 0u) {
        pu.seq = seq_search(sec_rows(lvl), pu.row);
        pu.row -= seq_table[sec_rows(lvl) + pu.seq];
    }
    let pr = problem(select(head * params.kv_group, head, pu.tensor == 2u), pu.seq);
    pu.n = pr.n;
    pu.tok_row = select(pr.kv_row, pr.q_row, pu.tensor == 2u);
    pu.crow = select(pr.kv_crow, pr.q_crow, pu.tensor == 2u);
    return pu;
}

// Where the partial sums of tensor `tensor` start in its coarse buffer: after the coarse rows
// of every head (`plan::Workspace::pool_partials_at`; K~ and V~ hold K/V heads, Q~ query heads).
fn pool_partials_at(tensor: u32) -> u32 {
    return select(params.partials_at, params.q_partials_at, tensor == 2u);
}
