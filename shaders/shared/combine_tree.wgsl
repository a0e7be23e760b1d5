// One round of the fixed tree that adds partial sums of chunks (Rust mirror:
// `plan::combine_rounds`, `plan::COMBINE_FAN_IN`): round r, of stride F^r (F = FAN_IN), adds
// the partials g F^(r+1) + i F^r, i = 0 .. F - 1 (those below `chunks`), in increasing i, into
// partial g F^(r+1); the last round (F^(r+1) >= chunks) writes the result itself. The tree is
// fixed by the plan, not by timing, so every run gives the same bits; an invocation reads at
// most F partials, so a round's chain does not grow with n and the rounds grow as log_F of the
// chunks. The passes that use it: backward_dkv_combine, weights_backward(_q)_combine,
// downsample_combine.

const FAN_IN: u32 = 16u;

// Partials one group of a round of stride `stride` spans.
fn tree_span(stride: u32) -> u32 {
    return stride * FAN_IN;
}

// Groups of a round: one invocation (per output element) adds each group's partials.
fn tree_groups(chunks: u32, stride: u32) -> u32 {
    let span = tree_span(stride);
    return (chunks + span - 1u) / span;
}

// The i-th partial group `g` adds (>= chunks: none).
fn tree_member(g: u32, i: u32, stride: u32) -> u32 {
    return g * tree_span(stride) + i * stride;
}

// Whether a round of stride `stride` is the last: it writes the result, not a partial.
fn tree_last(chunks: u32, stride: u32) -> bool {
    return tree_span(stride) >= chunks;
}
