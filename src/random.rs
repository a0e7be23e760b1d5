//! Seeded random tensors for the demo, the benchmarks and the tests.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::StandardNormal;

/// `len` samples of N(0, 1) as f32, from a seed (the same seed gives the same tensor).
pub fn normal_tensor(seed: u64, len: usize) -> Vec<f32> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..len)
        .map(|_| rng.sample::<f32, _>(StandardNormal))
        .collect()
}

/// A tensor of shape (rows, seq, dim) that varies smoothly along the sequence: per row and
/// channel a sum of two sinusoids (random phases, amplitudes 0.2..0.6, at most 2 periods over
/// the sequence) plus N(0, noise^2). The far field of such keys and values is what FMA's
/// coarse levels summarise well; i.i.d. noise is its worst case.
pub fn smooth_tensor(seed: u64, rows: usize, seq: usize, dim: usize, noise: f32) -> Vec<f32> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut out = vec![0f32; rows * seq * dim];
    for r in 0..rows {
        for c in 0..dim {
            let waves: Vec<(f32, f32, f32)> = (0..2)
                .map(|_| {
                    (
                        rng.random_range(0.1..2.0f32),
                        rng.random_range(0.0..std::f32::consts::TAU),
                        rng.random_range(0.2..0.6f32),
                    )
                })
                .collect();
            for t in 0..seq {
                let x = t as f32 / seq as f32;
                let s: f32 = waves
                    .iter()
                    .map(|&(f, ph, a)| a * (std::f32::consts::TAU * f * x + ph).sin())
                    .sum();
                out[(r * seq + t) * dim + c] = s + noise * rng.sample::<f32, _>(StandardNormal);
            }
        }
    }
    out
}

/// A seed that differs from run to run (tests print it so a failure can be replayed);
/// `MULTIPOLE_SEED` in the environment fixes it.
pub fn fresh_seed() -> u64 {
    if let Some(s) = std::env::var("MULTIPOLE_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
    {
        return s;
    }
    rand::rng().random()
}
