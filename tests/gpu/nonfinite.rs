//! Non-finite inputs behave as in dense attention: a row whose softmax includes a NaN or
//! infinite logit or value gets a non-finite output; every other row is untouched, and nothing
//! hangs. With FMA a key also reaches, through its coarse summaries, every query whose far list
//! holds one of its windows, exactly as a dense row that sees it.

use crate::common::{gpu, DENSE_KERNELS, FMA_KERNELS};
use multipole_attn::cpu::{self, widen};
use multipole_attn::gpu::{Attention, Host};
use multipole_attn::random::{fresh_seed, normal_tensor};
use multipole_attn::{FmaConfig, Method, Problem, Queries, Shape};

/// Rows (of one head) whose output the CPU reference makes non-finite.
fn poisoned_rows(o: &[f64], d: usize) -> Vec<bool> {
    o.chunks(d)
        .map(|r| r.iter().any(|x| !x.is_finite()))
        .collect()
}

#[test]
fn non_finite_inputs_reach_exactly_the_rows_that_see_them() {
    let Some(ctx) = gpu() else { return };
    let seed = fresh_seed();
    eprintln!("seed {seed}");
    let shape = Shape::new(1, 2, 700, 16);
    let d = shape.head_dim;
    // Fine queries both ways, and coarse queries (bidirectional only), whose pooled queries
    // carry a NaN in Q to every token of their sub-window's coarse query.
    for (causal, queries) in [
        (false, Queries::Fine),
        (true, Queries::Fine),
        (false, Queries::Coarse),
    ] {
        for (tensor, value) in [
            ("K", f32::NAN),
            ("V", f32::INFINITY),
            ("Q", f32::NAN),
            ("K", f32::INFINITY),
        ] {
            let mut x = [
                normal_tensor(seed, shape.elements()),
                normal_tensor(seed + 1, shape.elements()),
                normal_tensor(seed + 2, shape.elements()),
            ];
            let which = ["Q", "K", "V"].iter().position(|&t| t == tensor).unwrap();
            let pos = 300; // head 0, token 300
            x[which][pos * d + 3] = value;
            let problem = Problem::new(shape).causal(causal);
            let method = Method::Fma(FmaConfig::new(16, 2).queries(queries));
            let (wq, wk, wv) = (widen(&x[0]), widen(&x[1]), widen(&x[2]));
            let r = cpu::forward(&method, &problem, &wq, &wk, &wv).unwrap();
            let bad = poisoned_rows(&r.o, d);
            assert!(
                bad.iter().any(|&b| b),
                "{tensor}={value}: the reference poisons no row"
            );
            // Both kernels of the fused pass (the tiled one guards its P x V against a
            // non-finite value in a tile, as dense_tiled.wgsl does).
            for kernel in FMA_KERNELS {
                let g = Attention::new(ctx, method.clone())
                    .and_then(|a| a.fma_kernel(kernel))
                    .unwrap()
                    .forward(&problem, Host::new(&x[0], &x[1], &x[2]).without_lse())
                    .unwrap();
                for (row, &is_bad) in bad.iter().enumerate() {
                    let gr = &g.o[row * d..(row + 1) * d];
                    let rr = &r.o[row * d..(row + 1) * d];
                    if is_bad {
                        assert!(gr.iter().any(|v| !v.is_finite()), "{kernel:?} causal={causal} {queries:?} {tensor}={value}: row {row} should be non-finite, got {gr:?}");
                    } else {
                        let err = gr
                            .iter()
                            .zip(rr)
                            .map(|(a, b)| (*a as f64 - b).abs())
                            .fold(0.0, f64::max);
                        assert!(
                        err < 1e-4,
                        "{kernel:?} causal={causal} {queries:?} {tensor}={value}: clean row {row} corrupted (err {err})"
                    );
                    }
                }
            }
            // Dense attention: the same rule, every row that sees the key.
            let rd =
                cpu::dense_attention(&widen(&x[0]), &widen(&x[1]), &widen(&x[2]), shape, causal)
                    .unwrap();
            for kernel in DENSE_KERNELS {
                let gd = Attention::dense(ctx)
                    .and_then(|a| a.dense_kernel(kernel))
                    .unwrap()
                    .forward(&problem, Host::new(&x[0], &x[1], &x[2]).without_lse())
                    .unwrap();
                for (row, &is_bad) in poisoned_rows(&rd.o, d).iter().enumerate() {
                    let finite = gd.o[row * d..(row + 1) * d].iter().all(|v| v.is_finite());
                    assert_eq!(
                        finite, !is_bad,
                        "dense {kernel:?} causal={causal} {tensor}={value}: row {row}"
                    );
                }
            }
        }
    }
}
