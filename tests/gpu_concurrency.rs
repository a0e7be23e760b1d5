//! One context used from several threads at once gives the same bits as sequential use.

mod common;

use std::sync::Arc;

use common::gpu;
use multipole_attn::gpu::{DenseAttention, FmaAttention};
use multipole_attn::random::{fresh_seed, normal_tensor};
use multipole_attn::{FmaConfig, Shape};

#[test]
fn four_threads_share_one_context_and_one_fma() {
    let Some(ctx) = gpu() else { return };
    let seed = fresh_seed();
    eprintln!("seed {seed}");
    let fma = Arc::new(FmaAttention::new(ctx, FmaConfig::new(16, 2)).unwrap());
    let dense = Arc::new(DenseAttention::new(ctx, true).unwrap());
    // Two threads share a shape (and so the cached buffers), two have their own.
    let shapes = [
        Shape::new(1, 2, 300, 16),
        Shape::new(1, 2, 300, 16),
        Shape::new(2, 1, 97, 40),
        Shape::new(1, 3, 1025, 8),
    ];
    let inputs: Vec<_> = shapes
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let s0 = seed + 10 * i as u64;
            (
                normal_tensor(s0, s.elements()),
                normal_tensor(s0 + 1, s.elements()),
                normal_tensor(s0 + 2, s.elements()),
            )
        })
        .collect();
    let sequential: Vec<_> = shapes
        .iter()
        .zip(&inputs)
        .map(|(&s, (q, k, v))| {
            (
                fma.forward(q, k, v, s, true).unwrap(),
                dense.forward(q, k, v, s, false).unwrap(),
            )
        })
        .collect();
    for round in 0..3 {
        let handles: Vec<_> = shapes
            .iter()
            .zip(inputs.clone())
            .map(|(&s, (q, k, v))| {
                let (fma, dense) = (fma.clone(), dense.clone());
                std::thread::spawn(move || {
                    let mut outs = Vec::new();
                    for _ in 0..3 {
                        outs.push((
                            fma.forward(&q, &k, &v, s, true).unwrap(),
                            dense.forward(&q, &k, &v, s, false).unwrap(),
                        ));
                    }
                    outs
                })
            })
            .collect();
        for (i, h) in handles.into_iter().enumerate() {
            for (f, d) in h.join().expect("thread panicked") {
                assert_eq!(
                    f.o, sequential[i].0.o,
                    "round {round}, thread {i}: FMA output differs from sequential"
                );
                assert_eq!(
                    f.lse, sequential[i].0.lse,
                    "round {round}, thread {i}: LSE differs"
                );
                assert_eq!(
                    d.o, sequential[i].1.o,
                    "round {round}, thread {i}: dense output differs"
                );
            }
        }
    }
}
