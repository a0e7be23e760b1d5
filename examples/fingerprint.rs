//! Bit-for-bit fingerprints of the library's GPU results, for checking that a refactoring
//! changes no bit: FMA forward (fine and coarse queries, causal, Average and Learned, with and
//! without the count correction), the backward (dQ, dK, dV and the weight gradients), dense
//! attention, and the split paths (heads over a 16 KiB binding), on fixed random inputs.
//!
//! `cargo run --release --example fingerprint > before.txt`, change the code, run it again and
//! `diff before.txt after.txt`: one line per case, a 64-bit FNV-1a hash of the output's f32
//! bits. The hashes depend on the adapter (its float arithmetic and subgroup size), so compare
//! runs on the same machine only.

use multipole_attn::gpu::{Attention, GpuContext, Host, HostGrad};
use multipole_attn::random::normal_tensor;
use multipole_attn::{Downsample, FmaConfig, LearnedWeights, Problem, Queries, Shape};

/// FNV-1a over the bits of `xs`.
fn hash(xs: &[f32]) -> u64 {
    xs.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, x| {
        x.to_bits()
            .to_le_bytes()
            .iter()
            .fold(h, |h, &b| (h ^ b as u64).wrapping_mul(0x0100_0000_01b3))
    })
}

/// Learned weights with random values (not the box initialisation, which equals Average).
fn random_weights(d: usize, m: usize, p: usize, n: usize, seed: u64) -> LearnedWeights {
    let mut w = LearnedWeights::box_init_for(d, m, p, n);
    for (l, lv) in w.levels.iter_mut().enumerate() {
        let s = seed + 10 * l as u64;
        for (k, t) in [
            &mut lv.wk, &mut lv.wv, &mut lv.wq, &mut lv.bk, &mut lv.bv, &mut lv.bq,
        ]
        .into_iter()
        .enumerate()
        {
            let noise = normal_tensor(s + k as u64, t.len());
            for (x, e) in t.iter_mut().zip(noise) {
                *x += 0.1 * e;
            }
        }
    }
    w
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let ctx = GpuContext::new()?;
    eprintln!("adapter {} ({:?})", ctx.info.name, ctx.info.backend);
    for &(n, d, m, p) in &[
        (97usize, 16usize, 8usize, 2usize),
        (1025, 40, 16, 2),
        (300, 64, 32, 2),
    ] {
        let shape = Shape::new(1, 2, n, d);
        // A binding of half a head: every head is cut along its sequence.
        let split = (n * d * 2) as u64;
        let q = normal_tensor(1, shape.elements());
        let k = normal_tensor(2, shape.elements());
        let v = normal_tensor(3, shape.elements());
        let dout = normal_tensor(4, shape.elements());
        let learned = Downsample::Learned(random_weights(d, m, p, n, 5));
        let configs = [
            ("fine", FmaConfig::new(m, p), false),
            ("fine causal", FmaConfig::new(m, p), true),
            (
                "fine no-cc",
                FmaConfig::new(m, p).count_correction(false),
                false,
            ),
            (
                "fine learned",
                FmaConfig::new(m, p).downsample(learned.clone()),
                false,
            ),
            (
                "fine learned causal",
                FmaConfig::new(m, p).downsample(learned.clone()),
                true,
            ),
            (
                "coarse",
                FmaConfig::new(m, p).queries(Queries::Coarse),
                false,
            ),
            (
                "coarse learned",
                FmaConfig::new(m, p)
                    .queries(Queries::Coarse)
                    .downsample(learned.clone()),
                false,
            ),
        ];
        let x = Host::new(&q, &k, &v);
        for (name, cfg, causal) in configs {
            let problem = Problem::new(shape).causal(causal);
            let fma = Attention::fma(&ctx, cfg.clone())?;
            let out = fma.forward(&problem, x)?;
            let lse = out.lse.unwrap_or_default();
            println!(
                "n {n} d {d} m {m} p {p} {name:<20} forward  o {:016x} lse {:016x}",
                hash(&out.o),
                hash(&lse)
            );
            if cfg.queries == Queries::Fine {
                let (_, saved) = fma.train(&problem, x)?;
                let g = fma.backward(&saved, HostGrad(&dout))?;
                let w: Vec<f32> = g
                    .weights
                    .iter()
                    .flatten()
                    .flat_map(|l| [&l.wk, &l.bk, &l.wv, &l.bv].into_iter().flatten().copied())
                    .collect();
                println!(
                    "n {n} d {d} m {m} p {p} {name:<20} backward dq {:016x} dk {:016x} dv {:016x} dw {:016x}",
                    hash(&g.dq),
                    hash(&g.dk),
                    hash(&g.dv),
                    hash(&w)
                );
            }
            let small = Attention::fma(&ctx, cfg.clone())?.max_binding(split)?;
            if let Downsample::Average = cfg.downsample {
                let out = small.forward(&problem, x)?;
                println!(
                    "n {n} d {d} m {m} p {p} {name:<20} split    o {:016x} lse {:016x}",
                    hash(&out.o),
                    hash(&out.lse.unwrap_or_default())
                );
            }
        }
        for causal in [false, true] {
            let problem = Problem::new(shape).causal(causal);
            let out = Attention::dense(&ctx)?.forward(&problem, x)?;
            // At least two tiles of 64 rows: the least a split dense head needs.
            let split = Attention::dense(&ctx)?
                .max_binding(split.max(2 * 64 * d as u64 * 4))?
                .forward(&problem, x)?;
            println!(
                "n {n} d {d} dense causal {causal:<5} o {:016x} lse {:016x} split o {:016x}",
                hash(&out.o),
                hash(&out.lse.unwrap_or_default()),
                hash(&split.o)
            );
        }
    }
    Ok(())
}
