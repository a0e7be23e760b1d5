//! Reading learned downsampling weights from an .npz archive.
//!
//! Keys, for levels l = 1, 2, ... (read until `k_w{l}` is absent): `k_w{l}`, `v_w{l}` of shape
//! (d, p, m*2^(l-1)) and `k_b{l}`, `v_b{l}` of shape (d, p); float32 or float64. Optionally
//! `q_w{l}`, `q_b{l}` (same shapes), the coarse queries' weights (algorithm.md §6): a level
//! without them gets the box initialisation for its queries. On a 2D grid (`--grid`) the
//! weights are (d, p, s_l, s_l), s_l = m*2^(l-1) (algorithm.md §9).
//! The library checks the level count and lengths; here we check full ndarray shapes, because a
//! transposed or mis-sized array can have the right length and would silently be misread.

use crate::error::{CliError, CliResult};
use crate::npz::Npz;
use multipole_attn::{LearnedWeights, LevelWeights};
use std::collections::BTreeSet;
use std::path::Path;

/// Window size w_l = m * 2^(l-1), or None if it overflows (an absurd level count).
fn window_size(block: usize, level: usize) -> Option<usize> {
    let shift = u32::try_from(level - 1).ok()?;
    block.checked_mul(1usize.checked_shl(shift)?)
}

/// Reads learned weights for head dimension `head_dim`, block size `block` and rank `rank`
/// (which fix every expected shape). `block` and `rank` must already be valid (m >= 1, p | m).
/// `needed` is the number of coarse levels the sequence has: with none (n <= 2 m) no weights
/// are used, so an archive without `k_w1` is accepted then, and only then. `grid`: 2D weights
/// (algorithm.md §9), `k_w{l}` of shape (d, p, s_l, s_l) with s_l = m 2^(l-1).
pub fn read_weights(
    path: &Path,
    head_dim: usize,
    block: usize,
    rank: usize,
    needed: usize,
    grid: bool,
) -> CliResult<LearnedWeights> {
    let src = format!("weights file {}", path.display());
    let mut npz = Npz::open(path, src.clone())?;
    let names = npz.names();
    let mut used = BTreeSet::new();
    let mut levels = Vec::new();
    let mut box_q = Vec::new();
    for l in 1usize.. {
        if !names.contains(&format!("k_w{l}")) {
            break;
        }
        let w = window_size(block, l).ok_or_else(|| {
            CliError::Input(format!("{src}: level {l} is too deep for m = {block}"))
        })?;
        let mut get = |prefix: &str, shape: &[usize]| -> CliResult<Vec<f32>> {
            let key = format!("{prefix}{l}");
            if !names.contains(&key) {
                return Err(CliError::Input(format!(
                    "{src} has k_w{l} but no {key}: every level l needs k_w{{l}}, k_b{{l}}, v_w{{l}} and v_b{{l}} (and q_w{{l}} with q_b{{l}}, or neither)"
                )));
            }
            // The shape is checked from the member's header, before its data is read.
            let t = npz.read(&key, shape).map_err(|e| match e {
                CliError::Input(m) => {
                    CliError::Input(format!("{m} (for d = {head_dim}, p = {rank}, m = {block})"))
                }
                other => other,
            })?;
            used.insert(key.clone());
            t.into_f32(&format!("{key} in {src}"))
        };
        let wshape = if grid {
            vec![head_dim, rank, w, w]
        } else {
            vec![head_dim, rank, w]
        };
        let bshape = [head_dim, rank];
        let (wk, bk, wv, bv) = (
            get("k_w", &wshape)?,
            get("k_b", &bshape)?,
            get("v_w", &wshape)?,
            get("v_b", &bshape)?,
        );
        // Query weights are optional per level (only coarse queries use them); one without the
        // other is most likely a mistake, so it is an error like a missing k_b.
        let has_q = names.contains(&format!("q_w{l}")) || names.contains(&format!("q_b{l}"));
        let (wq, bq) = if has_q {
            (get("q_w", &wshape)?, get("q_b", &bshape)?)
        } else {
            box_q.push(l);
            (Vec::new(), Vec::new())
        };
        levels.push(LevelWeights {
            wk,
            bk,
            wv,
            bv,
            wq,
            bq,
        });
    }
    // Levels without query weights take the box initialisation (the default of §4).
    if !box_q.is_empty() {
        let boxed = if grid {
            LearnedWeights::box_init_grid(head_dim, block, rank, levels.len())
        } else {
            LearnedWeights::box_init(head_dim, block, rank, levels.len())
        };
        for &l in &box_q {
            levels[l - 1].wq = boxed.levels[l - 1].wq.clone();
            levels[l - 1].bq = boxed.levels[l - 1].bq.clone();
        }
    }
    if levels.is_empty() && needed > 0 {
        let found: Vec<&str> = names.iter().map(String::as_str).collect();
        return Err(CliError::Input(format!(
            "{src} has no key k_w1 (expected k_w1, k_b1, v_w1, v_b1, k_w2, ... for the {needed} coarse level(s) of this sequence); it holds [{}]",
            found.join(", ")
        )));
    }
    // Unused keys are most likely a typo or a gap in the levels: say so rather than drop them.
    let unused: Vec<&str> = names.difference(&used).map(String::as_str).collect();
    if !unused.is_empty() {
        eprintln!(
            "warning: {src}: ignoring keys [{}] (levels are read from 1 up to the first missing k_w{{l}})",
            unused.join(", ")
        );
    }
    Ok(LearnedWeights {
        head_dim,
        block,
        rank,
        levels,
    })
}
