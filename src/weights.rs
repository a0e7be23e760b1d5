//! Learned downsampling weights (algorithm.md §4, §6): per coarse level l, for keys, values and
//! (coarse queries only) queries, a weight of shape (head_dim, p, w_l) and a bias of shape
//! (head_dim, p), shared by all heads.

use crate::error::{FmaError, Result};
use crate::geometry::{cell_side, Grid};
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

    /// The box-average initialisation of 2D weights (algorithm.md §9) for cells of side
    /// `block` (r) and `levels` levels: per level l a (head_dim, p, s_l, s_l) weight with
    /// `w[c, j, dy, dx] = p / s_l^2` when grid row dy of the cell falls in band j (rows
    /// j s_l / p .. (j + 1) s_l / p), else 0; biases 0. On full cells this equals Average.
    pub fn box_init_grid(head_dim: usize, block: usize, rank: usize, levels: usize) -> Self {
        let levels = (1..=levels)
            .map(|l| {
                let s = cell_side(block, l);
                let taps = s * s;
                let band = s / rank;
                let mut wk = vec![0f32; head_dim * rank * taps];
                for c in 0..head_dim {
                    for j in 0..rank {
                        for k in j * band * s..(j + 1) * band * s {
                            wk[(c * rank + j) * taps + k] = rank as f32 / taps as f32;
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

    /// [`LearnedWeights::box_init_grid`] with exactly the levels `grid` needs with cells of
    /// side `block`.
    pub fn box_init_grid_for(head_dim: usize, block: usize, rank: usize, grid: Grid) -> Self {
        Self::box_init_grid(head_dim, block, rank, grid.num_levels(block.max(1)))
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
        let need = num_levels(seq, block);
        let what = format!("a sequence of {seq} tokens with m = {block}");
        self.validate_levels(head_dim, block, rank, need, &what, with_queries, |l| {
            let w = window(block, l);
            (w, format!("{w}"))
        })
    }

    /// [`LearnedWeights::validate`] for 2D weights on `grid` with cells of side `block` (r):
    /// per level l a (head_dim, p, s_l, s_l) weight (algorithm.md §9).
    pub fn validate_grid(
        &self,
        head_dim: usize,
        block: usize,
        rank: usize,
        grid: Grid,
        with_queries: bool,
    ) -> Result<()> {
        let need = grid.num_levels(block);
        let what = format!("a {grid} grid with r = {block}");
        self.validate_levels(head_dim, block, rank, need, &what, with_queries, |l| {
            let s = cell_side(block, l);
            (s * s, format!("{s}, {s}"))
        })
    }

    /// The checks of `validate` with `need` levels, level l's kernel of `taps(l).0` values
    /// (shape `taps(l).1` after (head_dim, p)).
    #[allow(clippy::too_many_arguments)]
    fn validate_levels(
        &self,
        head_dim: usize,
        block: usize,
        rank: usize,
        need: usize,
        what: &str,
        with_queries: bool,
        taps: impl Fn(usize) -> (usize, String),
    ) -> Result<()> {
        if (self.head_dim, self.block, self.rank) != (head_dim, block, rank) {
            return Err(FmaError::Weights(format!(
                "made for (head_dim {}, m {}, p {}), but the call has (head_dim {head_dim}, m {block}, p {rank})",
                self.head_dim, self.block, self.rank
            )));
        }
        if self.levels.len() < need {
            return Err(FmaError::Weights(format!(
                "{what} needs {need} levels, but only {} are given (missing level {})",
                self.levels.len(),
                self.levels.len() + 1
            )));
        }
        for (i, lw) in self.levels.iter().enumerate().take(need) {
            let l = i + 1;
            let (len, w) = taps(l);
            let wlen = head_dim * rank * len;
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
