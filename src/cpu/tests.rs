use super::gather::coverage_in;
use super::*;
use crate::config::Downsample;
use crate::geometry::{cases, flatten_far_field};
use crate::levels::num_levels;
use crate::random::{fresh_seed, normal_tensor};
use crate::weights::LearnedWeights;

/// The tiling property (algorithm.md §3, §9): the keys query i sees cover every token it may
/// see exactly once (causal: tokens 0..=i) and no other. Generic, so any geometry that
/// implements the trait is checked by adding it to `geometry::cases`.
fn assert_tiles<G: Geometry + ?Sized>(geometry: &G, label: &str) {
    for i in 0..geometry.tokens() {
        let cov = coverage_in(geometry, i);
        for (t, &c) in cov.iter().enumerate() {
            let want = if geometry.causal() && t > i { 0 } else { 1 };
            assert_eq!(c, want, "{label}: query {i} covers key {t} {c} times");
        }
    }
}

#[test]
fn tiling_property_holds_for_every_query() {
    for (label, geometry) in cases::all() {
        assert_tiles(&*geometry, &label);
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

/// Whether query i sees any coarse key.
pub(super) fn has_far_field<G: Geometry + ?Sized>(geometry: &G, i: usize) -> bool {
    (1..=geometry.num_levels()).any(|level| !geometry.coarse_rows(i, level).is_empty())
}

#[test]
fn exact_in_every_geometry_when_k_v_are_constant_on_what_a_query_sees_coarsely() {
    // algorithm.md §5 (Average mode): with K and V constant on the tokens of every coarse row
    // query i sees, its FMA output is dense attention's, in any geometry. This checks the
    // fine keys, the coarse rows, their tokens and counts (the correction) of each geometry
    // against the one thing they must add up to.
    let seed = fresh_seed();
    let d = 4;
    for (case, (label, geometry)) in cases::all().into_iter().enumerate() {
        let n = geometry.tokens();
        let shape = Shape::new(1, 1, n, d);
        for i in [0, n / 2, n - 1] {
            let s = seed + 10 * case as u64;
            let q = widen(&normal_tensor(s, n * d));
            let mut k = widen(&normal_tensor(s + 1, n * d));
            let mut v = widen(&normal_tensor(s + 2, n * d));
            flatten_far_field(&mut k, &mut v, &*geometry, d, i);
            let cfg = FmaConfig::default(); // Average, count correction on
            let f = fma_forward_in(&*geometry, &q, &k, &v, shape, &cfg).unwrap();
            let (o, lse) =
                dense_attention_rows(&q, &k, &v, shape, geometry.causal(), &[i]).unwrap();
            let err = max_abs_diff(&f.o[i * d..(i + 1) * d], &o);
            assert!(err < 1e-12, "seed {s} {label} query {i}: err {err}");
            assert!(
                (f.lse[i] - lse[0]).abs() < 1e-12,
                "seed {s} {label} query {i}"
            );
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
        let shape = Shape::new(1, 1, n, d);
        for causal in [false, true] {
            let geometry = Line::new(n, m, p, causal);
            for (trial, i) in [0, n / 3, n / 2 + 1, n - 1].into_iter().enumerate() {
                let s = seed + 10 * trial as u64;
                let q = widen(&normal_tensor(s, n * d));
                let mut k = widen(&normal_tensor(s + 1, n * d));
                let mut v = widen(&normal_tensor(s + 2, n * d));
                flatten_far_field(&mut k, &mut v, &geometry, d, i);
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
                if has_far_field(&geometry, i) {
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

#[test]
fn a_config_that_does_not_fit_the_geometry_is_a_typed_error() {
    let shape = Shape::new(1, 1, 10, 4);
    let x = vec![0.5f64; 40];
    let err = |g: &Line, cfg: &FmaConfig| fma_forward_in(g, &x, &x, &x, shape, cfg).unwrap_err();
    let e = err(&Line::new(11, 4, 2, false), &FmaConfig::default());
    assert!(
        matches!(&e, FmaError::ShapeMismatch { what, .. } if what == "sequence length"),
        "{e}"
    );
    let coarse = FmaConfig::default().queries(Queries::Coarse);
    let e = err(&Line::new(10, 2, 2, true), &coarse);
    assert!(matches!(e, FmaError::CausalCoarseQueries), "{e}");
    // n = 10, m = 2: two levels, kernels of 2 and 4 taps.
    let mut w = LearnedWeights::box_init(4, 2, 2, 2);
    w.levels[1].wv.pop();
    let e = err(
        &Line::new(10, 2, 2, false),
        &FmaConfig::default().downsample(Downsample::Learned(w)),
    );
    assert!(
        matches!(&e, FmaError::Weights(m) if m.contains("v_w2")),
        "{e}"
    );
    let short = LearnedWeights::box_init(4, 2, 2, 1);
    let e = err(
        &Line::new(10, 2, 2, false),
        &FmaConfig::default().downsample(Downsample::Learned(short)),
    );
    assert!(matches!(e, FmaError::Weights(_)), "{e}");
}

/// `Levels::keys_seen_total` (the flop count of the benchmarks) against the keys the reference
/// gathers, query by query.
#[test]
fn keys_seen_total_counts_what_the_reference_gathers() {
    for &(n, m, p) in &[(1, 4, 2), (97, 8, 2), (1000, 16, 4), (4096, 64, 2)] {
        let lv = crate::levels::Levels::new(n, m, p);
        for causal in [false, true] {
            let direct: usize = (0..n)
                .map(|i| super::gather::seen_keys(&lv, causal, i).len())
                .sum();
            assert_eq!(
                lv.keys_seen_total(causal),
                direct as u64,
                "n={n} m={m} p={p} causal={causal}"
            );
        }
    }
    // algorithm.md §11: at most 218 keys per query for n = 4096, m = 64, p = 2.
    assert!(crate::levels::Levels::new(4096, 64, 2).keys_seen_total(false) <= 218 * 4096);
}

/// Grouped-query heads in the reference equal multi-head attention on K, V with every K/V head
/// repeated for its group, forward and backward (dK, dV summed over each group): the indexing
/// `bh / group` the GPU tests and the CLI's reference path rely on.
#[test]
fn grouped_query_heads_equal_repeated_multi_head_attention() {
    let (batch, heads, kv_heads, n, d) = (2, 6, 2, 37, 8);
    let gqa = Shape::new(batch, heads, n, d).with_kv_heads(kv_heads);
    let mha = Shape::new(batch, heads, n, d);
    let wide = |seed: u64, len: usize| -> Vec<f64> {
        normal_tensor(seed, len).iter().map(|&x| x as f64).collect()
    };
    let (q, k, v, dout) = (
        wide(1, gqa.elements()),
        wide(2, gqa.kv_elements()),
        wide(3, gqa.kv_elements()),
        wide(4, gqa.elements()),
    );
    let per_head = n * d;
    let repeat = |x: &[f64]| -> Vec<f64> {
        (0..batch * heads)
            .flat_map(|bh| &x[(bh / 3) * per_head..(bh / 3 + 1) * per_head])
            .copied()
            .collect()
    };
    let (kr, vr) = (repeat(&k), repeat(&v));
    for cfg in [
        FmaConfig::new(4, 2),
        FmaConfig::new(4, 2).causal(true),
        FmaConfig::new(4, 2).queries(Queries::Coarse),
    ] {
        let a = fma_forward(&q, &k, &v, gqa, &cfg).unwrap();
        let b = fma_forward(&q, &kr, &vr, mha, &cfg).unwrap();
        assert_eq!(a.o, b.o, "{cfg:?}");
        assert_eq!(a.lse, b.lse, "{cfg:?}");
        let dense = dense_attention(&q, &k, &v, gqa, cfg.causal).unwrap();
        assert_eq!(
            dense.o,
            dense_attention(&q, &kr, &vr, mha, cfg.causal).unwrap().o
        );
        if cfg.queries == Queries::Fine {
            let ga = crate::cpu::fma_backward(&q, &k, &v, &dout, gqa, &cfg).unwrap();
            let gb = crate::cpu::fma_backward(&q, &kr, &vr, &dout, mha, &cfg).unwrap();
            assert_eq!(ga.dq, gb.dq);
            let mut dk = vec![0f64; gqa.kv_elements()];
            for (bh, g) in gb.dk.chunks(per_head).enumerate() {
                for (x, y) in dk[(bh / 3) * per_head..].iter_mut().zip(g) {
                    *x += y;
                }
            }
            for (x, y) in ga.dk.iter().zip(&dk) {
                assert!((x - y).abs() <= 1e-12 * (1.0 + y.abs()), "{x} vs {y}");
            }
        }
    }
}
