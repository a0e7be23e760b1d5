// consume_queries of `backward_dkv_fine.wgsl` without subgroup operations (every device; the
// web): the pass's query-by-query sweep, `consume_queries_plain`.

fn tile_rows_begin() {}

fn consume_queries(start: u32, count: u32, first: u32) {
    consume_queries_plain(start, count, first);
}
