//! Where one query's attention goes: the share of its single softmax (algorithm.md §5) that
//! falls on each level, level 0 being its fine keys and level l the coarse keys of level l.
//! What the browser demo draws next to the query's bands; the key list and the logits (scale,
//! count correction) are those of [`super::fma_forward`], and a test checks both give the same
//! log-sum-exp.

use crate::config::FmaConfig;
use crate::error::{FmaError, Result};
use crate::geometry::{Geometry, Line};
use crate::problem::Problem;
use crate::shape::Shape;

use super::checks::{check_geometry, check_inputs};
use super::downsample::downsample_head;
use super::gather::{seen_keys_in, SeenKey};
use super::{count_bias, dot};

/// One query's softmax, summed per level.
#[derive(Clone, Debug, PartialEq)]
pub struct LevelMass {
    /// Probability mass per level, length L + 1: `mass[0]` on the fine keys, `mass[l]` on the
    /// coarse keys of level l. Sums to 1.
    pub mass: Vec<f64>,
    /// Keys seen per level, length L + 1 (fine keys; coarse keys, p per far window).
    pub keys: Vec<usize>,
    /// The query's log-sum-exp over every key it sees (equals `fma_forward`'s LSE of the row).
    pub lse: f64,
}

/// The per-level softmax mass of query `i` of head `bh` (flat index batch * heads + head) of
/// the problem `p` under FMA with `cfg`. `q`, `k`, `v`: (batch, heads, seq, head_dim),
/// row-major. Costs one head's downsampling, O(n d L), plus the query's O(m + p L) keys.
pub fn level_mass(
    q: &[f64],
    k: &[f64],
    v: &[f64],
    p: &Problem,
    cfg: &FmaConfig,
    bh: usize,
    i: usize,
) -> Result<LevelMass> {
    let shape = p.shape;
    check_inputs(q, k, v, shape)?;
    let cfg = cfg.clone().causal(p.causal);
    cfg.validate(shape.head_dim, shape.seq)?;
    let geometry = Line::new(shape.seq, cfg.block, cfg.rank, p.causal);
    level_mass_in(&geometry, q, k, v, shape, &cfg, bh, i)
}

/// [`level_mass`] in any geometry (`shape.seq` must be `geometry.tokens()`); the keys and logits
/// are those of [`super::fma_forward_in`] with the same `geometry` and `cfg`.
#[allow(clippy::too_many_arguments)]
pub fn level_mass_in<G: Geometry + ?Sized>(
    geometry: &G,
    q: &[f64],
    k: &[f64],
    v: &[f64],
    shape: Shape,
    cfg: &FmaConfig,
    bh: usize,
    i: usize,
) -> Result<LevelMass> {
    check_inputs(q, k, v, shape)?;
    check_geometry(geometry, shape, cfg)?;
    cfg.validate_values()?;
    let (n, d, p) = (shape.seq, shape.head_dim, geometry.rank());
    for (what, value, bound) in [("head", bh, shape.batch_heads()), ("query", i, n)] {
        if value >= bound {
            return Err(FmaError::ShapeMismatch {
                what: format!("{what} index"),
                expected: format!("< {bound} for {shape}"),
                got: value.to_string(),
            });
        }
    }
    let head = bh * n * d..(bh + 1) * n * d;
    let (kh, vh) = (&k[head.clone()], &v[head.clone()]);
    let qi = &q[head.start + i * d..head.start + (i + 1) * d];
    let coarse = downsample_head(kh, vh, d, geometry, &cfg.downsample);
    let scale = 1.0 / (d as f64).sqrt();
    let logits: Vec<(usize, f64)> = seen_keys_in(geometry, i)
        .into_iter()
        .map(|key| match key {
            SeenKey::Fine(t) => (0, dot(qi, &kh[t * d..(t + 1) * d]) * scale),
            SeenKey::Coarse { level, window, j } => {
                let row = window * p + j;
                let bias = count_bias(geometry, cfg, level, row);
                let s = dot(qi, &coarse[level - 1].keys[row * d..(row + 1) * d]) * scale + bias;
                (level, s)
            }
        })
        .collect();
    let max = logits
        .iter()
        .map(|&(_, s)| s)
        .fold(f64::NEG_INFINITY, f64::max);
    let mut mass = vec![0f64; geometry.num_levels() + 1];
    let mut keys = vec![0usize; geometry.num_levels() + 1];
    for &(l, s) in &logits {
        mass[l] += (s - max).exp();
        keys[l] += 1;
    }
    let z: f64 = mass.iter().sum();
    mass.iter_mut().for_each(|x| *x /= z);
    Ok(LevelMass {
        mass,
        keys,
        lse: max + z.ln(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::{fma_forward, widen};
    use crate::levels::Levels;
    use crate::random::{fresh_seed, normal_tensor};

    #[test]
    fn level_mass_sums_to_one_and_matches_the_reference_lse() {
        let seed = fresh_seed();
        eprintln!("seed {seed}");
        for &(n, d, m, p, causal) in &[
            (1, 4, 4, 2, false),
            (97, 8, 4, 2, true),
            (1025, 16, 16, 4, false),
            (1000, 8, 8, 1, true),
        ] {
            let shape = Shape::new(1, 2, n, d);
            let q = widen(&normal_tensor(seed, shape.elements()));
            let k = widen(&normal_tensor(seed + 1, shape.elements()));
            let v = widen(&normal_tensor(seed + 2, shape.elements()));
            let cfg = FmaConfig::new(m, p);
            let problem = Problem::new(shape).causal(causal);
            let reference = fma_forward(&q, &k, &v, shape, &cfg.clone().causal(causal)).unwrap();
            let levels = Levels::new(n, m, p);
            for i in [0, n / 3, n / 2, n - 1] {
                let lm = level_mass(&q, &k, &v, &problem, &cfg, 1, i).unwrap();
                assert_eq!(lm.mass.len(), levels.count() + 1);
                let total: f64 = lm.mass.iter().sum();
                assert!(
                    (total - 1.0).abs() < 1e-12,
                    "seed {seed} n={n} i={i}: {total}"
                );
                assert!(lm.mass.iter().all(|&x| (0.0..=1.0).contains(&x)));
                // Same keys and logits as the reference: the same log-sum-exp, to rounding.
                let want = reference.lse[n + i];
                assert!(
                    (lm.lse - want).abs() < 1e-12 * want.abs().max(1.0),
                    "seed {seed} n={n} m={m} p={p} causal={causal} i={i}: {} vs {want}",
                    lm.lse
                );
                let fine = levels.fine_blocks().min(if causal { 2 } else { 3 });
                assert!(lm.keys[0] >= 1 && lm.keys[0] <= fine * m);
            }
        }
    }

    #[test]
    fn bad_indices_are_typed_errors() {
        let shape = Shape::new(1, 2, 10, 4);
        let x = vec![0.5f64; shape.elements()];
        let cfg = FmaConfig::new(4, 2);
        let p = Problem::new(shape);
        let e = level_mass(&x, &x, &x, &p, &cfg, 2, 0).unwrap_err();
        assert!(e.to_string().contains("head index"), "{e}");
        let e = level_mass(&x, &x, &x, &p, &cfg, 0, 10).unwrap_err();
        assert!(e.to_string().contains("query index"), "{e}");
    }
}
