// consume_keys of `backward_dq.wgsl` without subgroup operations (every device; the web): the
// pass's key-by-key sweep, `consume_keys_plain`.

fn tile_rows_begin() {}

fn consume_keys(count: u32, visible: u32) {
    consume_keys_plain(count, visible);
}
