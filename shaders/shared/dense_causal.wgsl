// The causal relation of dense attention over n queries and n_kv keys, bottom-right aligned
// (query i sits at key position i + n_kv - n and sees keys t <= i + n_kv - n; with n_kv < n the
// first n - n_kv rows see no key), and the order in which the dense backward's passes take
// their tiles. CPU mirror: `cpu::visible_keys`.
// Needs from the importer: nothing.

// Keys a causal query row i sees: [0, visible_keys(i, n, n_kv)).
fn visible_keys(i: u32, n: u32, n_kv: u32) -> u32 {
    let end = i + 1u + n_kv;
    return select(0u, min(end - n, n_kv), end > n);
}

// The first query row that sees key t (rows i >= first_reader(t) do): t + n - n_kv, or 0.
fn first_reader(t: u32, n: u32, n_kv: u32) -> u32 {
    let at = t + n;
    return select(0u, at - n_kv, at > n_kv);
}

// Tile z of `tiles` taken in the order 0, T-1, 1, T-2, ... (a bijection of [0, T)), so that
// any contiguous run of workgroups mixes long and short causal tiles: llvmpipe hands each of
// its threads one contiguous share of a dispatch (as `causal_tile` in dense_attention.wgsl,
// perf.md change 12). Each tile computes what it would in tile order: the same bits.
fn causal_order(z: u32, tiles: u32) -> u32 {
    if (z % 2u == 0u) {
        return z / 2u;
    }
    return tiles - 1u - z / 2u;
}
