//! Property test: random shapes and configurations, GPU against the f64 CPU reference, with
//! proptest shrinking a failure to a minimal case. Few cases by default (lavapipe is slow);
//! PROPTEST_CASES=200 runs more.

use crate::common::{closeness, gpu, random_learned, Poisoned};
use multipole_attn::cpu::{self, widen};
use multipole_attn::gpu::{Attention, Resident};
use multipole_attn::random::normal_tensor;
use multipole_attn::{Downsample, FmaConfig, Method, Problem, Shape};
use proptest::prelude::*;

#[derive(Debug, Clone)]
struct Case {
    batch: usize,
    heads: usize,
    n: usize,
    d: usize,
    m: usize,
    p: usize,
    causal: bool,
    learned: bool,
    count_correction: bool,
    seed: u64,
}

fn case() -> impl Strategy<Value = Case> {
    (
        1usize..=2,
        1usize..=3,
        1usize..=1500,
        1usize..=130,
        0usize..4,
        0usize..3,
        any::<bool>(),
        any::<bool>(),
        any::<bool>(),
        any::<u64>(),
    )
        .prop_map(
            |(batch, heads, n, d, mi, pi, causal, learned, count_correction, seed)| {
                let m = [2, 8, 24, 64][mi];
                let p = [1, 2, 4][pi].min(m);
                let p = if m % p == 0 { p } else { 1 };
                Case {
                    batch,
                    heads,
                    n,
                    d,
                    m,
                    p,
                    causal,
                    learned,
                    count_correction,
                    seed,
                }
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 8, ..ProptestConfig::default() })]

    #[test]
    fn gpu_matches_reference_on_random_configs(c in case()) {
        let Some(ctx) = gpu() else { return Ok(()) };
        let shape = Shape::new(c.batch, c.heads, c.n, c.d);
        let q = normal_tensor(c.seed, shape.elements());
        let k = normal_tensor(c.seed ^ 1, shape.elements());
        let v = normal_tensor(c.seed ^ 2, shape.elements());
        let mode = if c.learned { Downsample::Learned(random_learned(c.seed, c.d, c.m, c.p, c.n)) } else { Downsample::Average };
        let cfg = FmaConfig::new(c.m, c.p).downsample(mode).count_correction(c.count_correction);
        let problem = Problem::new(shape).causal(c.causal);
        let method = Method::Fma(cfg);
        let fma = Attention::new(ctx, method.clone()).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let bufs = Poisoned::new(ctx, &q, &k, &v, shape);
        fma.forward(&problem, Resident(bufs.tensors())).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let (o, lse) = bufs.read(ctx);
        let r = cpu::forward(&method, &problem, &widen(&q), &widen(&k), &widen(&v)).map_err(|e| TestCaseError::fail(e.to_string()))?;
        // Tolerances as in tests/gpu/forward.rs (justified there).
        let co = closeness(&o, &r.o, 5e-5, 5e-5);
        let cl = closeness(&lse, &r.lse, 5e-5, 1e-5);
        prop_assert_eq!(co.violations, 0, "O: {:?}", co);
        prop_assert_eq!(cl.violations, 0, "LSE: {:?}", cl);
    }
}
