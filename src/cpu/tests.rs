use super::gather::coverage;
use super::*;
use crate::config::Downsample;
use crate::levels::{far_list, num_levels};
use crate::random::{fresh_seed, normal_tensor};
use crate::weights::LearnedWeights;

#[test]
fn tiling_property_holds_for_every_query() {
    for &(m, p) in &[(1, 1), (2, 1), (4, 2), (6, 3), (16, 4), (64, 2)] {
        for n in [1, 2, 3, 7, 31, 97, 128, 200, 1000, 1025] {
            let levels = Levels::new(n, m, p);
            for causal in [false, true] {
                for i in 0..n {
                    let cov = coverage(&levels, causal, i);
                    for (t, &c) in cov.iter().enumerate() {
                        let want = if causal && t > i { 0 } else { 1 };
                        assert_eq!(
                            c, want,
                            "n={n} m={m} p={p} causal={causal} query {i} covers key {t} {c} times"
                        );
                    }
                }
            }
        }
    }
}

pub(super) fn max_abs_diff(a: &[f64], b: &[f64]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
}

#[test]
fn no_coarse_levels_equals_dense() {
    // n <= 2m gives L = 0: the near field is the whole (causal: past) sequence.
    let seed = fresh_seed();
    for &(n, m) in &[(1, 4), (7, 4), (8, 4), (30, 16), (128, 64)] {
        assert_eq!(num_levels(n, m), 0);
        let shape = Shape::new(1, 2, n, 8);
        let q = widen(&normal_tensor(seed, shape.elements()));
        let k = widen(&normal_tensor(seed + 1, shape.elements()));
        let v = widen(&normal_tensor(seed + 2, shape.elements()));
        for causal in [false, true] {
            let cfg = FmaConfig::new(m, 2.min(m)).causal(causal);
            let f = fma_forward(&q, &k, &v, shape, &cfg).unwrap();
            let d = dense_attention(&q, &k, &v, shape, causal).unwrap();
            assert!(max_abs_diff(&f.o, &d.o) < 1e-12, "seed {seed} n={n} m={m}");
            assert!(
                max_abs_diff(&f.lse, &d.lse) < 1e-12,
                "seed {seed} n={n} m={m}"
            );
        }
    }
}

/// K and V made constant on every sub-window in query i's far lists (random elsewhere), so
/// that the coarse keys it sees are exactly the keys they stand for.
pub(super) fn flatten_far_field(
    k: &mut [f64],
    v: &mut [f64],
    levels: &Levels,
    d: usize,
    causal: bool,
    i: usize,
) {
    for lv in &levels.levels {
        for b in far_list(i / lv.window, causal, lv.windows) {
            for j in 0..levels.p {
                let s = sub_window(levels.n, levels.m, levels.p, lv.level, b, j);
                let first = s.start;
                for t in s {
                    for c in 0..d {
                        k[t * d + c] = k[first * d + c];
                        v[t * d + c] = v[first * d + c];
                    }
                }
            }
        }
    }
}

#[test]
fn exact_when_far_field_is_constant_on_sub_windows() {
    let seed = fresh_seed();
    let d = 8;
    // n = 256, m = 16: full windows at every level, so Learned (box) is exact too.
    for &(n, m, p, learned) in &[
        (256, 16, 2, false),
        (256, 16, 2, true),
        (256, 16, 4, true),
        (97, 8, 2, false),
        (1000, 16, 4, false),
    ] {
        let levels = Levels::new(n, m, p);
        let shape = Shape::new(1, 1, n, d);
        for causal in [false, true] {
            for (trial, i) in [0, n / 3, n / 2 + 1, n - 1].into_iter().enumerate() {
                let s = seed + 10 * trial as u64;
                let q = widen(&normal_tensor(s, n * d));
                let mut k = widen(&normal_tensor(s + 1, n * d));
                let mut v = widen(&normal_tensor(s + 2, n * d));
                flatten_far_field(&mut k, &mut v, &levels, d, causal, i);
                let mode = if learned {
                    Downsample::Learned(LearnedWeights::box_init_for(d, m, p, n))
                } else {
                    Downsample::Average
                };
                let cfg = FmaConfig::new(m, p).causal(causal).downsample(mode);
                let f = fma_forward(&q, &k, &v, shape, &cfg).unwrap();
                let dn = dense_attention(&q, &k, &v, shape, causal).unwrap();
                let row = i * d..(i + 1) * d;
                let err = max_abs_diff(&f.o[row.clone()], &dn.o[row.clone()]);
                assert!(
                    err < 1e-12,
                    "seed {s} n={n} m={m} p={p} learned={learned} causal={causal} i={i}: err {err}"
                );
                assert!((f.lse[i] - dn.lse[i]).abs() < 1e-12);

                // Without the count correction the far field is under-weighted: not exact
                // (whenever query i has a far field at all).
                let has_far = levels
                    .levels
                    .iter()
                    .any(|lv| !far_list(i / lv.window, causal, lv.windows).is_empty());
                if has_far {
                    let f0 = fma_forward(&q, &k, &v, shape, &cfg.clone().count_correction(false))
                        .unwrap();
                    assert!(max_abs_diff(&f0.o[row.clone()], &dn.o[row]) > 1e-6);
                }
            }
        }
    }
}

#[test]
fn box_initialised_learned_equals_average_on_full_windows() {
    let seed = fresh_seed();
    let (n, m, p, d) = (512, 16, 4, 5);
    let shape = Shape::new(2, 1, n, d);
    let q = widen(&normal_tensor(seed, shape.elements()));
    let k = widen(&normal_tensor(seed + 1, shape.elements()));
    let v = widen(&normal_tensor(seed + 2, shape.elements()));
    let avg = fma_forward(&q, &k, &v, shape, &FmaConfig::new(m, p)).unwrap();
    let lw = LearnedWeights::box_init_for(d, m, p, n);
    let lrn = fma_forward(
        &q,
        &k,
        &v,
        shape,
        &FmaConfig::new(m, p).downsample(Downsample::Learned(lw)),
    )
    .unwrap();
    assert!(max_abs_diff(&avg.o, &lrn.o) < 1e-12, "seed {seed}");
}

#[test]
fn fma_differs_from_dense_on_random_input() {
    // A guard against a reference that silently falls back to dense attention.
    let seed = fresh_seed();
    let shape = Shape::new(1, 1, 300, 8);
    let q = widen(&normal_tensor(seed, shape.elements()));
    let k = widen(&normal_tensor(seed + 1, shape.elements()));
    let v = widen(&normal_tensor(seed + 2, shape.elements()));
    let f = fma_forward(&q, &k, &v, shape, &FmaConfig::new(16, 2)).unwrap();
    let dn = dense_attention(&q, &k, &v, shape, false).unwrap();
    assert!(max_abs_diff(&f.o, &dn.o) > 1e-4);
}

#[test]
fn bad_input_is_a_typed_error() {
    let shape = Shape::new(1, 1, 10, 4);
    let x = vec![0.5f64; 40];
    assert!(matches!(
        fma_forward(&x, &x, &x[..39], shape, &FmaConfig::new(4, 2)),
        Err(FmaError::ShapeMismatch { .. })
    ));
    assert!(matches!(
        fma_forward(&x, &x, &x, shape, &FmaConfig::new(4, 3)),
        Err(FmaError::InvalidConfig { .. })
    ));
    assert!(matches!(
        fma_forward(&x, &x, &x, shape, &FmaConfig::new(0, 1)),
        Err(FmaError::InvalidConfig { .. })
    ));
    let short = LearnedWeights::box_init(4, 2, 2, 1); // n = 10, m = 2 needs 2 levels
    let cfg = FmaConfig::new(2, 2).downsample(Downsample::Learned(short));
    assert!(matches!(
        fma_forward(&x, &x, &x, shape, &cfg),
        Err(FmaError::Weights(_))
    ));
}
