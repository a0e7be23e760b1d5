//! The split backward of ONE head whose coarse rows' reader-chunk partial sums exceed a storage
//! binding (issue 27, `plan::DkvRowGroup`): each level of the coarse dK~/dV~ pass runs in groups
//! of whole windows whose partial sums fit one binding after dK~'s rows, every chunk's pass over
//! a group's rows then the group's combine rounds. With the library capped at a small binding
//! (`Attention::max_binding`, on the shared context, so both runs use the same kernels), each
//! case asserts from the plan that the head is several chunks, that some level's partial sums
//! whole would exceed the binding after dK~'s rows (the refusal before), and that some level
//! runs in more than one group (so it cannot pass without grouping). Against the unsplit run
//! (the default binding, every gradient buffer poisoned with NaN) on the same context:
//! - O, the LSE and dQ: the same bits (the forward split is bitwise; dQ reads the whole coarse
//!   K~, V~ with the unsplit float operations);
//! - dK, dV: within WTOL = 1e-5 of the scale (max(1, max|g|); `common::gradients::regrouped`).
//!   Why not bitwise: as in `backward_split_head.rs`, a reader chunk that straddles a token
//!   chunk boundary is added as one part per token chunk, in chunk order (a regrouping of the
//!   same f32 terms: a few roundings of 2^-24 of sums within a few times the scale). The
//!   groups of rows change no float operation (a row's sums are the same terms in the same
//!   order, only where its partials sit changes). A group's rows missing, written twice, or
//!   reading another group's partials moves an element by its share of a sum, far above WTOL.
//!
//! The split run's gradients come back from the executor's zero-filled chunk buffers, so every
//! element is also checked finite and non-zero (N(0, 1) inputs make an exact 0 all but
//! impossible, but for a causal head's first query, whose dS can be 0 exactly). The split run
//! is bitwise the same twice, and within the backward tolerance of the f64 reference
//! (`common::gradients::TOL`). Cases: 1D n = 2000, m = 16, p = 2, d = 8 under 16 KiB,
//! bidirectional, causal and a GQA group of 2; 2D 40 x 40 and 37 x 41 (partial cells), r = 4,
//! p = 2, d = 4 under 8 KiB (refused before: "partial sums"); a browser's limits (no
//! subgroups: the coarse pass's two-phase path). Measured: dK/dV within 1.3e-7 of the scale of
//! the unsplit run (WTOL 1e-5: 75x headroom), 3.6e-7 of the f64 reference.
//! Not here: coarse rows of all levels over one binding (a typed error: still refused).

use crate::common::gradients::{compare_all, gpu_gradients, host_gradients, inputs, regrouped};
use crate::common::{browser_like_gpu, gpu};
use multipole_attn::cpu::{self, widen};
use multipole_attn::gpu::{Attention, GpuContext};
use multipole_attn::plan::{BackwardSplitPlan, KernelLimits};
use multipole_attn::random::fresh_seed;
use multipole_attn::{FmaConfig, FmaError, Grid, Method, Problem, Shape};

/// One case: a problem, its configuration, the split run's binding cap.
type Case = (Problem, FmaConfig, u64);

fn cases() -> Vec<Case> {
    let line = FmaConfig::new(16, 2);
    let grid = |h: usize, w: usize| FmaConfig::new(4, 2).grid(Some(Grid::new(h, w)));
    let one = |n, d| Shape::new(1, 1, n, d);
    vec![
        (Problem::new(one(2000, 8)), line.clone(), 16 << 10),
        (
            Problem::new(one(2000, 8)).causal(true),
            line.clone(),
            16 << 10,
        ),
        // A GQA group of 2: each query head split, the K/V head's gradients summed on the host.
        (
            Problem::new(Shape::new(1, 2, 2000, 8).with_kv_heads(1)).causal(true),
            line,
            16 << 10,
        ),
        (Problem::new(one(1600, 4)), grid(40, 40), 8 << 10),
        (Problem::new(one(37 * 41, 4)), grid(37, 41), 8 << 10),
    ]
}

/// Every element finite and not +-0 (an element of the zero-filled chunk buffers that no pass
/// wrote would read +0), but the `exempt` elements, which may be 0 exactly.
fn all_written(label: &str, name: &str, g: &[f32], exempt: impl Fn(usize) -> bool) {
    let bad = g
        .iter()
        .enumerate()
        .position(|(i, x)| !x.is_finite() || (*x == 0.0 && !exempt(i)));
    let value = bad.map(|i| g[i]);
    assert!(
        bad.is_none(),
        "{label}: {name}[{bad:?}] = {value:?} unwritten or not finite"
    );
}

/// One case on `ctx`: the split run against the unsplit one, itself and the f64 reference;
/// returns the worst dK/dV difference from the unsplit run (of the scale).
fn check(ctx: &GpuContext, seed: u64, (problem, cfg, cap): Case) -> f64 {
    let shape = problem.shape;
    let label = format!(
        "seed {seed} {shape} causal={} grid {:?} binding {cap}",
        problem.causal, cfg.grid
    );
    let x = inputs(seed, shape);
    let whole = Attention::fma(ctx, cfg.clone()).unwrap();
    let split = Attention::fma(ctx, cfg.clone())
        .unwrap()
        .max_binding(cap)
        .unwrap();
    // The plan: several chunks, a level whose partial sums whole exceed the binding after
    // dK~'s rows, run in groups. (The configuration's mask is the bidirectional one, which
    // the problem's overrides: a causal head has as many chunks and at most as many reader
    // chunks; `plan::backward_split_rows`'s tests plan the causal cases and find them grouped
    // too.)
    let (n, d) = (shape.seq, shape.head_dim);
    let limits = KernelLimits::from_wgpu(&ctx.limits).capped(cap);
    let plan = BackwardSplitPlan::new(n, d, &cfg, &limits).expect(&label);
    assert!(plan.split.chunks.len() > 1, "{label}: one chunk");
    let head = &plan.head;
    let p = head.forward.levels.p;
    let over = head
        .dkv_coarse
        .iter()
        .zip(&head.forward.levels.levels)
        .any(|(s, lv)| {
            let k = s.args[0] as usize;
            k > 1 && ((head.partials_at + lv.windows * p * k * d) * 4) as u64 > cap
        });
    assert!(over, "{label}: every level's partial sums fit whole");
    let groups = plan.dkv_groups.iter().map(Vec::len).max().unwrap_or(0);
    assert!(groups > 1, "{label}: no level in groups");

    let (out_u, _) = host_gradients(&whole, &problem, &x);
    let g_u = gpu_gradients(ctx, &whole, &x, &problem);
    let (out_s, g_s) = host_gradients(&split, &problem, &x);
    assert_eq!(out_s.o, out_u.o, "{label}: O");
    assert_eq!(out_s.lse, out_u.lse, "{label}: LSE");
    // Causal: a head's first query sees only its own key (P = 1), so its dS = dO.v - D can be
    // 0 exactly, and its dQ with it.
    let first_query = |i: usize| problem.causal && i % (n * d) < d;
    all_written(&label, "dQ", &g_s.dq, first_query);
    all_written(&label, "dK", &g_s.dk, |_| false);
    all_written(&label, "dV", &g_s.dv, |_| false);
    assert_eq!(g_s.dq, g_u.dq, "{label}: dQ");
    let worst =
        regrouped(&label, "dK", &g_s.dk, &g_u.dk).max(regrouped(&label, "dV", &g_s.dv, &g_u.dv));
    let (_, again) = host_gradients(&split, &problem, &x);
    assert_eq!(again, g_s, "{label}: two split runs differ");
    let reference = cpu::backward(
        &Method::Fma(cfg),
        &problem,
        (&widen(&x.q), &widen(&x.k), &widen(&x.v)),
        &widen(&x.dout),
    )
    .unwrap();
    let to_ref = compare_all(&label, &g_s, &reference);
    eprintln!(
        "{label}: {} chunks, up to {groups} groups a level, dK/dV vs unsplit {worst:.2e}, \
         against f64 {to_ref:.2e}",
        plan.split.chunks.len()
    );
    worst
}

#[test]
fn partial_sums_over_a_binding_run_in_groups_of_rows_and_match_unsplit() {
    let Some(ctx) = gpu() else { return };
    let seed = fresh_seed();
    eprintln!("seed {seed}");
    let mut worst = 0.0f64;
    for (i, case) in cases().into_iter().enumerate() {
        worst = worst.max(check(ctx, seed.wrapping_add(i as u64 * 7919), case));
    }
    eprintln!("worst dK/dV difference {worst:.2e} of the scale");
}

#[test]
fn the_plain_kernels_run_groups_of_rows_too() {
    // A browser's limits: no subgroups, so the coarse dK~/dV~ pass takes its two-phase path.
    let Some(ctx) = browser_like_gpu() else {
        return;
    };
    let seed = fresh_seed();
    eprintln!("seed {seed}");
    for (i, case) in cases()
        .into_iter()
        .enumerate()
        .filter(|(i, _)| [1, 3].contains(i))
    {
        check(ctx, seed.wrapping_add(i as u64), case);
    }
}

#[test]
fn coarse_rows_over_a_binding_stay_a_typed_error() {
    // 1D m = 4: the head's coarse rows of all levels (about n p / 2) exceed 16 KiB.
    let Some(ctx) = gpu() else { return };
    let shape = Shape::new(1, 1, 2000, 8);
    let x = inputs(fresh_seed(), shape);
    let fma = Attention::fma(ctx, FmaConfig::new(4, 2))
        .unwrap()
        .max_binding(16 << 10)
        .unwrap();
    let e = fma
        .train(
            &Problem::new(shape),
            multipole_attn::gpu::Host::new(&x.q, &x.k, &x.v),
        )
        .expect_err("coarse rows over a binding");
    assert!(
        matches!(&e, FmaError::LimitExceeded { what, .. } if what.contains("coarse rows")),
        "{e}"
    );
}
