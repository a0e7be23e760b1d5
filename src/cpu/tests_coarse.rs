//! The coarse-query reference (algorithm.md §6): exactness, the count correction on coarse
//! logits, the literal partial-and-merge form, and the refusal of causal + coarse.

use super::coarse::CoarseQueries;
use super::tests::{has_far_field, max_abs_diff};
use super::*;
use crate::config::{Downsample, Queries};
use crate::geometry::flatten_far_field;
use crate::levels::{far_list, num_levels, sub_window, Levels};
use crate::random::{fresh_seed, normal_tensor};
use crate::weights::LearnedWeights;

fn coarse(m: usize, p: usize) -> FmaConfig {
    FmaConfig::new(m, p).queries(Queries::Coarse)
}

fn random_qkv(seed: u64, shape: Shape) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    (
        widen(&normal_tensor(seed, shape.elements())),
        widen(&normal_tensor(seed + 1, shape.elements())),
        widen(&normal_tensor(seed + 2, shape.elements())),
    )
}

/// Q made constant (= q_i) on the rows holding token i at every level (the top level's holds
/// all the others), so every coarse query token i takes equals q_i.
fn flatten_queries<G: Geometry + ?Sized>(q: &mut [f64], geometry: &G, d: usize, i: usize) {
    let top = geometry.num_levels();
    if top > 0 {
        let row = geometry.row_of_token(top, i);
        for t in geometry.row_tokens(top, row).into_iter().flatten() {
            for c in 0..d {
                q[t * d + c] = q[i * d + c];
            }
        }
    }
}

#[test]
fn coarse_queries_are_exact_when_q_k_v_are_constant_on_the_sub_windows_used() {
    let seed = fresh_seed();
    let d = 8;
    // n = 256, m = 16: full windows, so Learned (box) pools like Average. n = 97 and 1000 have
    // partial last windows whose key sub-windows hold fewer tokens than the query's: exactness
    // there shows the correction uses the KEY's count |S(l,b,j)|.
    for &(n, m, p, learned) in &[
        (256, 16, 2, false),
        (256, 16, 2, true),
        (256, 16, 4, true),
        (97, 8, 2, false),
        (1000, 16, 4, false),
        (1000, 8, 8, false),
    ] {
        let geometry = Line::new(n, m, p, false);
        let shape = Shape::new(1, 1, n, d);
        for (trial, i) in [0, n / 3, n / 2 + 1, n - 1].into_iter().enumerate() {
            let s = seed + 10 * trial as u64;
            let (mut q, mut k, mut v) = random_qkv(s, shape);
            flatten_far_field(&mut k, &mut v, &geometry, d, i);
            flatten_queries(&mut q, &geometry, d, i);
            let mode = if learned {
                Downsample::Learned(LearnedWeights::box_init_for(d, m, p, n))
            } else {
                Downsample::Average
            };
            let cfg = coarse(m, p).downsample(mode);
            let f = fma_forward(&q, &k, &v, shape, &cfg).unwrap();
            let dn = dense_attention(&q, &k, &v, shape, false).unwrap();
            let row = i * d..(i + 1) * d;
            let err = max_abs_diff(&f.o[row.clone()], &dn.o[row.clone()]);
            assert!(
                err < 1e-12,
                "seed {s} n={n} m={m} p={p} learned={learned} i={i}: err {err}"
            );
            assert!((f.lse[i] - dn.lse[i]).abs() < 1e-12, "seed {s} i={i}");

            // The count correction on coarse-query logits is what makes it exact.
            if has_far_field(&geometry, i) {
                let f0 =
                    fma_forward(&q, &k, &v, shape, &cfg.clone().count_correction(false)).unwrap();
                let err0 = max_abs_diff(&f0.o[row.clone()], &dn.o[row]);
                assert!(err0 > 1e-6, "seed {s} n={n} i={i}: uncorrected err {err0}");
            }
        }
    }
}

#[test]
fn coarse_queries_without_coarse_levels_equal_dense() {
    let seed = fresh_seed();
    for &(n, m) in &[(1, 4), (7, 4), (8, 4), (128, 64)] {
        assert_eq!(num_levels(n, m), 0);
        let shape = Shape::new(1, 2, n, 8);
        let (q, k, v) = random_qkv(seed, shape);
        let f = fma_forward(&q, &k, &v, shape, &coarse(m, 2.min(m))).unwrap();
        let dn = dense_attention(&q, &k, &v, shape, false).unwrap();
        assert!(max_abs_diff(&f.o, &dn.o) < 1e-12, "seed {seed} n={n}");
        assert!(max_abs_diff(&f.lse, &dn.lse) < 1e-12, "seed {seed} n={n}");
    }
}

#[test]
fn coarse_queries_differ_from_fine_queries_and_use_the_query_weights() {
    // Guards against a reference that ignores `queries` or the learned query weights.
    let seed = fresh_seed();
    let (n, m, p, d) = (256, 16, 2, 8); // full windows at every level
    let shape = Shape::new(1, 1, n, d);
    let (q, k, v) = random_qkv(seed, shape);
    let fine = fma_forward(&q, &k, &v, shape, &FmaConfig::new(m, p)).unwrap();
    let crs = fma_forward(&q, &k, &v, shape, &coarse(m, p)).unwrap();
    assert!(max_abs_diff(&fine.o, &crs.o) > 1e-4, "seed {seed}");
    // Box-initialised query weights pool like Average on full windows; moving a query bias
    // must move the output.
    let mut w = LearnedWeights::box_init_for(d, m, p, n);
    let box_out = fma_forward(
        &q,
        &k,
        &v,
        shape,
        &coarse(m, p).downsample(Downsample::Learned(w.clone())),
    )
    .unwrap();
    assert!(max_abs_diff(&box_out.o, &crs.o) < 1e-12, "seed {seed}");
    w.levels[0].bq.iter_mut().for_each(|b| *b += 0.5);
    let shifted = fma_forward(
        &q,
        &k,
        &v,
        shape,
        &coarse(m, p).downsample(Downsample::Learned(w)),
    )
    .unwrap();
    assert!(max_abs_diff(&shifted.o, &box_out.o) > 1e-6, "seed {seed}");
}

#[test]
fn reference_equals_the_literal_partial_and_merge_form_of_section_6() {
    // §6 literally: a partial (M, Z, Y) per coarse query over its window's far list, the near
    // field's partial per token, every token takes its coarse query's partial, LSE merge.
    let seed = fresh_seed();
    let (n, m, p, d) = (333, 8, 2, 5);
    let shape = Shape::new(1, 1, n, d);
    let (q, k, v) = random_qkv(seed, shape);
    let mode = Downsample::Average;
    let cfg = coarse(m, p);
    let want = fma_forward(&q, &k, &v, shape, &cfg).unwrap();
    let levels = Levels::new(n, m, p);
    let line = Line::from_levels(levels.clone(), false);
    let scale = 1.0 / (d as f64).sqrt();
    let kv = downsample_head(&k, &v, d, &line, &mode);
    let cq = CoarseQueries::new(&q, d, &line, &mode);
    type Partial = (f64, f64, Vec<f64>);
    let partial = |keys: Vec<(f64, &[f64])>| -> Partial {
        let mx = keys.iter().map(|x| x.0).fold(f64::NEG_INFINITY, f64::max);
        let mut y = vec![0.0; d];
        let mut z = 0.0;
        for (s, val) in keys {
            let e = (s - mx).exp();
            z += e;
            y.iter_mut().zip(val).for_each(|(y, x)| *y += e * x);
        }
        (mx, z, y)
    };
    for i in 0..n {
        let qi = &q[i * d..(i + 1) * d];
        let a0 = i / m;
        let near: Vec<_> = (a0.saturating_sub(1) * m..((a0 + 2) * m).min(n))
            .map(|t| {
                (
                    dot(qi, &k[t * d..(t + 1) * d]) * scale,
                    &v[t * d..(t + 1) * d],
                )
            })
            .collect();
        let mut parts = vec![partial(near)];
        for lv in &levels.levels {
            let a = i / lv.window;
            let cqi = cq.of_token(lv.level, i);
            let c = &kv[lv.level - 1];
            let mut keys = Vec::new();
            for b in far_list(a, false, lv.windows) {
                for j in 0..p {
                    let cnt = sub_window(n, m, p, lv.level, b, j).len();
                    if cnt > 0 {
                        let r = (b * p + j) * d..(b * p + j + 1) * d;
                        let s = dot(cqi, &c.keys[r.clone()]) * scale + (cnt as f64).ln();
                        keys.push((s, &c.values[r]));
                    }
                }
            }
            if !keys.is_empty() {
                parts.push(partial(keys));
            }
        }
        let mx = parts.iter().map(|p| p.0).fold(f64::NEG_INFINITY, f64::max);
        let z: f64 = parts.iter().map(|p| (p.0 - mx).exp() * p.1).sum();
        for c in 0..d {
            let y: f64 = parts.iter().map(|p| (p.0 - mx).exp() * p.2[c]).sum();
            assert!(
                (y / z - want.o[i * d + c]).abs() < 1e-12,
                "seed {seed} i={i}"
            );
        }
        assert!(
            (mx + z.ln() - want.lse[i]).abs() < 1e-12,
            "seed {seed} i={i}"
        );
    }
}

#[test]
fn causal_coarse_queries_are_refused() {
    let shape = Shape::new(1, 1, 10, 4);
    let x = vec![0.5f64; 40];
    let cfg = coarse(4, 2).causal(true);
    let err = fma_forward(&x, &x, &x, shape, &cfg).unwrap_err();
    assert!(matches!(err, FmaError::CausalCoarseQueries), "{err}");
    assert!(err.to_string().contains("bidirectional only"), "{err}");
    // Learned coarse queries need query weights of the right shape.
    let mut w = LearnedWeights::box_init(4, 2, 2, 2);
    w.levels[1].wq.pop();
    let cfg = coarse(2, 2).downsample(Downsample::Learned(w.clone()));
    assert!(matches!(
        fma_forward(&x, &x, &x, shape, &cfg),
        Err(FmaError::Weights(_))
    ));
    // Fine queries ignore them.
    let fine = FmaConfig::new(2, 2).downsample(Downsample::Learned(w));
    assert!(fma_forward(&x, &x, &x, shape, &fine).is_ok());
}
