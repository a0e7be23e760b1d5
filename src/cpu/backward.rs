//! The backward pass of FMA in f64, fine or coarse queries (algorithm.md §8 with §6): the oracle of the GPU
//! backward. Written like the forward reference (per query, the keys it sees, one softmax),
//! with scatter on the CPU where the GPU gathers. CPU mirror of `shaders/backward_*.wgsl`,
//! `shaders/downsample_backward.wgsl` and `shaders/weights_backward.wgsl`.
//!
//! With P_ij the softmax weight of key j for query i, s_ij its logit, D_i = dO_i . O_i:
//! dS_ij = P_ij (dO_i . v_j - D_i); dQ_i = sum_j dS_ij k_j / sqrt(d);
//! dk_j = sum_i dS_ij q_i / sqrt(d); dv_j = sum_i P_ij dO_i, for fine and coarse keys alike;
//! a coarse key's gradient then flows back through the downsampling (Average: spread over
//! its sub-window; Learned: through W, and into dW, db). With coarse queries the far field's
//! query is the pooled query of the token's row: its dQ share goes to that row (dQ~), and
//! from there back through the query pooling (into dQ, and dWQ, dbQ).

use crate::config::{Downsample, FmaConfig, Queries};
use crate::error::Result;
use crate::geometry::Geometry;
use crate::gradients::{Gradients, LevelGradients};
use crate::shape::Shape;

use super::checks::{check_geometry, check_inputs};
use super::coarse::CoarseQueries;
use super::downsample::{downsample_head, Pooled};
use super::gather::{seen_keys_in, SeenKey};
use super::variants::RowRules;
use super::{count_bias, dot};

/// Where a key's gradient goes: a fine row of K/V or a coarse row of level `level`.
#[derive(Clone, Copy)]
enum Slot {
    Fine(usize),
    Coarse { level: usize, row: usize },
}

/// One key a query row saw in the forward, with what its gradients need.
struct SeenRow<'a> {
    /// The logit, softcap and count correction included.
    logit: f64,
    /// d logit / d (q . k / sqrt(d)): the softcap's slope, else 1.
    slope: f64,
    key: &'a [f64],
    value: &'a [f64],
    /// The query that met the key: q_i, or at a coarse level with coarse queries the pooled
    /// query of the token's row.
    query: &'a [f64],
    slot: Slot,
    /// Coarse queries at a coarse level: the (level, row) of that pooled query, which takes
    /// the query gradient instead of dQ_i.
    query_slot: Option<(usize, usize)>,
}

/// Gradients of `L = sum(dO * O)` with `O = cpu::fma_forward(q, k, v, shape, cfg).o`; `q` and
/// `dout` of shape (batch, heads, seq, head_dim), `k`, `v` of (batch, kv_heads, seq, head_dim).
/// dK and dV have K's shape: with grouped-query heads, the sum over each K/V head's group of
/// query heads. Weight gradients are summed over batch and heads, one entry per level of the
/// configuration's weights (unused levels are zero).
pub fn fma_backward(
    q: &[f64],
    k: &[f64],
    v: &[f64],
    dout: &[f64],
    shape: Shape,
    cfg: &FmaConfig,
) -> Result<Gradients<f64>> {
    check_inputs(q, k, v, shape)?;
    shape.check_len("dO", dout.len())?;
    if crate::cross::check_fma_cross(shape, cfg)? {
        // The chunk's rows of a causal FMA over seq_kv tokens (`crate::cross`): padding
        // queries with dO = 0 give no gradient.
        let full = crate::cross::full_shape(shape);
        let (q, dout) = (
            crate::cross::pad_rows(q, shape),
            crate::cross::pad_rows(dout, shape),
        );
        let mut g = fma_backward(&q, k, v, &dout, full, cfg)?;
        g.dq = crate::cross::last_rows(&g.dq, shape, shape.head_dim);
        return Ok(g);
    }
    cfg.validate(shape.head_dim, shape.seq)?;
    fma_backward_in(
        &*super::geometry_of(cfg, shape.seq),
        q,
        k,
        v,
        dout,
        shape,
        cfg,
    )
}

/// [`fma_backward`] in any geometry, the gradients of [`super::fma_forward_in`] with the same
/// `geometry` and `cfg`: `shape.seq` must be `geometry.tokens()`; weight gradients of level l
/// have the shape (d, p, `geometry.kernel_len(l)`) of its weights.
pub fn fma_backward_in<G: Geometry + ?Sized>(
    geometry: &G,
    q: &[f64],
    k: &[f64],
    v: &[f64],
    dout: &[f64],
    shape: Shape,
    cfg: &FmaConfig,
) -> Result<Gradients<f64>> {
    check_inputs(q, k, v, shape)?;
    shape.check_len("dO", dout.len())?;
    check_geometry(geometry, shape, cfg)?;
    cfg.validate_values()?;
    cfg.variants.validate(shape.heads, geometry.causal())?;
    let rules = RowRules::new(&cfg.variants);
    let mut dsinks = cfg.variants.sinks.as_ref().map(|s| vec![0f64; s.len()]);
    let (n, d, p) = (shape.seq, shape.head_dim, geometry.rank());
    let scale = 1.0 / (d as f64).sqrt();
    let mut dq = vec![0f64; shape.elements()];
    let mut dk = vec![0f64; shape.kv_elements()];
    let mut dv = vec![0f64; shape.kv_elements()];
    let mut dw: Option<Vec<LevelGradients<f64>>> = match &cfg.downsample {
        Downsample::Learned(w) => Some(
            (1..=w.levels.len())
                .zip(&w.levels)
                .map(|(l, lw)| {
                    if l <= geometry.num_levels() {
                        LevelGradients::zeros(d, p, geometry.kernel_len(l))
                    } else {
                        LevelGradients::zeros_like(lw)
                    }
                })
                .collect(),
        ),
        Downsample::Average => None,
    };
    let coarse_queries = cfg.queries == Queries::Coarse;
    for bh in 0..shape.batch_heads() {
        let head = bh * n * d..(bh + 1) * n * d;
        // Grouped-query heads: this query head's K/V head, whose gradients sum the group's.
        let kv_bh = bh / shape.group();
        let kv_head = kv_bh * n * d..(kv_bh + 1) * n * d;
        let (qh, kh, vh, doh) = (
            &q[head.clone()],
            &k[kv_head.clone()],
            &v[kv_head.clone()],
            &dout[head.clone()],
        );
        let coarse = downsample_head(kh, vh, d, geometry, &cfg.downsample);
        // Coarse queries (§6): level l's far list is seen through the pooled query of the
        // token's row, so the far field's query gradient lands on that row (dQ~), which then
        // flows back through the query pooling like dK~ through the key pooling.
        let coarse_q = coarse_queries.then(|| CoarseQueries::new(qh, d, geometry, &cfg.downsample));
        // dK~, dV~ (and dQ~) of every level, (level_rows, d) each.
        let mut dck: Vec<Vec<f64>> = coarse.iter().map(|c| vec![0.0; c.keys.len()]).collect();
        let mut dcv = dck.clone();
        let mut dcq = dck.clone();
        let (dqh, dkh, dvh) = (
            &mut dq[head.clone()],
            &mut dk[kv_head.clone()],
            &mut dv[kv_head.clone()],
        );
        for i in 0..n {
            let qi = &qh[i * d..(i + 1) * d];
            let doi = &doh[i * d..(i + 1) * d];
            // The forward row again: every key's logit, key and value rows, the query that
            // met it, and where the gradients go.
            // (A window: the near field's keys in its band, no coarse level.)
            let keys: Vec<SeenRow> = seen_keys_in(geometry, i)
                .into_iter()
                .filter(|key| match *key {
                    SeenKey::Fine(t) => rules.sees(i as i64, t),
                    SeenKey::Coarse { .. } => !rules.windowed(),
                })
                .map(|key| match key {
                    SeenKey::Fine(t) => {
                        let kt = &kh[t * d..(t + 1) * d];
                        let raw = dot(qi, kt) * scale;
                        SeenRow {
                            logit: rules.logit(raw),
                            slope: rules.slope(raw),
                            key: kt,
                            value: &vh[t * d..(t + 1) * d],
                            query: qi,
                            slot: Slot::Fine(t),
                            query_slot: None,
                        }
                    }
                    SeenKey::Coarse { level, window, j } => {
                        let c = &coarse[level - 1];
                        let row = window * p + j;
                        let kr = &c.keys[row * d..(row + 1) * d];
                        let (query, query_slot) = match &coarse_q {
                            Some(cq) => (
                                cq.of_token(level, i),
                                Some((level, geometry.row_of_token(level, i))),
                            ),
                            None => (qi, None),
                        };
                        let raw = dot(query, kr) * scale;
                        SeenRow {
                            logit: rules.logit(raw) + count_bias(geometry, cfg, level, row),
                            slope: rules.slope(raw),
                            key: kr,
                            value: &c.values[row * d..(row + 1) * d],
                            query,
                            slot: Slot::Coarse { level, row },
                            query_slot,
                        }
                    }
                })
                .collect();
            // The sink's term joins the denominator (and the LSE) with no value.
            let sink = rules.sink(bh % shape.heads);
            let max = keys
                .iter()
                .map(|k| k.logit)
                .chain(sink)
                .fold(f64::NEG_INFINITY, f64::max);
            let z: f64 = keys.iter().map(|k| (k.logit - max).exp()).sum::<f64>()
                + sink.map_or(0.0, |s| (s - max).exp());
            let lse = max + z.ln();
            let probs: Vec<f64> = keys.iter().map(|k| (k.logit - lse).exp()).collect();
            let mut oi = vec![0f64; d];
            for (pr, key) in probs.iter().zip(&keys) {
                for (o, x) in oi.iter_mut().zip(key.value) {
                    *o += pr * x;
                }
            }
            let delta = dot(doi, &oi);
            if let (Some(ds), Some(sink)) = (dsinks.as_mut(), sink) {
                ds[bh % shape.heads] -= (sink - lse).exp() * delta;
            }
            for (&pr, key) in probs.iter().zip(&keys) {
                let ds = pr * (dot(doi, key.value) - delta) * key.slope;
                let gq = match key.query_slot {
                    Some((level, row)) => &mut dcq[level - 1][row * d..(row + 1) * d],
                    None => &mut dqh[i * d..(i + 1) * d],
                };
                for (g, kc) in gq.iter_mut().zip(key.key) {
                    *g += scale * ds * kc;
                }
                let (gk, gv) = match key.slot {
                    Slot::Fine(t) => (&mut dkh[t * d..(t + 1) * d], &mut dvh[t * d..(t + 1) * d]),
                    Slot::Coarse { level, row } => (
                        &mut dck[level - 1][row * d..(row + 1) * d],
                        &mut dcv[level - 1][row * d..(row + 1) * d],
                    ),
                };
                for c in 0..d {
                    gk[c] += scale * ds * key.query[c];
                    gv[c] += pr * doi[c];
                }
            }
        }
        let mut pool_back = |x: &[f64], dc: &[Vec<f64>], which: Pooled, dx: &mut [f64]| {
            pool_backward(x, dc, which, d, geometry, cfg, dx, dw.as_mut());
        };
        pool_back(kh, &dck, Pooled::Keys, dkh);
        pool_back(vh, &dcv, Pooled::Values, dvh);
        if coarse_queries {
            pool_back(qh, &dcq, Pooled::Queries, dqh);
        }
    }
    Ok(Gradients {
        dq,
        dk,
        dv,
        weights: dw,
        dsinks,
    })
}

/// Sends the coarse gradients `dc` (one (level_rows, d) tensor per level) of one head's
/// pooled `x` (n, d) back through the pooling (algorithm.md §8): adds their share to `dx`, and
/// in Learned mode adds dW[c,j,k] = sum over rows r of basis j of dc[r, c] x[token of tap k, c]
/// and db[c,j] = sum over those rows of dc[r, c] to the weight gradients `which` selects.
#[allow(clippy::too_many_arguments)]
fn pool_backward<G: Geometry + ?Sized>(
    x: &[f64],
    dc: &[Vec<f64>],
    which: Pooled,
    d: usize,
    geometry: &G,
    cfg: &FmaConfig,
    dx: &mut [f64],
    mut dw: Option<&mut Vec<LevelGradients<f64>>>,
) {
    let p = geometry.rank();
    for level in 1..=geometry.num_levels() {
        let li = level - 1;
        for row in 0..geometry.level_rows(level) {
            let g = &dc[li][row * d..(row + 1) * d];
            match &cfg.downsample {
                Downsample::Average => {
                    let count = geometry.row_count(level, row) as f64;
                    for t in geometry.row_tokens(level, row).into_iter().flatten() {
                        for c in 0..d {
                            dx[t * d + c] += g[c] / count;
                        }
                    }
                }
                Downsample::Learned(wts) => {
                    let lw = &wts.levels[li];
                    let w = match which {
                        Pooled::Keys => &lw.wk,
                        Pooled::Values => &lw.wv,
                        Pooled::Queries => &lw.wq,
                    };
                    let mut grads = dw.as_deref_mut().map(|gw| {
                        let lg = &mut gw[li];
                        match which {
                            Pooled::Keys => (&mut lg.wk, &mut lg.bk),
                            Pooled::Values => (&mut lg.wv, &mut lg.bv),
                            Pooled::Queries => (&mut lg.wq, &mut lg.bq),
                        }
                    });
                    let (j, taps) = (row % p, geometry.kernel_len(level));
                    let runs = geometry.kernel_taps(level, row);
                    for c in 0..d {
                        if let Some((_, gb)) = grads.as_mut() {
                            gb[c * p + j] += g[c];
                        }
                        for run in &runs {
                            // Tokens beyond n are zeros: no taps there, no gradient.
                            for (kidx, tok) in (run.kernel..).zip(run.tokens.clone()) {
                                let widx = (c * p + j) * taps + kidx;
                                dx[tok * d + c] += w[widx] as f64 * g[c];
                                if let Some((gw, _)) = grads.as_mut() {
                                    gw[widx] += g[c] * x[tok * d + c];
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
