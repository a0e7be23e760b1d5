//! What the reference checks before it computes: tensor lengths, and that the configuration
//! fits the geometry (for the 1D geometry `FmaConfig::validate` has checked more already).

use crate::config::{Downsample, FmaConfig, Queries};
use crate::error::{FmaError, Result};
use crate::geometry::Geometry;
use crate::shape::Shape;

/// Q holds (batch, heads, seq, head_dim) values, K and V (batch, heads, seq_kv, head_dim).
pub(super) fn check_inputs(q: &[f64], k: &[f64], v: &[f64], shape: Shape) -> Result<()> {
    shape.validate()?;
    shape.check_len("Q", q.len())?;
    shape.check_kv_len("K", k.len())?;
    shape.check_kv_len("V", v.len())?;
    Ok(())
}

/// As many keys as queries, the sequence is the geometry's tokens, coarse queries are not asked for with a causal
/// geometry, and learned weights have (d, p, kernel_len(l)) weights and (d, p) biases for every
/// level the geometry uses (the query weights too for coarse queries): what the reference
/// indexes, so a mismatch is a typed error, not a panic.
pub(super) fn check_geometry<G: Geometry + ?Sized>(
    geometry: &G,
    shape: Shape,
    cfg: &FmaConfig,
) -> Result<()> {
    shape.check_self_attention()?;
    if shape.seq != geometry.tokens() {
        return Err(FmaError::ShapeMismatch {
            what: "sequence length".into(),
            expected: format!("the geometry's {} tokens", geometry.tokens()),
            got: shape.seq.to_string(),
        });
    }
    if geometry.causal() && cfg.queries == Queries::Coarse {
        return Err(FmaError::CausalCoarseQueries);
    }
    let Downsample::Learned(w) = &cfg.downsample else {
        return Ok(());
    };
    let need = geometry.num_levels();
    if w.levels.len() < need {
        return Err(FmaError::Weights(format!(
            "the geometry needs {need} levels, but only {} are given",
            w.levels.len()
        )));
    }
    let (d, p) = (shape.head_dim, geometry.rank());
    for (l, lw) in (1..=need).zip(&w.levels) {
        let taps = geometry.kernel_len(l);
        let mut tensors = vec![
            ("k_w", lw.wk.len(), d * p * taps),
            ("v_w", lw.wv.len(), d * p * taps),
            ("k_b", lw.bk.len(), d * p),
            ("v_b", lw.bv.len(), d * p),
        ];
        if cfg.queries == Queries::Coarse {
            tensors.push(("q_w", lw.wq.len(), d * p * taps));
            tensors.push(("q_b", lw.bq.len(), d * p));
        }
        for (name, len, want) in tensors {
            if len != want {
                return Err(FmaError::Weights(format!(
                    "{name}{l} has {len} values, the geometry needs {want}"
                )));
            }
        }
    }
    Ok(())
}
