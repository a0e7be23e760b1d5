//! Learned downsampling weights (algorithm.md §4, §6): per coarse level l, for keys, values and
//! (coarse queries only) queries, a weight of shape (head_dim, p, w_l) and a bias of shape
//! (head_dim, p), shared by all heads.

use crate::error::{FmaError, Result};
use crate::levels::{num_levels, window};

/// The weights of one coarse level l (row-major f32):
/// `wk`, `wv`, `wq`: (head_dim, p, w_l); `bk`, `bv`, `bq`: (head_dim, p).
/// Coarse key j of window a, channel c:
/// `K~[a*p+j, c] = bk[c, j] + sum_{t < w_l, a*w_l+t < n} wk[c, j, t] * K[a*w_l + t, c]`.
#[derive(Clone, Debug, PartialEq)]
pub struct LevelWeights {
    /// Key weights, (head_dim, p, w_l).
    pub wk: Vec<f32>,
    /// Key biases, (head_dim, p).
    pub bk: Vec<f32>,
    /// Value weights, (head_dim, p, w_l).
    pub wv: Vec<f32>,
    /// Value biases, (head_dim, p).
    pub bv: Vec<f32>,
    /// Query weights, (head_dim, p, w_l): used by coarse queries only (algorithm.md §6);
    /// fine queries ignore them (they may then be empty).
    pub wq: Vec<f32>,
    /// Query biases, (head_dim, p): coarse queries only.
    pub bq: Vec<f32>,
}

/// Learned weights for levels 1..=L (index 0 holds level 1). More levels than a sequence
/// needs are allowed (the extra ones are unused); fewer is an error.
#[derive(Clone, Debug, PartialEq)]
pub struct LearnedWeights {
    /// Head dimension d the weights were made for.
    pub head_dim: usize,
    /// Block size m the weights were made for (fixes w_l = m 2^(l-1)).
    pub block: usize,
    /// Rank p the weights were made for.
    pub rank: usize,
    /// Per level, from level 1.
    pub levels: Vec<LevelWeights>,
}

impl LearnedWeights {
    /// The box-average initialisation for `levels` levels: `w[c,j,t] = p / w_l` when token t of
    /// the window falls in sub-window j, else 0; biases 0. On full windows this equals Average.
    pub fn box_init(head_dim: usize, block: usize, rank: usize, levels: usize) -> Self {
        let levels = (1..=levels)
            .map(|l| {
                let w = window(block, l);
                let s = w / rank;
                let mut wk = vec![0f32; head_dim * rank * w];
                for c in 0..head_dim {
                    for j in 0..rank {
                        for t in j * s..(j + 1) * s {
                            wk[(c * rank + j) * w + t] = rank as f32 / w as f32;
                        }
                    }
                }
                LevelWeights {
                    wv: wk.clone(),
                    wq: wk.clone(),
                    wk,
                    bk: vec![0.0; head_dim * rank],
                    bv: vec![0.0; head_dim * rank],
                    bq: vec![0.0; head_dim * rank],
                }
            })
            .collect();
        Self {
            head_dim,
            block,
            rank,
            levels,
        }
    }

    /// The box initialisation with exactly the levels a sequence of `seq` tokens needs.
    pub fn box_init_for(head_dim: usize, block: usize, rank: usize, seq: usize) -> Self {
        Self::box_init(head_dim, block, rank, num_levels(seq, block.max(1)))
    }

    /// Checks that the weights fit (head_dim, m, p), cover every level a sequence of `seq`
    /// tokens uses, and have the right length per level, the query weights too when
    /// `with_queries` (coarse queries). Cheap: no pass over the values;
    /// [`LearnedWeights::check_finite`] does that.
    pub fn validate(
        &self,
        head_dim: usize,
        block: usize,
        rank: usize,
        seq: usize,
        with_queries: bool,
    ) -> Result<()> {
        if (self.head_dim, self.block, self.rank) != (head_dim, block, rank) {
            return Err(FmaError::Weights(format!(
                "made for (head_dim {}, m {}, p {}), but the call has (head_dim {head_dim}, m {block}, p {rank})",
                self.head_dim, self.block, self.rank
            )));
        }
        let need = num_levels(seq, block);
        if self.levels.len() < need {
            return Err(FmaError::Weights(format!(
                "a sequence of {seq} tokens with m = {block} needs {need} levels, but only {} are given (missing level {})",
                self.levels.len(),
                self.levels.len() + 1
            )));
        }
        for (i, lw) in self.levels.iter().enumerate().take(need) {
            let l = i + 1;
            let w = window(block, l);
            let wlen = head_dim * rank * w;
            let blen = head_dim * rank;
            let mut checks = vec![
                (
                    "k_w",
                    lw.wk.len(),
                    wlen,
                    format!("({head_dim}, {rank}, {w})"),
                ),
                (
                    "v_w",
                    lw.wv.len(),
                    wlen,
                    format!("({head_dim}, {rank}, {w})"),
                ),
                ("k_b", lw.bk.len(), blen, format!("({head_dim}, {rank})")),
                ("v_b", lw.bv.len(), blen, format!("({head_dim}, {rank})")),
            ];
            if with_queries {
                checks.push((
                    "q_w",
                    lw.wq.len(),
                    wlen,
                    format!("({head_dim}, {rank}, {w})"),
                ));
                checks.push(("q_b", lw.bq.len(), blen, format!("({head_dim}, {rank})")));
            }
            for (name, len, want, shape) in checks {
                if len != want {
                    return Err(FmaError::Weights(format!(
                        "{name}{l} has {len} values, expected shape {shape} = {want}"
                    )));
                }
            }
        }
        Ok(())
    }

    /// Checks that every weight and bias is finite (one pass over all values).
    pub fn check_finite(&self) -> Result<()> {
        for (i, lw) in self.levels.iter().enumerate() {
            for (name, vals) in [
                ("k_w", &lw.wk),
                ("v_w", &lw.wv),
                ("k_b", &lw.bk),
                ("v_b", &lw.bv),
                ("q_w", &lw.wq),
                ("q_b", &lw.bq),
            ] {
                if let Some(pos) = vals.iter().position(|x| !x.is_finite()) {
                    return Err(FmaError::Weights(format!(
                        "{name}{} holds a non-finite value ({}) at flat index {pos}; weights must be finite",
                        i + 1,
                        vals[pos]
                    )));
                }
            }
        }
        Ok(())
    }
}
