// Uniform parameters of the decoding passes (algorithm.md §10). Rust mirror: `DecodeParams` in
// `src/gpu/engine/params.rs` (a test compares the sizes). One block per (step shape, dispatch
// group): a group is a run of (batch*head) rows whose cache fits the bound ranges.

struct LevelInfo {
    window: u32,        // w_l = m * 2^(l-1)
    windows: u32,       // unused here (the forward's ceil(n / w_l))
    row_offset: u32,    // unused here
    weight_offset: u32, // first element of level l's (d, p, w_l) weights in the learned buffers
}

struct DecodeParams {
    d: u32,
    m: u32,
    p: u32,
    scale: f32,             // 1 / sqrt(d)
    count_correction: u32,
    learned: u32,
    heads: u32,             // K/V heads per sequence: cache row bh belongs to sequence bh / heads
    bh_base: u32,           // first (batch*kv_head) cache row of this dispatch group
    group_rows: u32,        // cache rows of this group (bound ranges of the cache start at bh_base)
    b_lo: u32,              // sequences [b_lo, b_hi) take part in this record
    b_hi: u32,
    chunk: u32,             // tokens appended to each sequence
    in_rows: u32,           // rows per head of the bound Q, K, V (a step: chunk)
    in_offset: u32,         // first of them this record appends
    ring: u32,              // R: near-field ring slots per head (token t in slot t mod R)
    ring_stride: u32,       // elements per head in the ring buffer: [K | V] (R, d), padded
    levels: u32,            // coarse levels kept
    slots: u32,             // window slots per level (window a in slot a mod slots)
    coarse_stride: u32,     // elements per head in the coarse buffer: [K~ | V~] (levels, slots, p, d)
    weight_stride: u32,     // elements per tensor kind in the learned weight buffer
    bias_stride: u32,       // elements per tensor kind in the learned bias buffer
    page_tokens: u32,       // T: tokens per history page (dense decode)
    segment: u32,           // S: keys per partial of the dense decode (divides T)
    segments: u32,          // partials per query row: ceil(max_len / S)
    partial_stride: u32,    // elements per head in the partials buffer: (chunk_max, segments, d + 2)
    in_row0: u32,           // the cache row of the first row of the bound K, V (Q: in_row0 * qgroup)
    qgroup: u32,            // query heads per K/V head (grouped-query attention; 1: multi-head)
    softcap: f32,           // C of the softcap (docs/variants.md; read where SOFTCAP is on)
    window_left: u32,       // L of the window: keys i - L ..= i (read where WINDOW is on)
    lens_in: u32,           // the lengths this record reads: lens[lens_in + b] (0 or batch)
    lens_out: u32,          // where it writes them advanced: lens[lens_out + b] (the other half)
    lens_count: u32,        // sequences whose lengths this record writes: the batch in its last group, else 0
    level_info: array<LevelInfo, 32>,
    sinks: array<vec4<f32>, 32>, // sink logit of query head h (of a sequence) at [h / 4][h % 4]
}

@group(0) @binding(0) var<uniform> params: DecodeParams;

// The logit of a key that does not exist (see params.wgsl).
const ABSENT: f32 = -1e30;

// The sequences' lengths are kept twice on the GPU (`lens`, (2, batch) u32): a record reads
// one half and writes the other, advanced by its chunk, and the next record reads that one.
// So every pass of a record may read the lengths while one of them writes the next ones: no
// pass of its own advances them, and steps recorded into one encoder each see their own
// positions.

// Element offset of head row `local` (of this group) in the near-field ring; kv 0 keys, 1 values.
fn ring_at(local: u32, kv: u32, t: u32) -> u32 {
    return local * params.ring_stride + (kv * params.ring + t % params.ring) * params.d;
}

// Element offset of coarse row j of window a at level index lvl (level l = lvl + 1).
fn coarse_at(local: u32, kv: u32, lvl: u32, a: u32, j: u32) -> u32 {
    let slot = a % params.slots;
    return local * params.coarse_stride
        + (((kv * params.levels + lvl) * params.slots + slot) * params.p + j) * params.d;
}

// Element offset of token `c` of the bound input rows of global cache row `bh` (K, V).
fn input_at(bh: u32, c: u32) -> u32 {
    return ((bh - params.in_row0) * params.in_rows + params.in_offset + c) * params.d;
}

// Element offset of token `c` of global query row `bhq` (batch*head) in the bound Q: query head
// h of a sequence reads cache row (K/V head) h / qgroup.
fn query_at(bhq: u32, c: u32) -> u32 {
    let row = bhq - params.in_row0 * params.qgroup;
    return (row * params.in_rows + params.in_offset + c) * params.d;
}
