// Uniform parameters shared by every pass. Rust mirror: `src/gpu/engine/params.rs` (a test
// checks that naga's layout of this struct has the size encase gives the Rust one).

struct LevelInfo {
    window: u32,      // w_l = m * 2^(l-1) (2D: the cell side s_l = r 2^(l-1))
    windows: u32,     // ceil(n / w_l) (2D: the cells, ceil(H / s_l) ceil(W / s_l))
    row_offset: u32,  // first row of level l in the concatenated coarse buffer
    weight_offset: u32, // first element of level l's (d, p, w_l) weights in the learned buffers
}

struct Params {
    n: u32,
    d: u32,
    m: u32,
    p: u32,
    num_levels: u32,
    causal: u32,
    count_correction: u32,
    learned: u32,
    batch_heads: u32,
    coarse_rows: u32,        // rows of [K~_1; ...; K~_L] per head
    tiles_per_block: u32,    // query tiles of one fine block (FMA) or of the sequence (dense)
    total_workgroups: u32,   // workgroups that do work; the dispatch is folded into 2D
    workgroups_x: u32,       // x size of the folded dispatch
    scale: f32,              // 1 / sqrt(d)
    coarse_queries: u32,     // 1: coarse queries (§6): the fused pass does the near field only
    pooled: u32,             // tensors the downsample pass pools: 2 (K, V) or 3 (K, V, Q)
    weight_stride: u32,      // elements per tensor kind in the learned weight buffer
    bias_stride: u32,        // elements per tensor kind in the learned bias buffer
    // A head longer than one storage binding is processed in chunks (`src/plan/split.rs`),
    // one head at a time (batch_heads = 1). Unsplit: 0, 0, n, 0, n.
    row_base: u32,           // global row of the first bound row of Q and O (FMA: of K, V too)
    chunk_lo: u32,           // first token this dispatch covers (queries, pooled or merged tokens)
    chunk_hi: u32,           // one past the last (a multiple of the tile, or n)
    key_lo: u32,             // dense: first key of this dispatch
    key_hi: u32,             // dense: one past its last key
    n_kv: u32,               // rows of K and V per head (n for self-attention)
    // Grouped-query attention: query heads per K/V head (1: multi-head). Query head bh reads
    // K/V head bh / kv_group of K, V, K~ and V~, which hold batch_heads / kv_group heads.
    kv_group: u32,
    // Variable-length batches (`shared/sequences.wgsl`): 0 for a batch of equal sequences of n
    // tokens (every other field as above); else the number of sequences, each its own FMA,
    // described by the sequence table, with `heads` query heads each.
    seqs: u32,
    heads: u32,              // query heads per sequence (varlen)
    q_head_stride: u32,      // rows between heads of one sequence in Q, O, the LSE (varlen)
    kv_head_stride: u32,     // rows between K/V heads of one sequence in K, V (varlen)
    bias_base: u32,          // first bias element in the downsample pass's weight binding
    grid_w: u32,             // 2D (algorithm.md §9): the grid width W (n = H W); 0 in 1D
    // Variable-length batches, passes with no binding to spare for the sequence table: the f32
    // element of a scratch buffer of theirs (the backward's stats, dK~) where a copy of the table
    // starts (`shared/problems.wgsl`).
    table_at: u32,
    key_base: u32,           // dense: the first bound row of K, V (a split head's key chunk)
    // The backward's coarse dK~/dV~: the f32 element of dK~ and dV~ where the partial sums of
    // its reader chunks start (backward_dkv_coarse.wgsl, backward_dkv_combine.wgsl).
    partials_at: u32,
    // The same in dQ~ for the query weights' gradients (weights_backward_q.wgsl).
    q_partials_at: u32,
    // The softmax variants (issue 30, `variants.wgsl`; read only where a pipeline's SOFTCAP,
    // SINKS or WINDOW constant is on).
    softcap: f32,            // C of the softcap C tanh(l / C)
    sink_heads: u32,         // query heads of a sequence: the sink of problem qh is qh's head
    head_base: u32,          // the caller's query head of problem 0 (a run of heads: HeadSpan)
    window_left: u32,        // L: keys t >= i - L
    window_right: u32,       // R: keys t <= i + R
    // The dense backward of a split head (`plan::DenseBackwardSplitPlan`): 1 where this
    // dispatch adds to the dQ or dK/dV an earlier pair left (0: the first writes; unsplit: 0).
    accumulate: u32,
    // The backward's coarse dK~/dV~ and its combine rounds, a split head's level in groups of
    // rows whose partial sums fit one binding: the group's first row of the level (a multiple
    // of p), its partial sums from partials_at; rows in the group (0: the whole level, unsplit).
    dkv_row_lo: u32,
    dkv_rows: u32,
    // The first row (a multiple of p, within the group) of this dispatch's workgroups: a
    // split head's later chunk covers only the windows its tokens may read (0: the group's).
    dkv_first: u32,
    levels: array<LevelInfo, 32>,
    // The sink logit of query head h: sinks[h / 4][h % 4] (at most 128 heads).
    sinks: array<vec4<f32>, 32>,
}

@group(0) @binding(0) var<uniform> params: Params;

// The logit of a key that does not exist: the offset of an empty sub-window's coarse key, the
// running maximum before any key, and the LSE of a partial result over no key. A sentinel, not
// -inf: WGSL implementations may assume finite floats.
const ABSENT: f32 = -1e30;

// -inf, for the LSE of a row no key reaches (a store, never arithmetic). Read through a
// function-local variable: `bitcast<f32>(0xff800000u)` alone is a const-expression, which Tint
// (Chromium's WGSL compiler) rejects ("value -inf cannot be represented as 'f32'").
fn neg_inf() -> f32 {
    var bits = 0xff800000u;
    return bitcast<f32>(bits);
}

// Linear workgroup index of a dispatch folded into (x, y) to stay under 65535 per dimension.
fn linear_workgroup(wg: vec3<u32>) -> u32 {
    return wg.x + wg.y * params.workgroups_x;
}

// Logit offset of a coarse key standing for `count` tokens (algorithm.md §5): ln count under
// the count correction, 0 without it, ABSENT for an empty sub-window. CPU mirror: the
// `SeenKey::Coarse` arm of `cpu::fma_forward`.
fn coarse_key_bias(count: u32) -> f32 {
    if (count == 0u) {
        return ABSENT;
    }
    return select(0.0, log(f32(count)), params.count_correction != 0u);
}
