//! A block size of at least n costs what m = n costs and gives the same bits (issue 19):
//! m >= n puts the whole sequence in one fine block (L = 0, exact attention), so nothing may
//! grow with m. Before the fix, m = 10^9 on 64 tokens ran for minutes (the query tiles of one
//! block were ceil(m / WG)), and m >= 2^30 was refused.
//!
//! Each case runs in a thread with a deadline, so a regression fails loudly instead of hanging
//! CI. Tolerance against the f64 reference: that of `gpu_forward.rs` (5e-5 + 5e-5 |ref| on O,
//! 5e-5 + 1e-5 |ref| on the LSE); against m = n: equal to the bit, since both run one plan.

use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::common::{closeness, gpu};
use multipole_attn::cpu::{self, widen};
use multipole_attn::gpu::{Attention, Host, HostGrad};
use multipole_attn::random::normal_tensor;
use multipole_attn::{Downsample, FmaConfig, LearnedWeights, Method, Problem, Queries, Shape};

/// The largest block a 32-bit index could hold, a prime: only p = 1 and p = m divide it.
const HUGE: usize = (1 << 31) - 1;

/// Far above the few hundred milliseconds these cases take on lavapipe (m = n), far below
/// what m = 2^31 - 1 took before the fix (hours).
const DEADLINE: Duration = Duration::from_secs(60);

/// Runs `f` in a thread and fails loudly if it does not finish before [`DEADLINE`].
fn within_deadline<T: Send + 'static>(label: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    let start = Instant::now();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    match rx.recv_timeout(DEADLINE) {
        Ok(v) => {
            eprintln!("{label}: {:.2} s", start.elapsed().as_secs_f64());
            v
        }
        Err(mpsc::RecvTimeoutError::Timeout) => {
            panic!("{label}: not finished after {DEADLINE:?}: the cost grows with the block size m")
        }
        Err(mpsc::RecvTimeoutError::Disconnected) => panic!("{label}: the worker panicked"),
    }
}

fn inputs(shape: Shape) -> [Vec<f32>; 3] {
    let n = shape.elements();
    [
        normal_tensor(19, n),
        normal_tensor(1919, n),
        normal_tensor(191919, n),
    ]
}

/// O and the LSE of the GPU forward of `problem`, and (fine queries) dQ, dK, dV of dO = 1.
fn run(cfg: FmaConfig, problem: Problem) -> Vec<Vec<f32>> {
    let ctx = gpu().expect("checked by the caller");
    let shape = problem.shape;
    let [q, k, v] = inputs(shape);
    let fma = Attention::fma(ctx, cfg.clone()).unwrap();
    if cfg.queries == Queries::Coarse {
        let out = fma.forward(&problem, Host::new(&q, &k, &v)).unwrap();
        return vec![out.o, out.lse.unwrap()];
    }
    let (out, saved) = fma.train(&problem, Host::new(&q, &k, &v)).unwrap();
    let g = fma
        .backward(&saved, HostGrad(&vec![1.0; shape.elements()]))
        .unwrap();
    vec![out.o, out.lse.unwrap(), g.dq, g.dk, g.dv]
}

#[test]
fn a_block_of_2_pow_31_minus_1_runs_as_fast_as_m_equals_n_and_gives_its_bits() {
    if gpu().is_none() {
        return;
    }
    let shape = Shape::new(1, 2, 64, 16);
    let n = shape.seq;
    let learned = |m, p| Downsample::Learned(LearnedWeights::box_init_for(16, m, p, n));
    // (name, causal mask, configuration for m and p): each is compared at (n, 1), (HUGE, 1),
    // (HUGE, HUGE).
    type Make = fn(FmaConfig, Downsample) -> FmaConfig;
    let cases: [(&str, bool, Make); 4] = [
        ("bidirectional", false, |c, _| c),
        ("causal", true, |c, _| c),
        ("coarse queries", false, |c, _| c.queries(Queries::Coarse)),
        ("learned", false, |c, w| c.downsample(w)),
    ];
    for (name, causal, make) in cases {
        let at = |m: usize, p: usize| make(FmaConfig::new(m, p), learned(m, p));
        let problem = Problem::new(shape).causal(causal);
        let label = format!("{name}, m = n = {n}");
        let (cfg, pr) = (at(n, 1), problem.clone());
        let want = within_deadline(&label, move || run(cfg, pr));
        for (m, p) in [(HUGE, 1), (HUGE, HUGE)] {
            let label = format!("{name}, m = {m}, p = {p}");
            let (cfg, pr) = (at(m, p), problem.clone());
            let got = within_deadline(&label, move || run(cfg, pr));
            assert_eq!(got.len(), want.len(), "{label}");
            for (g, w) in got.iter().zip(&want) {
                assert!(
                    g.iter().zip(w).all(|(a, b)| a.to_bits() == b.to_bits()),
                    "{label}: differs from m = n"
                );
            }
            // And the reference at that m: exact attention, within the forward's tolerance.
            let (method, pr) = (Method::Fma(at(m, p)), problem.clone());
            let [q, k, v] = inputs(shape);
            let r = within_deadline(&format!("{label}, CPU reference"), move || {
                cpu::forward(&method, &pr, &widen(&q), &widen(&k), &widen(&v)).unwrap()
            });
            let co = closeness(&got[0], &r.o, 5e-5, 5e-5);
            let cl = closeness(&got[1], &r.lse, 5e-5, 1e-5);
            assert_eq!(co.violations + cl.violations, 0, "{label}: {co:?} {cl:?}");
            let [q, k, v] = inputs(shape);
            let dense =
                cpu::dense_attention(&widen(&q), &widen(&k), &widen(&v), shape, causal).unwrap();
            let cd = closeness(&got[0], &dense.o, 5e-5, 5e-5);
            assert_eq!(
                cd.violations, 0,
                "{label}: m >= n is exact attention: {cd:?}"
            );
        }
    }
}

#[test]
fn a_split_head_with_a_block_of_2_pow_31_minus_1_is_a_quick_typed_error() {
    let Some(ctx) = gpu() else { return };
    // 1024 tokens of width 16 (64 KiB) under a 16 KiB binding: m >= n asks for the whole
    // sequence as one fine block, which a split head cannot bind; it must say so at once.
    let shape = Shape::new(1, 1, 1024, 16);
    let [q, k, v] = inputs(shape);
    let fma = Attention::fma(ctx, FmaConfig::new(HUGE, 1))
        .unwrap()
        .max_binding(16 << 10)
        .unwrap();
    let e = within_deadline("split head, m = 2^31 - 1", move || {
        fma.forward(&Problem::new(shape), Host::new(&q, &k, &v).without_lse())
            .unwrap_err()
            .to_string()
    });
    assert!(e.contains("use a smaller block size m"), "{e}");
}
