// The softmax variants of issue 30 (docs/variants.md): a logit softcap C tanh(l / C), a sink
// term exp(S_h) per query head in every row's denominator, a sliding window of keys
// i - L <= t <= i + R. Each is on where its constant (SOFTCAP, SINKS, WINDOW, prepended by
// `compose_for` from `plan::SoftmaxFlags`) is true; a plain pipeline has them all false, so its
// branches fold away and it runs the code it ran before. Values: params.softcap, params.sinks,
// params.window_left/right. CPU mirror: `cpu/variants.rs`.
// Needs from the importer: params, problems (Problem).

// tanh(x) from exp(-2|x|), which never overflows (x / C may be large: a NaN from inf / inf
// would poison the row), accurate to f32 rounding in absolute terms, as the logits need.
fn cap_tanh(x: f32) -> f32 {
    let t = exp(-2.0 * abs(x));
    return sign(x) * (1.0 - t) / (1.0 + t);
}

// The logit of a raw score l = q . k / sqrt(d): C tanh(l / C) under the softcap. A coarse
// key's count correction is added after (by the caller).
fn capped(score: f32) -> f32 {
    if (SOFTCAP) {
        return params.softcap * cap_tanh(score / params.softcap);
    }
    return score;
}

fn capped4(s: vec4<f32>) -> vec4<f32> {
    if (SOFTCAP) {
        return vec4<f32>(capped(s.x), capped(s.y), capped(s.z), capped(s.w));
    }
    return s;
}

// d logit / d score: 1 - tanh^2(l / C) under the softcap, else 1 (the backward).
fn cap_slope(score: f32) -> f32 {
    if (SOFTCAP) {
        let t = cap_tanh(score / params.softcap);
        return 1.0 - t * t;
    }
    return 1.0;
}

// The query head of problem pr within its sequence: varlen problems are h * S + s, a batch's
// are b * heads + h (from head_base on, when a front runs a subset of the heads).
fn query_head(pr: Problem) -> u32 {
    if (params.seqs > 0u) {
        return pr.qh / params.seqs;
    }
    return (params.head_base + pr.qh) % max(params.sink_heads, 1u);
}

// The sink logit S_h of problem pr's query head.
fn sink_logit(pr: Problem) -> f32 {
    let h = query_head(pr);
    return params.sinks[h / 4u][h % 4u];
}

// Keys [x, y) of the window of a query at key position pos (may be negative: a causal query
// before the first key of a shorter K), within [0, n_kv); x >= y when none.
fn window_keys(pos: i32, n_kv: u32) -> vec2<u32> {
    let lo = max(pos - i32(params.window_left), 0);
    let hi = clamp(pos + i32(params.window_right) + 1, 0, i32(n_kv));
    return vec2<u32>(u32(lo), u32(hi));
}

// The window's first staged key row of the current tile for this invocation's row
// (online_softmax's key_ok skips rows r < win_first).
var<private> win_first: u32;

// Narrows the tile of keys staged from t0 to this row's window `band` (window_keys): sets
// win_first and returns the visible limit min(visible, band end - t0).
fn window_tile(band: vec2<u32>, t0: u32, visible: u32) -> u32 {
    win_first = select(0u, band.x - t0, band.x > t0);
    return min(visible, select(0u, band.y - t0, band.y > t0));
}

fn cap_slope4(s: vec4<f32>) -> vec4<f32> {
    if (SOFTCAP) {
        return vec4<f32>(cap_slope(s.x), cap_slope(s.y), cap_slope(s.z), cap_slope(s.w));
    }
    return vec4<f32>(1.0);
}

// The backward's dK/dV passes walk queries per key: the queries whose window holds key t are
// those at positions [x, y) (query i sits at key position i + shift, shift = n_kv - n), within
// [0, n); x >= y when none.
fn window_queries(t: u32, shift: i32, n: u32) -> vec2<u32> {
    let lo = max(i32(t) - i32(params.window_right) - shift, 0);
    let hi = clamp(i32(t) + i32(params.window_left) - shift + 1, 0, i32(n));
    return vec2<u32>(u32(lo), u32(hi));
}

// One past the last query position whose window holds this invocation's key (the dK/dV
// sweeps skip queries from it on; WINDOW only).
var<private> win_q_end: u32;
