//! llvmpipe's loop limit on the plain variant above d = 128 (docs/perf.md, change 10), and on
//! the subgroup variant's coarse dK~/dV~ pass at long sequences (change 13), and on the dense
//! backward's walks over every query or key (perf.md change 16).
//! llvmpipe (lavapipe, Mesa's GL; our CI's adapter and the web's path) stops an invocation's
//! loops after 65535 iterations counted over the whole invocation and then returns wrong
//! results without an error. Above d = 128 (D4 > 32) its compiler no longer unrolls the plain
//! variant's loops over a row's D4 vec4s, so a key cost ~2 D4 + 8 iterations: at d = 256 the
//! fine-query pass was wrong from m = 192 on (n = 1024), and the backward's dQ and dK/dV passes
//! alike. The composer now writes those loops out above d = 128 (`engine::shaders`,
//! `unroll_row_loops`), so the row loops cost no iteration at any d.
//!
//! These run the plain variant (a context with browser limits: no subgroups) at d = 256 with
//! large blocks, on caller buffers poisoned with NaN, against the f64 reference. Each shape
//! compiles each pass once (the same WG, BK and D4 in every case).
//!
//! Tolerances: the forward's of tests/gpu/forward.rs, |gpu - ref| <= 5e-5 + 5e-5 |ref| for O and
//! 5e-5 + 1e-5 |ref| for the LSE: N(0, 1) inputs give logits of O(1..10) and O a convex
//! combination of O(1) values; an f32 dot product of 256 terms carries ~1e-6 relative error and
//! the softmax sums ~800 positive terms, a few 1e-7 .. 1e-6 measured. The backward's of
//! tests/gpu/backward.rs (2e-4 of each tensor's scale; why: its header). The failures this
//! guards against are 1e-2 .. 3e-1 (0.26 on O at m = 256 before the fix).

use crate::common;
use crate::common::gradients::{backward_poisoned, buffer, compare, nan};
use crate::common::{browser_like_gpu, closeness, Poisoned};
use multipole_attn::cpu::{self, widen};
use multipole_attn::gpu::{Attention, GpuContext, GpuTensors, Host, HostGrad, Resident};
use multipole_attn::random::{fresh_seed, normal_tensor};
use multipole_attn::{FmaConfig, Method, Problem, Queries, Shape};

const O_ATOL: f64 = 5e-5;
const O_RTOL: f64 = 5e-5;
const LSE_ATOL: f64 = 5e-5;
const LSE_RTOL: f64 = 1e-5;

fn tensors(seed: u64, shape: Shape) -> [Vec<f32>; 4] {
    [
        normal_tensor(seed, shape.elements()),
        normal_tensor(seed ^ 0x9e37_79b9, shape.kv_elements()),
        normal_tensor(seed ^ 0x7f4a_7c15, shape.kv_elements()),
        normal_tensor(seed ^ 0x2545_f491, shape.elements()),
    ]
}

fn config(m: usize, p: usize, queries: Queries) -> FmaConfig {
    FmaConfig::new(m, p).queries(queries)
}

fn label(seed: u64, problem: &Problem, cfg: &FmaConfig) -> String {
    format!(
        "seed {seed} {} m={} p={} causal={} {:?}",
        problem.shape, cfg.block, cfg.rank, problem.causal, cfg.queries
    )
}

/// The forward of `problem` through NaN-poisoned caller buffers against the reference; returns
/// the largest absolute error of O (asserting only when `assert`).
fn forward(ctx: &GpuContext, seed: u64, problem: &Problem, cfg: &FmaConfig, assert: bool) -> f64 {
    let label = label(seed, problem, cfg);
    let shape = problem.shape;
    let [q, k, v, _] = tensors(seed, shape);
    let method = Method::Fma(cfg.clone());
    let fma = Attention::new(ctx, method.clone()).unwrap_or_else(|e| panic!("{label}: {e}"));
    let bufs = Poisoned::new(ctx, &q, &k, &v, shape);
    fma.forward(problem, Resident(bufs.tensors()))
        .unwrap_or_else(|e| panic!("{label}: {e}"));
    let (o, lse) = bufs.read(ctx);
    let r = cpu::forward(&method, problem, &widen(&q), &widen(&k), &widen(&v)).unwrap();
    let co = closeness(&o[..shape.elements()], &r.o, O_ATOL, O_RTOL);
    let cl = closeness(&lse[..shape.rows()], &r.lse, LSE_ATOL, LSE_RTOL);
    if assert {
        assert_eq!(co.violations, 0, "{label}: O {co:?}");
        assert_eq!(cl.violations, 0, "{label}: LSE {cl:?}");
    }
    // Infinite when an element is NaN (unwritten).
    co.max_abs.max(cl.max_abs)
}

/// Forward then backward (every gradient buffer poisoned) against the reference gradients;
/// returns the worst scaled error (asserting only when `assert`).
fn backward(ctx: &GpuContext, seed: u64, problem: &Problem, cfg: &FmaConfig, assert: bool) -> f64 {
    let label = label(seed, problem, cfg);
    let shape = problem.shape;
    let [q, k, v, dout] = tensors(seed, shape);
    let method = Method::Fma(cfg.clone());
    let fma = Attention::new(ctx, method.clone()).unwrap_or_else(|e| panic!("{label}: {e}"));
    let (qb, kb, vb) = (
        buffer(ctx, "q", &q),
        buffer(ctx, "k", &k),
        buffer(ctx, "v", &v),
    );
    let (o, lse) = (
        nan(ctx, "o", shape.elements()),
        nan(ctx, "lse", shape.rows()),
    );
    let t = GpuTensors {
        q: &qb,
        k: &kb,
        v: &vb,
        out: &o,
        lse: Some(&lse),
    };
    let ((), saved) = fma.train(problem, Resident(t)).expect("forward");
    let g = backward_poisoned(ctx, &fma, &saved, &dout);
    let r = cpu::backward(
        &method,
        problem,
        (&widen(&q), &widen(&k), &widen(&v)),
        &widen(&dout),
    )
    .unwrap();
    [
        ("dQ", &g.dq, &r.dq),
        ("dK", &g.dk, &r.dk),
        ("dV", &g.dv, &r.dv),
    ]
    .into_iter()
    .map(|(name, a, b)| {
        if assert {
            compare(&label, name, a, b)
        } else {
            let scale = b.iter().fold(1.0f64, |m, x| m.max(x.abs()));
            closeness(a, b, 0.0, 0.0).max_abs / scale
        }
    })
    .fold(0.0, f64::max)
}

fn plain() -> Option<&'static GpuContext> {
    let ctx = browser_like_gpu()?;
    assert!(
        ctx.subgroup_kernels().is_none(),
        "browser limits: no subgroups"
    );
    Some(ctx)
}

/// Fine queries at d = 256: blocks of 256 (wrong before the fix: the middle block's queries
/// see 768 near-field keys) and a block beyond n, the largest any m gives (planned as one block
/// of n: every query sees all 768 keys in its near field, the last one when causal).
#[test]
fn fine_queries_with_large_blocks_at_d256_on_the_plain_variant() {
    let Some(ctx) = plain() else { return };
    let seed = fresh_seed();
    let shape = Shape::new(1, 1, 768, 256);
    for (m, causal) in [(256, false), (4096, true)] {
        let problem = Problem::new(shape).causal(causal);
        let cfg = config(m, 4, Queries::Fine);
        let err = forward(ctx, seed, &problem, &cfg, true);
        eprintln!("{}: max |error| {err:.2e}", label(seed, &problem, &cfg));
    }
}

/// Coarse queries at d = 256 with blocks of 256 and p = m (a coarse query of the one level's
/// windows 0 and 3 attends 2 p = 512 coarse keys; the near field up to 768 fine keys).
#[test]
fn coarse_queries_with_large_blocks_at_d256_on_the_plain_variant() {
    let Some(ctx) = plain() else { return };
    let seed = fresh_seed();
    let problem = Problem::new(Shape::new(1, 1, 1024, 256));
    let cfg = config(256, 256, Queries::Coarse);
    let err = forward(ctx, seed, &problem, &cfg, true);
    eprintln!("{}: max |error| {err:.2e}", label(seed, &problem, &cfg));
}

/// The backward at d = 256 with blocks of 256: dQ sweeps the middle block's 768 near keys,
/// dK/dV the middle block's keys' 768 near queries.
#[test]
fn backward_with_large_blocks_at_d256_on_the_plain_variant() {
    let Some(ctx) = plain() else { return };
    let seed = fresh_seed();
    let problem = Problem::new(Shape::new(1, 1, 768, 256));
    let cfg = config(256, 4, Queries::Fine);
    let err = backward(ctx, seed, &problem, &cfg, true);
    eprintln!(
        "{}: worst scaled error {err:.2e}",
        label(seed, &problem, &cfg)
    );
}

/// The coarse dK~/dV~ pass with subgroups at n = 32768 (levels up to windows of 8192 tokens,
/// each read by 3 x 8192 queries): its first version walked all of a window's readers in one
/// block, past llvmpipe's limit from n = 32768 on (dV off by 1e-2 of its scale, no error);
/// the readers now come in chunks of 256 queries, a workgroup each, added by two rounds of
/// the combine tree at the top level (96 chunks; docs/perf.md, changes 13 and 16). d = 8 keeps the reference
/// cheap: the loop counts do not depend on d. The default context (the subgroup variant where
/// the adapter has subgroups).
#[test]
fn coarse_key_gradients_of_long_sequences_with_subgroups() {
    let Some(ctx) = common::gpu() else { return };
    let seed = fresh_seed();
    let problem = Problem::new(Shape::new(1, 1, 32768, 8));
    let cfg = config(64, 2, Queries::Fine);
    let err = backward(ctx, seed, &problem, &cfg, true);
    eprintln!(
        "{}: worst scaled error {err:.2e}",
        label(seed, &problem, &cfg)
    );
}

/// Not a check: the measurement behind docs/perf.md's change 10 (the largest right block size
/// per d on the plain variant). `cargo test --test gpu_loop_limit -- --ignored --nocapture`.
/// The dense backward's walks: dK/dV of a key tile over 65536 queries (2048 query tiles of
/// BK = 32) and dQ of a query tile over 65536 keys, far past the ~820 .. 1640 tiles from which
/// one dense dispatch came back wrong (perf.md change 9), run in chunks of
/// `DENSE_KEY_TILES_PER_DISPATCH` tiles (8 dispatches each). Plain variant, d = 8, 32 keys
/// (queries) on the short side; each gradient against `cpu::dense_backward` at the backward's
/// tolerance. `DENSE_BACKWARD_UNCHUNKED=1` runs each walk as one dispatch instead (it must fail).
#[test]
fn dense_backward_walks_of_65536_rows_run_in_chunks() {
    let Some(ctx) = plain() else { return };
    let seed = fresh_seed();
    eprintln!("seed {seed}");
    let unchunked = std::env::var("DENSE_BACKWARD_UNCHUNKED").is_ok();
    for shape in [
        Shape::cross(1, 1, 32, 65536, 8),
        Shape::cross(1, 1, 65536, 32, 8),
    ] {
        let [q, k, v, dout] = tensors(seed, shape);
        let mut dense = Attention::dense(ctx).unwrap();
        if unchunked {
            dense = dense.keys_per_dispatch(usize::MAX).unwrap();
        }
        let (_, saved) = dense
            .train(&Problem::new(shape), Host::new(&q, &k, &v))
            .unwrap();
        let g = dense.backward(&saved, HostGrad(&dout)).unwrap();
        let r = cpu::dense_backward(
            &widen(&q),
            &widen(&k),
            &widen(&v),
            &widen(&dout),
            shape,
            false,
        )
        .unwrap();
        let label = format!("seed {seed} {shape} dense backward");
        let worst = [
            ("dQ", &g.dq, &r.dq),
            ("dK", &g.dk, &r.dk),
            ("dV", &g.dv, &r.dv),
        ]
        .into_iter()
        .map(|(name, a, b)| compare(&label, name, a, b))
        .fold(0.0f64, f64::max);
        eprintln!("{label}: worst scaled error {worst:.2e}");
    }
}

#[test]
#[ignore]
fn probe_block_sizes() {
    let Some(ctx) = plain() else { return };
    let seed = fresh_seed();
    let n = std::env::var("PROBE_N").map_or(1024, |s| s.parse().unwrap());
    let ds: Vec<usize> = std::env::var("PROBE_D").map_or(vec![128, 160, 256], |s| {
        s.split(',').map(|x| x.parse().unwrap()).collect()
    });
    let ms: Vec<usize> = std::env::var("PROBE_M").map_or(vec![64, 128, 160, 192, 256, 512], |s| {
        s.split(',').map(|x| x.parse().unwrap()).collect()
    });
    let backward_too = std::env::var("PROBE_BACKWARD").is_ok();
    for &d in &ds {
        let problem = Problem::new(Shape::new(1, 1, n, d));
        for &m in &ms {
            let cfg = config(m, 4, Queries::Fine);
            let err = forward(ctx, seed, &problem, &cfg, false);
            let grad = if backward_too {
                let err = backward(ctx, seed, &problem, &cfg, false);
                format!(", backward worst scaled error {err:.2e}")
            } else {
                String::new()
            };
            eprintln!("n {n} d {d} m {m}: forward max |error| {err:.2e}{grad}");
        }
    }
}

/// Not a check: one dense dispatch (no key chunks) of 16 queries over PROBE_KEYS keys at
/// PROBE_D on the plain variant, against the reference: the loop cost per key of the sweeps
/// that the fine pass's near field shares (`near_field.wgsl`), so the block size from which a
/// fine pass would pass llvmpipe's limit (about a third of the first wrong key count).
#[test]
#[ignore]
fn probe_unchunked_dense_keys() {
    let Some(ctx) = plain() else { return };
    let seed = fresh_seed();
    let list = |var: &str, default: &str| -> Vec<usize> {
        std::env::var(var)
            .unwrap_or(default.into())
            .split(',')
            .map(|x| x.parse().unwrap())
            .collect()
    };
    for d in list("PROBE_D", "256") {
        for keys in list("PROBE_KEYS", "8192,16384,24576,32768") {
            let shape = Shape::cross(1, 1, 16, keys, d);
            let [q, k, v, _] = tensors(seed, shape);
            let r = cpu::dense_attention(&widen(&q), &widen(&k), &widen(&v), shape, false).unwrap();
            let dense = Attention::dense(ctx)
                .unwrap()
                .keys_per_dispatch(usize::MAX)
                .unwrap();
            let bufs = Poisoned::new(ctx, &q, &k, &v, shape);
            dense
                .forward(&Problem::new(shape), Resident(bufs.tensors()))
                .unwrap();
            let (o, _) = bufs.read(ctx);
            let c = closeness(&o, &r.o, O_ATOL, O_RTOL);
            eprintln!(
                "d {d}, {keys} keys in one dispatch: max |error| {:.2e}",
                c.max_abs
            );
        }
    }
}
