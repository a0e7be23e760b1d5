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
