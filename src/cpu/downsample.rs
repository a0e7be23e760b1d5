//! Coarse keys and values of every level (algorithm.md §4), and the coarse queries of §6, in
//! f64, one head at a time, for any [`Geometry`]. CPU mirror of `shaders/downsample.wgsl`.

use crate::config::Downsample;
use crate::geometry::Geometry;

/// Downsampled rows of one level: `level_rows` rows of `d` values, row r pooling the tokens of
/// row r of the geometry (1D: row a*p + j pools S(l, a, j)).
pub struct CoarseLevel {
    /// (level_rows, d) row-major.
    pub keys: Vec<f64>,
    /// (level_rows, d) row-major.
    pub values: Vec<f64>,
}

/// Which tensor is pooled: it picks the learned weights (`wk`/`bk`, `wv`/`bv`, `wq`/`bq`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pooled {
    /// Keys.
    Keys,
    /// Values.
    Values,
    /// Queries (coarse queries, algorithm.md §6).
    Queries,
}

/// Downsamples one head's K, V or Q, `x` of shape (n, d), at every level of `geometry`: one
/// (level_rows, d) row-major tensor per level 1..=L. Average: row r is the mean of the tokens
/// it stands for (a zero row when there are none). Learned: row r, basis j = r % p, is
/// `b[c, j] + sum over the row's kernel taps of w[c, j, k] * x[token, c]`.
pub fn downsample_one<G: Geometry + ?Sized>(
    x: &[f64],
    d: usize,
    geometry: &G,
    mode: &Downsample,
    which: Pooled,
) -> Vec<Vec<f64>> {
    let p = geometry.rank();
    (1..=geometry.num_levels())
        .map(|level| {
            let rows = geometry.level_rows(level);
            let mut out = vec![0f64; rows * d];
            for r in 0..rows {
                let row = &mut out[r * d..(r + 1) * d];
                match mode {
                    Downsample::Average => {
                        let count = geometry.row_count(level, r);
                        if count == 0 {
                            continue;
                        }
                        for t in geometry.row_tokens(level, r).into_iter().flatten() {
                            for c in 0..d {
                                row[c] += x[t * d + c];
                            }
                        }
                        row.iter_mut().for_each(|v| *v /= count as f64);
                    }
                    Downsample::Learned(wts) => {
                        let lw = &wts.levels[level - 1];
                        let (w, b) = match which {
                            Pooled::Keys => (&lw.wk, &lw.bk),
                            Pooled::Values => (&lw.wv, &lw.bv),
                            Pooled::Queries => (&lw.wq, &lw.bq),
                        };
                        let (j, taps) = (r % p, geometry.kernel_len(level));
                        let runs = geometry.kernel_taps(level, r);
                        for c in 0..d {
                            let mut acc = b[c * p + j] as f64;
                            let weights = &w[(c * p + j) * taps..(c * p + j + 1) * taps];
                            for run in &runs {
                                for (k, tok) in (run.kernel..).zip(run.tokens.clone()) {
                                    acc += weights[k] as f64 * x[tok * d + c];
                                }
                            }
                            row[c] = acc;
                        }
                    }
                }
            }
            out
        })
        .collect()
}

/// Coarse keys and values of one head: `k`, `v` of shape (n, d); one entry per level 1..=L.
pub fn downsample_head<G: Geometry + ?Sized>(
    k: &[f64],
    v: &[f64],
    d: usize,
    geometry: &G,
    mode: &Downsample,
) -> Vec<CoarseLevel> {
    let ks = downsample_one(k, d, geometry, mode, Pooled::Keys);
    let vs = downsample_one(v, d, geometry, mode, Pooled::Values);
    ks.into_iter()
        .zip(vs)
        .map(|(keys, values)| CoarseLevel { keys, values })
        .collect()
}
