// The coarse dK~/dV~ pass (`backward_dkv_coarse.wgsl`) without subgroup operations (every
// device; the web): its two phases over staged query tiles do every row.

const SUBGROUP_COARSE_ROWS: bool = false;

fn coarse_rows_subgroup(kpr: Problem, seq: u32, kv_h: u32, b: u32, j0: u32, nrows: u32,
                        range: vec2<u32>, outs: Outs, lid: u32) {}
