// The tile reads of `online_softmax.wgsl` without subgroup operations (every device; the web).

fn tile_rows_begin() {}

fn tile_dots(r: u32, ok: vec4<bool>) -> vec4<f32> {
    return tile_dots_plain(r, ok);
}

fn tile_accumulate(r: u32, w: vec4<f32>, ok: vec4<bool>) {
    tile_accumulate_plain(r, w, ok);
}
