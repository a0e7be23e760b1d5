//! Learned downsampling of levels with more than `plan::POOL_TAPS` kernel taps: the taps in
//! chunks run by separate invocations, their partial sums added by `downsample_combine`'s
//! fixed tree (issue 27), against the f64 CPU reference on random inputs with fresh seeds,
//! output buffers poisoned with NaN; 1D (one and two combine rounds, GQA, causal), coarse
//! queries (queries pooled the same way), a 2D grid; and the same bits run to run.
//!
//! Tolerance: that of `forward.rs` (5e-5 + 5e-5 |ref| on O, 5e-5 + 1e-5 |ref| on the LSE), for
//! the same reasons; a coarse row is now a sum of up to w_l taps associated as a tree of
//! 256-tap chunks instead of one running sum, which moves it by a few ulps of its size (O(1)
//! with box weights plus N(0, 0.5 / w_l) noise), far inside the bound. A chunk added twice or
//! lost moves a coarse key by O(1) and O by 1e-2 or more.

use crate::common::{closeness, gpu, random_learned, Poisoned};
use multipole_attn::cpu::{self, widen};
use multipole_attn::gpu::{Attention, GpuContext, Resident};
use multipole_attn::plan::{FmaPlan, KernelLimits, POOL_TAPS};
use multipole_attn::random::{fresh_seed, normal_tensor};
use multipole_attn::{
    Downsample, FmaConfig, Grid, LearnedWeights, Method, Problem, Queries, Shape,
};

/// Runs FMA through NaN-poisoned buffers; checks O and the LSE; returns O.
fn check(ctx: &GpuContext, seed: u64, p: &Problem, cfg: &FmaConfig) -> Vec<f32> {
    let shape = p.shape;
    let q = normal_tensor(seed, shape.elements());
    let k = normal_tensor(seed ^ 0x9e37_79b9, shape.kv_elements());
    let v = normal_tensor(seed ^ 0x7f4a_7c15, shape.kv_elements());
    let label = format!(
        "seed {seed} {shape} m={} p={} causal {}",
        cfg.block, cfg.rank, p.causal
    );
    // The case must pool some level in more than one chunk (the mask does not change pooling).
    let plan = FmaPlan::new(shape, cfg, &KernelLimits::discrete_gpu()).unwrap();
    let chunks = plan.downsample.iter().map(|d| d.args[0]).max().unwrap();
    assert!(chunks > 1, "{label}: no chunked level");
    let method = Method::Fma(cfg.clone());
    let fma = Attention::new(ctx, method.clone()).unwrap_or_else(|e| panic!("{label}: {e}"));
    let bufs = Poisoned::new(ctx, &q, &k, &v, shape);
    fma.forward(p, Resident(bufs.tensors()))
        .unwrap_or_else(|e| panic!("{label}: {e}"));
    let (o, lse) = bufs.read(ctx);
    let r = cpu::forward(&method, p, &widen(&q), &widen(&k), &widen(&v)).unwrap();
    let co = closeness(&o[..shape.elements()], &r.o, 5e-5, 5e-5);
    let cl = closeness(&lse[..shape.rows()], &r.lse, 5e-5, 1e-5);
    eprintln!(
        "{label}: {chunks} chunks, |O err| {:.2e}, |LSE err| {:.2e}",
        co.max_abs, cl.max_abs
    );
    assert_eq!(co.violations, 0, "{label}: O {co:?}");
    assert_eq!(cl.violations, 0, "{label}: LSE {cl:?}");
    o[..shape.elements()].to_vec()
}

#[test]
fn learned_taps_in_chunks_match_the_reference_and_repeat_bit_for_bit() {
    let Some(ctx) = gpu() else { return };
    let seed = fresh_seed();
    eprintln!("seed {seed}");
    // n = 20011, m = 8: the top window has 8192 taps, 32 chunks of 256 (two rounds of the
    // tree); 2 query heads on 1 K/V head; causal.
    let (n, d) = (20011, 8);
    let shape = Shape::new(1, 2, n, d).with_kv_heads(1);
    let cfg =
        FmaConfig::new(8, 2).downsample(Downsample::Learned(random_learned(seed, d, 8, 2, n)));
    let plan = FmaPlan::new(shape, &cfg, &KernelLimits::discrete_gpu()).unwrap();
    assert!(plan.downsample_combine.iter().any(|r| r.len() == 2));
    let causal = Problem::new(shape).causal(true);
    let first = check(ctx, seed, &causal, &cfg);
    let again = check(ctx, seed, &causal, &cfg);
    assert!(
        first
            .iter()
            .zip(&again)
            .all(|(a, b)| a.to_bits() == b.to_bits()),
        "two runs differ"
    );
    // Bidirectional, an awkward n and head dim (partial last windows and chunks).
    let (n, d) = (3001, 13);
    let shape = Shape::new(2, 1, n, d);
    let cfg = FmaConfig::new(16, 4).downsample(Downsample::Learned(random_learned(
        seed + 1,
        d,
        16,
        4,
        n,
    )));
    check(ctx, seed + 1, &Problem::new(shape), &cfg);
}

#[test]
fn coarse_queries_pool_their_queries_in_chunks_too() {
    let Some(ctx) = gpu() else { return };
    let seed = fresh_seed();
    eprintln!("seed {seed}");
    let (n, d) = (4099, 16);
    let shape = Shape::new(1, 2, n, d);
    let cfg = FmaConfig::new(16, 2)
        .queries(Queries::Coarse)
        .downsample(Downsample::Learned(random_learned(seed, d, 16, 2, n)));
    check(ctx, seed, &Problem::new(shape), &cfg);
}

#[test]
fn a_grid_pools_its_square_kernels_in_chunks() {
    let Some(ctx) = gpu() else { return };
    let seed = fresh_seed();
    eprintln!("seed {seed}");
    // 100 x 75 tokens, cells 8 x 8: levels of sides 8, 16, 32 (1024 taps: 4 chunks of 256).
    let grid = Grid::new(100, 75);
    let d = 8;
    let mut w = LearnedWeights::box_init_grid_for(d, 8, 2, grid);
    for (l, lw) in w.levels.iter_mut().enumerate() {
        let taps = ((8usize << l) * (8 << l)) as f32;
        let noise = normal_tensor(seed + l as u64, lw.wk.len());
        for (buf, scale) in [(&mut lw.wk, 0.5 / taps), (&mut lw.wv, 0.3 / taps)] {
            buf.iter_mut()
                .zip(&noise)
                .for_each(|(x, e)| *x += scale * e);
        }
    }
    let cfg = FmaConfig::new(8, 2)
        .grid(Some(grid))
        .downsample(Downsample::Learned(w));
    let shape = Shape::new(1, 2, 100 * 75, d);
    check(ctx, seed, &Problem::new(shape), &cfg);
    const { assert!(POOL_TAPS < 32 * 32) };
}
