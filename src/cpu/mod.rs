//! The CPU reference, in f64: FMA with fine or coarse queries exactly as algorithm.md says, and
//! exact dense softmax attention. It is the oracle of every GPU test, so it is written for reading,
//! not for speed: per query, list the keys it sees, then take one softmax over them.
//!
//! The index maps come from a [`Geometry`] only: the public functions build the 1D [`Line`] of
//! algorithm.md §2-3, or the 2D [`GridGeometry`] of §9 when `cfg.grid` is set, from the
//! configuration, and their `_in` twins take any geometry.

pub mod backward;
mod checks;
pub mod coarse;
pub mod decode;
pub mod dense_backward;
pub mod downsample;
mod entry;
pub mod gather;
pub mod level_mass;
mod variants;
pub mod varlen;

use crate::config::{FmaConfig, Queries};
#[cfg(test)]
use crate::error::FmaError;
use crate::error::Result;
use crate::geometry::{Geometry, GridGeometry, Line};
use crate::shape::Shape;
use crate::variants::Variants;
use checks::{check_geometry, check_inputs};
use coarse::CoarseQueries;
use downsample::downsample_head;
use gather::{seen_keys_in, SeenKey};
use variants::{softmax_row_sink, RowRules};

pub use backward::{fma_backward, fma_backward_in};
pub use dense_backward::{dense_backward, dense_backward_with};
pub use entry::{backward, forward};
pub use varlen::{
    dense_attention_varlen, dense_attention_varlen_with, dense_backward_varlen,
    dense_backward_varlen_with, fma_backward_varlen, fma_forward_varlen,
};

/// Output of the CPU reference: O of shape (batch, heads, seq, head_dim) and the per-row
/// log-sum-exp of the logits, shape (batch, heads, seq).
#[derive(Clone, Debug)]
pub struct Reference {
    /// Attention output, (batch, heads, seq, head_dim).
    pub o: Vec<f64>,
    /// LSE_i = M_i + ln Z_i, (batch, heads, seq).
    pub lse: Vec<f64>,
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// The count correction of coarse row `row` of level `level` (algorithm.md §5): ln |S| added to
/// its logit, or 0 when `cfg` turns the correction off.
fn count_bias<G: Geometry + ?Sized>(
    geometry: &G,
    cfg: &FmaConfig,
    level: usize,
    row: usize,
) -> f64 {
    if cfg.count_correction {
        (geometry.row_count(level, row) as f64).ln()
    } else {
        0.0
    }
}

/// Fast Multipole Attention (algorithm.md §2-7) of `q`, `k`, `v`, each of shape
/// (batch, heads, seq, head_dim), row-major; fine or coarse queries as `cfg.queries` says.
/// K, V may be longer (seq_kv > seq) with causal fine queries: the queries are the last seq
/// positions ([`crate::cross`]).
///
/// Every query i takes one softmax over the keys it sees (`gather::seen_keys`): the near field
/// with q_i itself, the far lists of the coarse levels with q_i (fine queries) or with the
/// coarse query of the sub-window holding i at that level (coarse queries, §6; bidirectional
/// only, causal + coarse is [`FmaError::CausalCoarseQueries`](crate::FmaError)). With
/// `cfg.grid` the tokens lie on that H x W grid in raster order (algorithm.md §9; seq = H W).
pub fn fma_forward(
    q: &[f64],
    k: &[f64],
    v: &[f64],
    shape: Shape,
    cfg: &FmaConfig,
) -> Result<Reference> {
    check_inputs(q, k, v, shape)?;
    if crate::cross::check_fma_cross(shape, cfg)? {
        // The last seq positions of a causal FMA over seq_kv tokens (`crate::cross`).
        let full = crate::cross::full_shape(shape);
        let r = fma_forward(&crate::cross::pad_rows(q, shape), k, v, full, cfg)?;
        return Ok(Reference {
            o: crate::cross::last_rows(&r.o, shape, shape.head_dim),
            lse: crate::cross::last_rows(&r.lse, shape, 1),
        });
    }
    cfg.validate(shape.head_dim, shape.seq)?;
    fma_forward_in(&*geometry_of(cfg, shape.seq), q, k, v, shape, cfg)
}

/// The geometry `cfg` asks for on a sequence of `seq` tokens (validated): the 1D [`Line`] of
/// (seq, block, rank, causal), or with `cfg.grid` the 2D [`GridGeometry`] of cells
/// block x block.
pub fn geometry_of(cfg: &FmaConfig, seq: usize) -> Box<dyn Geometry> {
    match cfg.grid {
        None => Box::new(Line::new(seq, cfg.block, cfg.rank, cfg.causal)),
        Some(grid) => Box::new(GridGeometry::new(grid, cfg.block, cfg.rank)),
    }
}

/// [`fma_forward`] in any geometry: `shape.seq` must be `geometry.tokens()`. The geometry decides
/// which keys each query sees (it replaces `cfg.block`, `cfg.rank` and `cfg.causal`); `cfg`
/// gives the downsampling, the count correction and the query resolution.
pub fn fma_forward_in<G: Geometry + ?Sized>(
    geometry: &G,
    q: &[f64],
    k: &[f64],
    v: &[f64],
    shape: Shape,
    cfg: &FmaConfig,
) -> Result<Reference> {
    check_inputs(q, k, v, shape)?;
    check_geometry(geometry, shape, cfg)?;
    cfg.validate_values()?;
    cfg.variants.validate(shape.heads, geometry.causal())?;
    let rules = RowRules::new(&cfg.variants);
    let (n, d, p) = (shape.seq, shape.head_dim, geometry.rank());
    let scale = 1.0 / (d as f64).sqrt();
    let mut o = vec![0f64; shape.elements()];
    let mut lse = vec![0f64; shape.rows()];
    for bh in 0..shape.batch_heads() {
        let head = bh * n * d..(bh + 1) * n * d;
        // Grouped-query heads read K/V head bh / group.
        let kv_head = (bh / shape.group()) * n * d..(bh / shape.group() + 1) * n * d;
        let (qh, kh, vh) = (&q[head.clone()], &k[kv_head.clone()], &v[kv_head]);
        let coarse = downsample_head(kh, vh, d, geometry, &cfg.downsample);
        let coarse_q = (cfg.queries == Queries::Coarse)
            .then(|| CoarseQueries::new(qh, d, geometry, &cfg.downsample));
        for i in 0..n {
            let qi = &qh[i * d..(i + 1) * d];
            // A window keeps the near field's keys in its band and no coarse level.
            let keys: Vec<SeenKey> = seen_keys_in(geometry, i)
                .into_iter()
                .filter(|key| match *key {
                    SeenKey::Fine(t) => rules.sees(i as i64, t),
                    SeenKey::Coarse { .. } => !rules.windowed(),
                })
                .collect();
            let logit_value = keys.iter().map(|key| match *key {
                SeenKey::Fine(t) => (
                    rules.logit(dot(qi, &kh[t * d..(t + 1) * d]) * scale),
                    &vh[t * d..(t + 1) * d],
                ),
                SeenKey::Coarse { level, window, j } => {
                    let query = coarse_q.as_ref().map_or(qi, |cq| cq.of_token(level, i));
                    let c = &coarse[level - 1];
                    let row = window * p + j;
                    let bias = count_bias(geometry, cfg, level, row);
                    (
                        rules.logit(dot(query, &c.keys[row * d..(row + 1) * d]) * scale) + bias,
                        &c.values[row * d..(row + 1) * d],
                    )
                }
            });
            lse[bh * n + i] = softmax_row_sink(
                logit_value,
                rules.sink(bh % shape.heads),
                &mut o[head.start + i * d..head.start + (i + 1) * d],
            );
        }
    }
    Ok(Reference { o, lse })
}

/// Exact dense softmax attention `softmax(Q K^T / sqrt(d)) V`: Q of shape (batch, heads, seq,
/// head_dim), K and V of (batch, kv_heads, seq_kv, head_dim) (query head h reads K/V head
/// h / (heads / kv_heads)). Causal, bottom-right aligned: query i sees keys
/// t <= i + seq_kv - seq (the queries are the last positions); with seq_kv < seq the first
/// seq - seq_kv queries see no key and get O = 0, LSE = -inf.
pub fn dense_attention(
    q: &[f64],
    k: &[f64],
    v: &[f64],
    shape: Shape,
    causal: bool,
) -> Result<Reference> {
    dense_attention_with(q, k, v, shape, causal, &Variants::default())
}

/// [`dense_attention`] with the softmax variants `variants` (issue 30, `docs/variants.md`):
/// capped logits, a sink term per query head in every row's denominator (a row with no key
/// then gets O = 0 and LSE = its sink), and a window i - L <= t <= i + R around each query's
/// key position (bottom-right aligned, as the causal mask).
pub fn dense_attention_with(
    q: &[f64],
    k: &[f64],
    v: &[f64],
    shape: Shape,
    causal: bool,
    variants: &Variants,
) -> Result<Reference> {
    let rows: Vec<usize> = (0..shape.rows()).collect();
    let (o, lse) = dense_attention_rows_with(q, k, v, shape, causal, variants, &rows)?;
    Ok(Reference { o, lse })
}

/// Exact dense attention for selected rows only (flat indices into (batch, heads, seq)):
/// returns O of shape (rows.len(), head_dim) and the LSE of those rows. For checking a few
/// rows of a long sequence without the O(n^2) cost of all of them.
pub fn dense_attention_rows(
    q: &[f64],
    k: &[f64],
    v: &[f64],
    shape: Shape,
    causal: bool,
    rows: &[usize],
) -> Result<(Vec<f64>, Vec<f64>)> {
    dense_attention_rows_with(q, k, v, shape, causal, &Variants::default(), rows)
}

/// [`dense_attention_rows`] with the softmax variants `variants` ([`dense_attention_with`]).
pub fn dense_attention_rows_with(
    q: &[f64],
    k: &[f64],
    v: &[f64],
    shape: Shape,
    causal: bool,
    variants: &Variants,
    rows: &[usize],
) -> Result<(Vec<f64>, Vec<f64>)> {
    check_inputs(q, k, v, shape)?;
    variants.validate(shape.heads, causal)?;
    let rules = RowRules::new(variants);
    let (n, n_kv, d) = (shape.seq, shape.seq_kv, shape.head_dim);
    let scale = 1.0 / (d as f64).sqrt();
    let mut o = vec![0f64; rows.len() * d];
    let mut lse = vec![0f64; rows.len()];
    for (r, &row) in rows.iter().enumerate() {
        if row >= shape.rows() {
            return Err(crate::error::FmaError::ShapeMismatch {
                what: "row index".into(),
                expected: format!("< {} rows of {shape}", shape.rows()),
                got: row.to_string(),
            });
        }
        let (head, i) = (row / n, row % n);
        let (base, kv_base) = (head * n * d, (head / shape.group()) * n_kv * d);
        let qi = &q[base + i * d..base + (i + 1) * d];
        // Causal: query i sits at key position i + n_kv - n (before key 0 when negative).
        let last = if causal {
            (i + n_kv + 1).saturating_sub(n)
        } else {
            n_kv
        };
        let pos = i as i64 + n_kv as i64 - n as i64;
        let logit_value = (0..last).filter(|&t| rules.sees(pos, t)).map(|t| {
            let kt = &k[kv_base + t * d..kv_base + (t + 1) * d];
            (
                rules.logit(dot(qi, kt) * scale),
                &v[kv_base + t * d..kv_base + (t + 1) * d],
            )
        });
        // No key and no sink: O = 0, LSE = -inf.
        lse[r] = softmax_row_sink(
            logit_value,
            rules.sink(head % shape.heads),
            &mut o[r * d..(r + 1) * d],
        );
    }
    Ok((o, lse))
}

/// Keys a causal query row `i` of `n` sees among `n_kv` (bottom-right aligned: keys
/// t <= i + n_kv - n, so [0, visible_keys)); 0 for the first n - n_kv rows when n_kv < n.
pub fn visible_keys(i: usize, n: usize, n_kv: usize) -> usize {
    (i + n_kv + 1).saturating_sub(n).min(n_kv)
}

/// Widens an f32 tensor to f64 for the reference.
pub fn widen(x: &[f32]) -> Vec<f64> {
    x.iter().map(|&v| v as f64).collect()
}

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_coarse;
#[cfg(test)]
mod tests_grid;
#[cfg(test)]
mod tests_variants;
