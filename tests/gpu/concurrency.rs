//! One context used from several threads at once gives the same bits as sequential use.

use std::sync::Arc;

use crate::common::gpu;
use multipole_attn::gpu::{Attention, Host, HostGrad};
use multipole_attn::random::{fresh_seed, normal_tensor};
use multipole_attn::{FmaConfig, Problem, Shape};

#[test]
fn four_threads_share_one_context_and_one_fma() {
    let Some(ctx) = gpu() else { return };
    let seed = fresh_seed();
    eprintln!("seed {seed}");
    let fma = Arc::new(Attention::fma(ctx, FmaConfig::new(16, 2)).unwrap());
    let dense = Arc::new(Attention::dense(ctx).unwrap());
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
                fma.forward(&Problem::new(s), Host::new(q, k, v)).unwrap(),
                dense
                    .forward(
                        &Problem::new(s).causal(true),
                        Host::new(q, k, v).without_lse(),
                    )
                    .unwrap(),
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
                        let (p, causal) = (Problem::new(s), Problem::new(s).causal(true));
                        outs.push((
                            fma.forward(&p, Host::new(&q, &k, &v)).unwrap(),
                            dense
                                .forward(&causal, Host::new(&q, &k, &v).without_lse())
                                .unwrap(),
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

#[test]
fn four_threads_train_through_one_fma() {
    // The backward's scratch buffers are cached per shape: threads sharing a shape take turns
    // on them, and every gradient has the bits of a sequential run.
    let Some(ctx) = gpu() else { return };
    let seed = fresh_seed();
    eprintln!("seed {seed}");
    let fma = Arc::new(Attention::fma(ctx, FmaConfig::new(16, 2)).unwrap());
    let shapes = [
        Shape::new(1, 2, 300, 16),
        Shape::new(1, 2, 300, 16),
        Shape::new(1, 2, 300, 16),
        Shape::new(2, 1, 97, 8),
    ];
    let inputs: Vec<_> = shapes
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let s0 = seed + 10 * i as u64;
            let x: Vec<_> = (0..4)
                .map(|j| normal_tensor(s0 + j, s.elements()))
                .collect();
            x
        })
        .collect();
    let train = |fma: &Attention, s: Shape, x: &[Vec<f32>]| {
        let p = Problem::new(s);
        let (_, saved) = fma.train(&p, Host::new(&x[0], &x[1], &x[2])).unwrap();
        fma.backward(&saved, HostGrad(&x[3])).unwrap()
    };
    let sequential: Vec<_> = shapes
        .iter()
        .zip(&inputs)
        .map(|(&s, x)| train(&fma, s, x))
        .collect();
    let handles: Vec<_> = shapes
        .iter()
        .zip(inputs.clone())
        .map(|(&s, x)| {
            let fma = fma.clone();
            std::thread::spawn(move || (0..3).map(|_| train(&fma, s, &x)).collect::<Vec<_>>())
        })
        .collect();
    for (i, h) in handles.into_iter().enumerate() {
        for g in h.join().expect("thread panicked") {
            let want = &sequential[i];
            assert!(
                g.dq == want.dq && g.dk == want.dk && g.dv == want.dv,
                "seed {seed}, thread {i}: gradients differ from the sequential run"
            );
        }
    }
}
