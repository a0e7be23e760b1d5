//! The per-pass profiler (`GpuContext::start_profiling`, issue 29): on a device with
//! timestamps inside passes (lavapipe has them), every dispatch of a plan appears once, in the
//! plan's order, with its pass name and level and a finite, non-negative time; nothing is
//! recorded once it is taken. Its own device: the profiler is shared by a context's clones, so
//! on the shared one it would also time the other tests' dispatches.

use crate::common::gpu;
use multipole_attn::gpu::{summarize, Attention, GpuContext, Host};
use multipole_attn::random::normal_tensor;
use multipole_attn::{FmaConfig, Problem, Queries, Shape};

fn profiled(
    ctx: &GpuContext,
    attn: &Attention,
    p: &Problem,
) -> Vec<(&'static str, Option<u32>, f64)> {
    let s = p.shape;
    let q = normal_tensor(1, s.elements());
    let k = normal_tensor(2, s.kv_elements());
    let v = normal_tensor(3, s.kv_elements());
    ctx.start_profiling(1024).unwrap();
    attn.forward(p, Host::new(&q, &k, &v)).unwrap();
    let (times, dropped) = ctx.take_profile().unwrap();
    assert_eq!(dropped, 0);
    times.into_iter().map(|t| (t.pass, t.level, t.ns)).collect()
}

#[test]
fn every_dispatch_of_a_plan_is_timed_by_pass_and_level() {
    let Some(_) = gpu() else { return };
    let ctx = GpuContext::new().unwrap();
    let needed = wgpu::Features::TIMESTAMP_QUERY | wgpu::Features::TIMESTAMP_QUERY_INSIDE_PASSES;
    if !ctx.device.features().contains(needed) {
        eprintln!(
            "skipping: {} has no timestamps inside passes",
            ctx.info.name
        );
        assert!(ctx.start_profiling(16).is_err());
        return;
    }
    let shape = Shape::new(1, 2, 512, 16);
    for (cfg, causal) in [
        (FmaConfig::new(16, 2), false),
        (FmaConfig::new(16, 2), true),
        (FmaConfig::new(16, 2).queries(Queries::Coarse), false),
    ] {
        let fma = Attention::fma(&ctx, cfg.clone()).unwrap();
        let p = Problem::new(shape).causal(causal);
        let plan = fma.plan(&p).unwrap();
        let want: Vec<_> = plan
            .fma()
            .unwrap()
            .steps()
            .iter()
            .map(|d| (d.pass.name(), d.level))
            .collect();
        let got = profiled(&ctx, &fma, &p);
        let names: Vec<_> = got.iter().map(|&(p, l, _)| (p, l)).collect();
        assert_eq!(names, want, "{cfg:?} causal {causal}");
        assert!(got.iter().all(|&(_, _, ns)| ns.is_finite() && ns >= 0.0));
        assert!(
            got.iter().map(|t| t.2).sum::<f64>() > 0.0,
            "{cfg:?}: all zero"
        );
        let sums = summarize(
            &got.iter()
                .map(|&(pass, level, ns)| multipole_attn::gpu::PassTime { pass, level, ns })
                .collect::<Vec<_>>(),
        );
        assert!(sums.iter().any(|s| s.0 == "fine_attention"), "{sums:?}");
    }
    // Dense: its dispatch (one per key chunk) under the pass's name.
    let dense = Attention::dense(&ctx).unwrap();
    let got = profiled(&ctx, &dense, &Problem::new(shape));
    assert!(
        !got.is_empty() && got.iter().all(|t| t.0 == "dense_attention"),
        "{got:?}"
    );
    // Taken: off again; a second take has nothing to read.
    assert!(ctx.take_profile().is_err());
    assert!(ctx.start_profiling(0).is_err());
    assert!(ctx.start_profiling(1 << 20).is_err());
}

#[test]
fn a_full_profiler_counts_what_it_could_not_time() {
    let Some(_) = gpu() else { return };
    let ctx = GpuContext::new().unwrap();
    if ctx.start_profiling(1).is_err() {
        return; // no timestamps inside passes (checked by the test above)
    }
    let fma = Attention::fma(&ctx, FmaConfig::new(16, 2)).unwrap();
    let p = Problem::new(Shape::new(1, 1, 256, 8));
    let steps = fma.plan(&p).unwrap().fma().unwrap().steps().len() as u32;
    let s = p.shape;
    let x = normal_tensor(4, s.elements());
    fma.forward(&p, Host::new(&x, &x, &x)).unwrap();
    let (times, dropped) = ctx.take_profile().unwrap();
    assert_eq!(times.len(), 1);
    assert_eq!(dropped, steps - 1);
}
