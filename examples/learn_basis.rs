//! Fits FMA's learned basis functions (the Learned downsampling weights, algorithm.md §4) by
//! gradient descent with Adam, through the GPU backward pass (§8), so that FMA approximates
//! dense attention better than the parameter-free Average downsampling.
//!
//! Workload (a far field that is not flat): Q, K, V vary smoothly along the sequence
//! (`random::smooth_tensor`), plus "landmark" tokens every 32 positions whose keys stand out
//! along a direction every query favours and whose values are random, so a query puts a
//! sizeable share of its attention on distant landmarks. Averaging a sub-window dilutes a
//! landmark's key (exp of a mean is not the mean of exps); learned weights can give landmark
//! positions their own weight. Each step draws a fresh sample (so the error printed is on
//! unseen data), computes the loss L = mean((O_fma - O_dense)^2), feeds dO = 2 (O_fma -
//! O_dense) / N to the backward, and takes one Adam step on every level's (WK, bK, WV, bV)
//! (with coarse queries, algorithm.md §6, also (WQ, bQ): the O(n) variant trains the same way).
//!
//! Prints, per step, the relative error ||O - O_dense|| / ||O_dense|| of Learned and Average
//! FMA on that step's sample, and writes results/learn_basis.svg (error vs step).
//!
//! `cargo run --release --example learn_basis [-- STEPS [fine|coarse]]` (coarse queries write
//! results/learn_basis_coarse.svg).

use multipole_attn::gpu::{Attention, GpuContext, Host, HostGrad};
use multipole_attn::random::{normal_tensor, smooth_tensor};
use multipole_attn::{Downsample, FmaConfig, LearnedWeights, Problem, Queries, Result, Shape};
use plotters::prelude::*;

const N: usize = 512;
const D: usize = 16;
const M: usize = 16;
const P: usize = 2;
const HEADS: usize = 4;
/// Landmark tokens: every PERIOD positions from OFFSET.
const PERIOD: usize = 32;
const OFFSET: usize = 7;

/// Q, K, V of one sample, (1, HEADS, N, D).
fn sample(seed: u64) -> [Vec<f32>; 3] {
    let mut q = smooth_tensor(seed, HEADS, N, D, 0.05);
    let mut k = smooth_tensor(seed + 1, HEADS, N, D, 0.05);
    let mut v = smooth_tensor(seed + 2, HEADS, N, D, 0.05);
    let landmark_v = normal_tensor(seed + 3, HEADS * N * D);
    // The direction queries favour and landmark keys stand out along: (1, .., 1) / sqrt(D).
    let u = 1.0 / (D as f32).sqrt();
    for h in 0..HEADS {
        for t in 0..N {
            let row = (h * N + t) * D;
            for c in 0..D {
                q[row + c] += 2.0 * u;
                if t % PERIOD == OFFSET {
                    k[row + c] += 4.0 * u;
                    v[row + c] = landmark_v[row + c];
                }
            }
        }
    }
    [q, k, v]
}

fn rel_error(o: &[f32], reference: &[f32]) -> f64 {
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (a, b) in o.iter().zip(reference) {
        num += ((a - b) as f64).powi(2);
        den += (*b as f64).powi(2);
    }
    (num / den).sqrt()
}

/// Adam on one parameter vector.
struct Adam {
    m: Vec<f32>,
    v: Vec<f32>,
    lr: f32,
}

impl Adam {
    fn new(len: usize, lr: f32) -> Self {
        Self {
            m: vec![0.0; len],
            v: vec![0.0; len],
            lr,
        }
    }

    fn step(&mut self, x: &mut [f32], g: &[f32], t: i32) {
        let (b1, b2, eps) = (0.9f32, 0.999f32, 1e-8f32);
        let (c1, c2) = (1.0 - b1.powi(t), 1.0 - b2.powi(t));
        for i in 0..x.len() {
            self.m[i] = b1 * self.m[i] + (1.0 - b1) * g[i];
            self.v[i] = b2 * self.v[i] + (1.0 - b2) * g[i] * g[i];
            x[i] -= self.lr * (self.m[i] / c1) / ((self.v[i] / c2).sqrt() + eps);
        }
    }
}

fn plot(
    path: &str,
    learned: &[f64],
    average: &[f64],
    queries: Queries,
) -> std::result::Result<(), String> {
    let root = SVGBackend::new(path, (800, 480)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    let hi = learned.iter().chain(average).fold(0.0f64, |a, &b| a.max(b)) * 1.1;
    let lo = learned
        .iter()
        .chain(average)
        .fold(f64::MAX, |a, &b| a.min(b))
        * 0.9;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!(
                "FMA ({queries:?} queries) vs dense attention, n = {N}, d = {D}, m = {M}, p = {P}"
            ),
            ("sans-serif", 20),
        )
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0usize..learned.len(), (lo..hi).log_scale())
        .map_err(|e| e.to_string())?;
    chart
        .configure_mesh()
        .x_desc("Adam step")
        .y_desc("relative error ||O - O_dense|| / ||O_dense||")
        .draw()
        .map_err(|e| e.to_string())?;
    for (name, data, color) in [("learned basis", learned, RED), ("average", average, BLUE)] {
        chart
            .draw_series(LineSeries::new(
                data.iter().enumerate().map(|(i, &e)| (i, e)),
                color.stroke_width(2),
            ))
            .map_err(|e| e.to_string())?
            .label(name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE)
        .border_style(BLACK)
        .draw()
        .map_err(|e| e.to_string())?;
    root.present().map_err(|e| e.to_string())
}

fn main() -> Result<()> {
    let steps: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(150);
    let queries = match std::env::args().nth(2).as_deref() {
        Some("coarse") => Queries::Coarse,
        _ => Queries::Fine,
    };
    let ctx = GpuContext::new()?;
    println!("adapter: {} ({:?})", ctx.info.name, ctx.info.backend);
    let shape = Shape::new(1, HEADS, N, D);
    let mut weights = LearnedWeights::box_init_for(D, M, P, N);
    let problem = Problem::new(shape);
    let dense = Attention::dense(&ctx)?;
    let average = Attention::fma(&ctx, FmaConfig::new(M, P).queries(queries))?;
    // Step sizes relative to each level's box weight p / w_l (Adam's steps are ~lr each).
    let mut opt: Vec<[Adam; 6]> = weights
        .levels
        .iter()
        .enumerate()
        .map(|(i, lw)| {
            let box_w = P as f32 / (M << i) as f32;
            [
                Adam::new(lw.wk.len(), 0.05 * box_w),
                Adam::new(lw.bk.len(), 0.01),
                Adam::new(lw.wv.len(), 0.05 * box_w),
                Adam::new(lw.bv.len(), 0.01),
                Adam::new(lw.wq.len(), 0.05 * box_w),
                Adam::new(lw.bq.len(), 0.01),
            ]
        })
        .collect();
    let (mut learned_err, mut average_err) = (Vec::new(), Vec::new());
    let start = std::time::Instant::now();
    println!("{:>5} {:>14} {:>14}", "step", "learned err", "average err");
    for step in 0..steps {
        let [q, k, v] = sample(1000 + 7 * step as u64);
        let x = Host::new(&q, &k, &v).without_lse();
        let target = dense.forward(&problem, x)?.o;
        let fma = Attention::fma(
            &ctx,
            FmaConfig::new(M, P)
                .queries(queries)
                .downsample(Downsample::Learned(weights.clone())),
        )?;
        let (out, saved) = fma.train(&problem, x)?;
        let base = average.forward(&problem, x)?.o;
        let (el, ea) = (rel_error(&out.o, &target), rel_error(&base, &target));
        learned_err.push(el);
        average_err.push(ea);
        if step % 10 == 0 || step + 1 == steps {
            println!("{step:>5} {el:>14.5e} {ea:>14.5e}");
        }
        let scale = 2.0 / out.o.len() as f32;
        let dout: Vec<f32> = out
            .o
            .iter()
            .zip(&target)
            .map(|(a, b)| scale * (a - b))
            .collect();
        let grads = fma.backward(&saved, HostGrad(&dout))?;
        let Some(gw) = grads.weights else {
            unreachable!("Learned mode returns weight gradients")
        };
        for (i, (lw, g)) in weights.levels.iter_mut().zip(&gw).enumerate() {
            let t = step as i32 + 1;
            let o = &mut opt[i];
            o[0].step(&mut lw.wk, &g.wk, t);
            o[1].step(&mut lw.bk, &g.bk, t);
            o[2].step(&mut lw.wv, &g.wv, t);
            o[3].step(&mut lw.bv, &g.bv, t);
            // Fine queries do not use the query weights: their gradients are zeros.
            if queries == Queries::Coarse {
                o[4].step(&mut lw.wq, &g.wq, t);
                o[5].step(&mut lw.bq, &g.bq, t);
            }
        }
    }
    let tail = 10.min(steps);
    let mean = |v: &[f64]| v[v.len() - tail..].iter().sum::<f64>() / tail as f64;
    println!(
        "{} steps in {:.1} s; mean relative error over the last {tail} steps: learned {:.4e}, average {:.4e} ({:.2}x lower)",
        steps,
        start.elapsed().as_secs_f64(),
        mean(&learned_err),
        mean(&average_err),
        mean(&average_err) / mean(&learned_err)
    );
    std::fs::create_dir_all("results").ok();
    let path = match queries {
        Queries::Coarse => "results/learn_basis_coarse.svg",
        Queries::Fine => "results/learn_basis.svg",
    };
    match plot(path, &learned_err, &average_err, queries) {
        Ok(()) => println!("wrote {path}"),
        Err(e) => eprintln!("could not write the plot: {e}"),
    }
    Ok(())
}
