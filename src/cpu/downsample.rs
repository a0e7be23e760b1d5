//! Coarse keys and values of every level (algorithm.md §4), and the coarse queries of §6, in
//! f64, one head at a time. CPU mirror of `shaders/downsample.wgsl`.

use crate::config::Downsample;
use crate::levels::{sub_window, Levels};

/// Downsampled rows of one level: `rows` = windows * p rows of `d` values, row a*p + j.
pub struct CoarseLevel {
    /// (windows * p, d) row-major.
    pub keys: Vec<f64>,
    /// (windows * p, d) row-major.
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

/// Downsamples one head's K, V or Q, `x` of shape (n, d), at every level: one
/// (windows * p, d) row-major tensor per level 1..=L, row a*p + j pooling S(l, a, j)
/// (an empty sub-window gives a zero row in Average mode).
pub fn downsample_one(
    x: &[f64],
    d: usize,
    levels: &Levels,
    mode: &Downsample,
    which: Pooled,
) -> Vec<Vec<f64>> {
    let (n, m, p) = (levels.n, levels.m, levels.p);
    levels
        .levels
        .iter()
        .map(|lv| {
            let mut out = vec![0f64; lv.windows * p * d];
            for a in 0..lv.windows {
                for j in 0..p {
                    let row = &mut out[(a * p + j) * d..(a * p + j + 1) * d];
                    match mode {
                        Downsample::Average => {
                            let s = sub_window(n, m, p, lv.level, a, j);
                            if s.is_empty() {
                                continue;
                            }
                            let count = s.len() as f64;
                            for t in s {
                                for c in 0..d {
                                    row[c] += x[t * d + c];
                                }
                            }
                            row.iter_mut().for_each(|r| *r /= count);
                        }
                        Downsample::Learned(wts) => {
                            let lw = &wts.levels[lv.level - 1];
                            let (w, b) = match which {
                                Pooled::Keys => (&lw.wk, &lw.bk),
                                Pooled::Values => (&lw.wv, &lw.bv),
                                Pooled::Queries => (&lw.wq, &lw.bq),
                            };
                            let win = lv.window;
                            for c in 0..d {
                                let mut acc = b[c * p + j] as f64;
                                for t in 0..win {
                                    let tok = a * win + t;
                                    if tok >= n {
                                        break; // tokens beyond n count as zero
                                    }
                                    acc += w[(c * p + j) * win + t] as f64 * x[tok * d + c];
                                }
                                row[c] = acc;
                            }
                        }
                    }
                }
            }
            out
        })
        .collect()
}

/// Coarse keys and values of one head: `k`, `v` of shape (n, d); one entry per level 1..=L.
pub fn downsample_head(
    k: &[f64],
    v: &[f64],
    d: usize,
    levels: &Levels,
    mode: &Downsample,
) -> Vec<CoarseLevel> {
    let ks = downsample_one(k, d, levels, mode, Pooled::Keys);
    let vs = downsample_one(v, d, levels, mode, Pooled::Values);
    ks.into_iter()
        .zip(vs)
        .map(|(keys, values)| CoarseLevel { keys, values })
        .collect()
}
