//! Incremental decoding in f64 (algorithm.md §10), the mirror of the decoding passes: one
//! head's cache (every key and value, every level's complete coarse rows, and the running sum
//! of each level's current window), appended a token at a time, and the row of a new query
//! from what the cache holds. Its rows equal the causal forward's (`fma_forward`) exactly: the
//! same keys (from the same index maps), coarse rows summed in the same order, one softmax.
//! The softmax variants of the configuration (docs/variants.md) as the forward applies them:
//! capped logits, the query head's sink in the denominator, and a window i - L ..= i with no
//! coarse level (then equal to windowed dense attention as well).

use super::variants::{softmax_row_sink, RowRules};
use super::{count_bias, dot};
use crate::config::{Downsample, FmaConfig};
use crate::geometry::Line;
use crate::levels::window;
use crate::variants::Variants;

use super::gather::{seen_keys_in, SeenKey};

/// One level's pooled rows so far and its incomplete window's running sums.
struct LevelCache {
    /// Complete windows' rows, (windows * p, d) each for keys and values.
    keys: Vec<f64>,
    values: Vec<f64>,
    /// The current window's running sums, (p, d): Average the sub-windows' token sums,
    /// Learned the bias plus the weighted tokens so far.
    acc_k: Vec<f64>,
    acc_v: Vec<f64>,
}

/// The decoding cache of one head, for a causal FMA with `cfg`'s m, p, downsampling and
/// count correction, over `levels` coarse levels (those of the longest sequence decoded).
pub struct Decoder {
    cfg: FmaConfig,
    rules: RowRules,
    /// The sink logit of the query head this cache answers for (`Decoder::head`).
    sink: Option<f64>,
    d: usize,
    k: Vec<f64>,
    v: Vec<f64>,
    levels: Vec<LevelCache>,
}

impl Decoder {
    /// An empty cache of head dimension `d` keeping `levels` coarse levels (none with a
    /// window), with `cfg`'s variants; with sinks, the query head's is chosen by
    /// [`Decoder::head`] (head 0 until then).
    pub fn new(cfg: &FmaConfig, d: usize, levels: usize) -> Self {
        let p = cfg.rank;
        let rules = RowRules::new(&cfg.variants);
        let levels = if rules.windowed() { 0 } else { levels };
        Self {
            cfg: cfg.clone().causal(true),
            sink: rules.sink(0),
            rules,
            d,
            k: Vec::new(),
            v: Vec::new(),
            levels: (0..levels)
                .map(|_| LevelCache {
                    keys: Vec::new(),
                    values: Vec::new(),
                    acc_k: vec![0.0; p * d],
                    acc_v: vec![0.0; p * d],
                })
                .collect(),
        }
    }

    /// Decodes with the softmax variants `v` in place of the configuration's (a window drops
    /// the coarse levels); with sinks, head 0's until [`Decoder::head`]. Call before the
    /// first token.
    pub fn with_variants(mut self, v: &Variants) -> Self {
        self.rules = RowRules::new(v);
        self.cfg.variants = v.clone();
        if self.rules.windowed() {
            self.levels.clear();
        }
        self.sink = self.rules.sink(0);
        self
    }

    /// Answers for query head `h` of a sequence (its sink joins every row's softmax).
    pub fn head(mut self, h: usize) -> Self {
        self.sink = self.rules.sink(h);
        self
    }

    /// Tokens so far.
    pub fn len(&self) -> usize {
        self.k.len() / self.d
    }

    /// Whether no token has arrived.
    pub fn is_empty(&self) -> bool {
        self.k.is_empty()
    }

    /// Appends one token's key and value (each of length d) and pools it into every level.
    pub fn append(&mut self, k: &[f64], v: &[f64]) {
        let t = self.len();
        self.k.extend_from_slice(k);
        self.v.extend_from_slice(v);
        self.pool(t, k, v);
    }

    /// Token `t` into the running window of every level; a window's rows are final when its
    /// last token arrives (Average: divided by w_l / p; Learned: the bias was its first term).
    fn pool(&mut self, t: usize, k: &[f64], v: &[f64]) {
        let (m, p, d) = (self.cfg.block, self.cfg.rank, self.d);
        for (lvl, cache) in self.levels.iter_mut().enumerate() {
            let w = window(m, lvl + 1);
            let off = t % w;
            let sub = w / p;
            for (acc, x, which) in [(&mut cache.acc_k, k, 0), (&mut cache.acc_v, v, 1)] {
                match &self.cfg.downsample {
                    Downsample::Average => {
                        if off == 0 {
                            acc.iter_mut().for_each(|a| *a = 0.0);
                        }
                        let j = off / sub;
                        for c in 0..d {
                            acc[j * d + c] += x[c];
                        }
                    }
                    Downsample::Learned(wts) => {
                        let lw = &wts.levels[lvl];
                        let (wt, b) = if which == 0 {
                            (&lw.wk, &lw.bk)
                        } else {
                            (&lw.wv, &lw.bv)
                        };
                        for j in 0..p {
                            for c in 0..d {
                                if off == 0 {
                                    acc[j * d + c] = b[c * p + j] as f64;
                                }
                                acc[j * d + c] += wt[(c * p + j) * w + off] as f64 * x[c];
                            }
                        }
                    }
                }
            }
            if off == w - 1 {
                let average = matches!(self.cfg.downsample, Downsample::Average);
                let scale = if average { 1.0 / sub as f64 } else { 1.0 };
                for (acc, rows) in [
                    (&cache.acc_k, &mut cache.keys),
                    (&cache.acc_v, &mut cache.values),
                ] {
                    rows.extend(acc.iter().map(|a| if average { a * scale } else { *a }));
                }
            }
        }
    }

    /// Output row and LSE of a query at the last position (i = len - 1), from the cache.
    pub fn attend(&self, q: &[f64]) -> (Vec<f64>, f64) {
        let (n, d, p) = (self.len(), self.d, self.cfg.rank);
        let i = n - 1;
        let geometry = Line::new(n, self.cfg.block, p, true);
        let scale = 1.0 / (d as f64).sqrt();
        let keys = if self.rules.windowed() {
            // The window's band, in the order the forward's near field sees it.
            (0..=i)
                .filter(|&t| self.rules.sees(i as i64, t))
                .map(SeenKey::Fine)
                .collect()
        } else {
            seen_keys_in(&geometry, i)
        };
        let logit_value = keys.iter().map(|key| match *key {
            SeenKey::Fine(t) => (
                self.rules
                    .logit(dot(q, &self.k[t * d..(t + 1) * d]) * scale),
                &self.v[t * d..(t + 1) * d],
            ),
            SeenKey::Coarse { level, window, j } => {
                let c = &self.levels[level - 1];
                let row = window * p + j;
                let bias = count_bias(&geometry, &self.cfg, level, row);
                (
                    self.rules
                        .logit(dot(q, &c.keys[row * d..(row + 1) * d]) * scale)
                        + bias,
                    &c.values[row * d..(row + 1) * d],
                )
            }
        });
        let mut out = vec![0.0; d];
        let lse = softmax_row_sink(logit_value, self.sink, &mut out);
        (out, lse)
    }

    /// Appends a token and returns its query's output row and LSE.
    pub fn step(&mut self, q: &[f64], k: &[f64], v: &[f64]) -> (Vec<f64>, f64) {
        self.append(k, v);
        self.attend(q)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::fma_forward;
    use crate::cpu::widen;
    use crate::levels::num_levels;
    use crate::random::normal_tensor;
    use crate::shape::Shape;
    use crate::variants::Window;
    use crate::weights::LearnedWeights;

    #[test]
    fn decoded_rows_equal_the_causal_forward_exactly() {
        let d = 5;
        for (n, m, p, learned, cc) in [
            (1, 4, 2, false, true),
            (7, 2, 1, false, true),
            (97, 4, 2, false, true),
            (97, 4, 2, true, true),
            (130, 8, 4, false, false),
            (130, 8, 2, true, false),
            (200, 3, 3, false, true),
        ] {
            let seed = n as u64 * 31 + m as u64;
            let [q, k, v] = [0, 1, 2].map(|t| widen(&normal_tensor(seed * 3 + t, n * d)));
            let mut cfg = FmaConfig::new(m, p).causal(true).count_correction(cc);
            if learned {
                let mut w = LearnedWeights::box_init(d, m, p, num_levels(n, m));
                // Not the box: every tap and bias distinct, so a wrong tap shows.
                for (l, lw) in w.levels.iter_mut().enumerate() {
                    for (x, (a, b)) in lw.wk.iter_mut().zip(lw.wv.iter_mut()).enumerate() {
                        *a += 0.01 * ((x + l) % 7) as f32;
                        *b -= 0.02 * ((x + 2 * l) % 5) as f32;
                    }
                    lw.bk
                        .iter_mut()
                        .enumerate()
                        .for_each(|(i, b)| *b = 0.1 * i as f32);
                    lw.bv
                        .iter_mut()
                        .enumerate()
                        .for_each(|(i, b)| *b = -0.05 * i as f32);
                }
                cfg = cfg.downsample(Downsample::Learned(w));
            }
            let full = fma_forward(&q, &k, &v, Shape::new(1, 1, n, d), &cfg).unwrap();
            let mut dec = Decoder::new(&cfg, d, num_levels(n, m));
            for i in 0..n {
                let r = i * d..(i + 1) * d;
                let (o, lse) = dec.step(&q[r.clone()], &k[r.clone()], &v[r.clone()]);
                assert_eq!(
                    o,
                    full.o[r].to_vec(),
                    "n {n} m {m} p {p} learned {learned} row {i}"
                );
                assert_eq!(lse, full.lse[i], "n {n} m {m} p {p} row {i}");
            }
        }
    }

    /// The variants alone and combined: every decoded row equals the causal forward's, bit
    /// for bit (the same keys in the same order, the same capped logits, the same sink), and
    /// with a window it equals windowed dense attention too.
    #[test]
    fn decoded_rows_with_variants_equal_the_causal_forward_exactly() {
        let (d, heads) = (4, 3);
        let sinks = Some(vec![0.7f32, -1.5, 2.0]);
        let window = |left| Some(Window { left, right: 0 });
        let none = Variants::default();
        for (n, m, v) in [
            (
                97,
                4,
                Variants {
                    softcap: Some(1.5),
                    ..none.clone()
                },
            ),
            (
                70,
                8,
                Variants {
                    sinks: sinks.clone(),
                    ..none.clone()
                },
            ),
            (
                50,
                8,
                Variants {
                    window: window(5),
                    ..none.clone()
                },
            ),
            (
                61,
                4,
                Variants {
                    softcap: Some(2.0),
                    sinks: sinks.clone(),
                    window: window(4),
                },
            ),
            (
                33,
                64,
                Variants {
                    sinks,
                    window: window(20),
                    ..none.clone()
                },
            ),
        ] {
            let shape = Shape::new(1, heads, n, d);
            let seed = n as u64 * 7 + m as u64;
            let [q, k, v_] = [0, 1, 2].map(|t| widen(&normal_tensor(seed + t, heads * n * d)));
            let cfg = FmaConfig::new(m, 2).causal(true).variants(v.clone());
            let full = fma_forward(&q, &k, &v_, shape, &cfg).unwrap();
            let dense = crate::cpu::dense_attention_with(&q, &k, &v_, shape, true, &v).unwrap();
            for h in 0..heads {
                let mut dec = Decoder::new(&FmaConfig::new(m, 2), d, num_levels(n, m))
                    .with_variants(&v)
                    .head(h);
                for i in 0..n {
                    let r = (h * n + i) * d..(h * n + i + 1) * d;
                    let (o, lse) = dec.step(&q[r.clone()], &k[r.clone()], &v_[r.clone()]);
                    let label = format!("n {n} m {m} {v:?} head {h} row {i}");
                    assert_eq!(o, full.o[r.clone()].to_vec(), "{label}");
                    assert_eq!(lse, full.lse[h * n + i], "{label}");
                    if v.window.is_some() {
                        assert_eq!(o, dense.o[r].to_vec(), "{label}: dense");
                        assert_eq!(lse, dense.lse[h * n + i], "{label}: dense");
                    }
                }
            }
        }
    }
}
