// Exact dense attention on cooperative matrices (tensor cores; native only, opt-in: issue 29).
// The same result as dense_attention.wgsl within f16 rounding of Q, K, V and P: Q K^T and P V
// are multiply-adds of CM x CM matrices with f16 inputs and f32 accumulators; the online
// softmax (running max, running sum, the rescaling of O) stays in f32.
//
// One workgroup is ONE subgroup (WG = the adapter's fixed subgroup size), so every
// cooperative operation below runs in uniform control flow with no per-subgroup split of the
// work; it owns BQ query rows of one head and walks all its keys in tiles of BK.
// Composed by `src/gpu/engine/coop.rs`, which prepends the `enable` lines and the constants
// CM (8 or 16), BQ, BK (multiples of CM), DP (head_dim padded to CM), WG, and the aliases
// MatA, MatB (f16) and MatC (f32) of the adapter's CM x CM matrices.
//
// Data path per key tile (every arrow a workgroup-memory round trip, the only way WGSL lets
// scalar code touch a cooperative matrix's elements):
//   K, V (f32, storage) -> ks, vs (f16) | S = Q K^T -> ss (f32) | softmax rows (scalar, f32)
//   -> ps (f16), O rows rescaled in os (f32) | O = P V + O (os loaded as the accumulator C).
// Equal sequences of a batch, causal bottom-right aligned as the plain kernel, grouped-query
// heads; no softmax variant, no variable-length table, no split head (the executor routes
// those to dense_attention.wgsl).
//
// Key chunks: a dispatch attends keys [key_lo, key_hi) (key_lo a multiple of BK). A GPU runs
// one chunk, all keys; the scalar emulation on llvmpipe runs several, in order, because
// llvmpipe stops an invocation's loops after 65535 iterations in all (perf.md, changes 9 and
// 35). As dense_attention.wgsl, every dispatch ends its rows as a finished partial (O, LSE)
// and the next resumes from it: acc = O, running max = LSE, running sum = 1.

#import params

@group(0) @binding(1) var<storage, read> q: array<f32>;            // (bh, n, d)
@group(0) @binding(2) var<storage, read> k: array<f32>;            // (bh / kv_group, n_kv, d)
@group(0) @binding(3) var<storage, read> v: array<f32>;            // (bh / kv_group, n_kv, d)
@group(0) @binding(6) var<storage, read_write> out: array<f32>;    // (bh, n, d)
@group(0) @binding(7) var<storage, read_write> lse: array<f32>;    // (bh, n)

// Query rows each invocation owns in the scalar softmax: rows lid, lid + WG, ...
const RPL: u32 = (BQ + WG - 1u) / WG;

var<workgroup> qs: array<f16, BQ * DP>;   // the tile's queries, row-major, zero padded
var<workgroup> ks: array<f16, BK * DP>;   // the key tile, row-major (read as K^T: column-major)
var<workgroup> vs: array<f16, BK * DP>;   // the value tile, row-major
var<workgroup> ss: array<f32, BQ * BK>;   // scores Q K^T of the tile, unscaled
var<workgroup> ps: array<f16, BQ * BK>;   // probabilities exp(s - running max)
var<workgroup> os: array<f32, BQ * DP>;   // the output accumulator (rescaled per row)

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let wid = linear_workgroup(wg);
    // An `if`, not an early return: naga's uniformity analysis counts any return before a
    // cooperative operation as leaving uniform control flow.
    if (wid < params.total_workgroups) {
        attend_tile(wid, lid);
    }
}

// Query tile `wid` (of tiles_per_block per head) against all its keys.
fn attend_tile(wid: u32, lid: u32) {
    let n = params.n;
    let n_kv = params.n_kv;
    let d = params.d;
    let causal = params.causal != 0u;
    let tiles = params.tiles_per_block;
    let bh = wid / tiles;
    // Causal: the longest tiles (the last rows) first, so the short ones fill the GPU's tail.
    let tile = select(wid % tiles, tiles - 1u - wid % tiles, causal);
    let i0 = tile * BQ;
    let i1 = min(i0 + BQ, n);
    let q_head = bh * n * d;
    let k_head = (bh / params.kv_group) * n_kv * d;
    // Keys the tile attends: [0, t_end); causal, query i sees keys t <= i + n_kv - n.
    let t_end = select(n_kv, max(i1 + n_kv, n) - n, causal);
    // This dispatch's keys; a later chunk resumes the partial (O, LSE) the earlier left.
    let key_lo = params.key_lo;
    let t_stop = min(t_end, params.key_hi);
    let resume = key_lo > 0u;
    // Causal: a tile an earlier chunk finished walks no key here and must not write its rows
    // again (no early return: see main).
    let finished = resume && key_lo >= t_end;

    for (var e = lid; e < BQ * DP; e += WG) {
        let i = i0 + e / DP;
        let c = e % DP;
        var x = 0.0;
        var acc = 0.0;
        if (i < n && c < d) {
            x = q[q_head + i * d + c];
            if (resume) {
                acc = out[q_head + i * d + c];
            }
        }
        qs[e] = f16(x);
        os[e] = acc;
    }
    var run_max: array<f32, RPL>;
    var run_sum: array<f32, RPL>;
    for (var j = 0u; j < RPL; j++) {
        run_max[j] = ABSENT;
        run_sum[j] = 0.0;
        let i = i0 + lid + j * WG;
        if (resume && lid + j * WG < BQ && i < n) {
            // A row with no key so far (LSE = -inf) resumes empty: no arithmetic on -inf.
            let l = lse[bh * n + i];
            if (bitcast<u32>(l) != 0xff800000u) {
                run_max[j] = l;
                run_sum[j] = 1.0;
            }
        }
    }

    for (var t0 = key_lo; t0 < t_stop; t0 += BK) {
        // The previous tile's P V has read ks, vs, ps and written os.
        workgroupBarrier();
        for (var e = lid; e < BK * DP; e += WG) {
            let t = t0 + e / DP;
            let c = e % DP;
            var kx = 0.0;
            var vx = 0.0;
            if (t < n_kv && c < d) {
                kx = k[k_head + t * d + c];
                vx = v[k_head + t * d + c];
            }
            ks[e] = f16(kx);
            vs[e] = f16(vx);
        }
        workgroupBarrier();
        // S = Q K^T, block (rb, kb) over the head dimension in steps of CM.
        for (var rb = 0u; rb < BQ / CM; rb++) {
            for (var kb = 0u; kb < BK / CM; kb++) {
                var s = MatC();
                for (var cb = 0u; cb < DP / CM; cb++) {
                    let a = coopLoadT<MatA>(&qs[rb * CM * DP + cb * CM], DP);
                    // K^T's (c, t) is ks[t * DP + c]: column-major with stride DP.
                    let b = coopLoad<MatB>(&ks[kb * CM * DP + cb * CM], DP);
                    s = coopMultiplyAdd(a, b, s);
                }
                coopStoreT(s, &ss[rb * CM * BK + kb * CM], BK);
            }
        }
        workgroupBarrier();
        // The online softmax of the tile, one row per invocation at a time, in f32.
        for (var j = 0u; j < RPL; j++) {
            let r = lid + j * WG;
            if (r < BQ) {
                let i = i0 + r;
                // Keys of this tile row i sees: t < t0 + vis (written so no u32 goes below 0).
                var vis = min(BK, min(n_kv, params.key_hi) - t0);
                if (causal) {
                    let lim = i + 1u + n_kv;
                    vis = select(0u, min(vis, lim - n - t0), lim > n + t0);
                }
                if (i >= n) {
                    vis = 0u;
                }
                var mx = run_max[j];
                for (var c = 0u; c < vis; c++) {
                    mx = max(mx, ss[r * BK + c] * params.scale);
                }
                let alpha = exp(run_max[j] - mx);
                var sum = 0.0;
                for (var c = 0u; c < BK; c++) {
                    var p = 0.0;
                    if (c < vis) {
                        p = exp(ss[r * BK + c] * params.scale - mx);
                    }
                    ps[r * BK + c] = f16(p);
                    sum += p;
                }
                run_sum[j] = run_sum[j] * alpha + sum;
                run_max[j] = mx;
                for (var c = 0u; c < DP; c++) {
                    os[r * DP + c] *= alpha;
                }
            }
        }
        workgroupBarrier();
        // O = P V + O, the accumulator loaded from and stored back to os.
        for (var rb = 0u; rb < BQ / CM; rb++) {
            for (var cb = 0u; cb < DP / CM; cb++) {
                var o = coopLoadT<MatC>(&os[rb * CM * DP + cb * CM], DP);
                for (var kb = 0u; kb < BK / CM; kb++) {
                    let a = coopLoadT<MatA>(&ps[rb * CM * BK + kb * CM], BK);
                    let b = coopLoadT<MatB>(&vs[kb * CM * DP + cb * CM], DP);
                    o = coopMultiplyAdd(a, b, o);
                }
                coopStoreT(o, &os[rb * CM * DP + cb * CM], DP);
            }
        }
    }
    workgroupBarrier();
    // O = acc / sum, LSE = max + ln sum (of the scaled logits, as finish_row); a row no key
    // reaches gets O = 0, LSE = -inf.
    for (var j = 0u; j < RPL; j++) {
        let r = lid + j * WG;
        let i = i0 + r;
        if (r < BQ && i < n && !finished) {
            let empty = run_sum[j] == 0.0;
            let inv = select(1.0 / run_sum[j], 0.0, empty);
            for (var c = 0u; c < d; c++) {
                out[q_head + i * d + c] = os[r * DP + c] * inv;
            }
            if (empty) {
                lse[bh * n + i] = neg_inf();
            } else {
                lse[bh * n + i] = run_max[j] + log(run_sum[j]);
            }
        }
    }
}
