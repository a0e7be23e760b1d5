//! The library in the browser: WebGPU output against the f64 CPU reference (compiled to wasm
//! too) on several shapes, under the browser's limits, plus the JS-facing API (options, errors
//! as JS exceptions, the structure and level-mass exports).
//!
//! Run: `CHROMEDRIVER=/usr/bin/chromedriver cargo test --target wasm32-unknown-unknown -p
//! multipole-attn-web` (headless Chromium, flags in `web/webdriver.json`; scripts/test_web.sh).
//!
//! Seeds are fresh per run (printed; the browser console shows them on failure). Output
//! buffers are filled with NaN before the GPU runs, so an element no kernel writes fails.
//!
//! Tolerance, as in the native `tests/gpu/forward.rs` and with the same check
//! (`multipole_attn::closeness`): |gpu - ref| <= 5e-5 + 5e-5 |ref| for O and 5e-5 + 1e-5 |ref|
//! for the LSE. Inputs are N(0, 1), so logits are O(1..10) and O is a convex combination of
//! O(1) values; f32 dot products of d <= 128 terms (relative error about sqrt(d) * 6e-8),
//! WebGPU's exp (3 + 2|x| ulp, the same bound WGSL gives natively) and sums of at most a few
//! hundred (FMA) or n (dense) terms give a few 1e-6. An indexing error (a key at the wrong
//! level, a lost count correction) moves O by 1e-2 or more.
#![cfg(target_arch = "wasm32")]

use multipole_attn::closeness::closeness;
use multipole_attn::cpu::{self, widen};
use multipole_attn::gpu::{Attention, GpuContext, GpuTensors, Host, HostGrad, Resident};
use multipole_attn::plan::{DenseSplitPlan, KernelLimits};
use multipole_attn::random::{fresh_seed, normal_tensor};
use multipole_attn::{FmaConfig, Method, Problem, Shape};
use multipole_attn_web::{
    compare_outputs, grid_structure, make_inputs, structure, Gpu, GridStructure, Options, Queries,
    Structure,
};
use wasm_bindgen::{JsCast, JsValue};
use wasm_bindgen_test::*;
use wgpu::util::DeviceExt;

wasm_bindgen_test_configure!(run_in_browser);

const O_ATOL: f64 = 5e-5;
const O_RTOL: f64 = 5e-5;
const LSE_ATOL: f64 = 5e-5;
const LSE_RTOL: f64 = 1e-5;

fn opts(
    batch: usize,
    heads: usize,
    n: usize,
    d: usize,
    m: usize,
    p: usize,
    causal: bool,
) -> Options {
    Options {
        batch,
        heads,
        kv_heads: None,
        n,
        n_kv: None,
        head_dim: d,
        m,
        p,
        causal,
        queries: Queries::Fine,
        seqlens: None,
        seqlens_kv: None,
        grid: None,
        softcap: None,
        sinks: None,
        window: None,
    }
}

/// Copies `buf` into a mappable buffer and awaits the browser's map callback.
async fn read_back(ctx: &GpuContext, buf: &wgpu::Buffer) -> Vec<f32> {
    let staging = ctx.device.create_buffer(&wgpu::BufferDescriptor {
        label: Some("test readback"),
        size: buf.size(),
        usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
        mapped_at_creation: false,
    });
    let mut enc = ctx.device.create_command_encoder(&Default::default());
    enc.copy_buffer_to_buffer(buf, 0, &staging, 0, buf.size());
    ctx.queue.submit([enc.finish()]);
    let (tx, rx) = futures_channel::oneshot::channel();
    staging.slice(..).map_async(wgpu::MapMode::Read, move |r| {
        let _ = tx.send(r);
    });
    rx.await.expect("map callback ran").expect("buffer mapped");
    let data =
        bytemuck::cast_slice::<u8, f32>(&staging.slice(..).get_mapped_range().unwrap()).to_vec();
    staging.unmap();
    data
}

/// Q, K, V uploaded; O and the LSE filled with NaN.
struct Poisoned {
    q: wgpu::Buffer,
    k: wgpu::Buffer,
    v: wgpu::Buffer,
    out: wgpu::Buffer,
    lse: wgpu::Buffer,
}

impl Poisoned {
    fn new(ctx: &GpuContext, q: &[f32], k: &[f32], v: &[f32], shape: Shape) -> Self {
        let init = |label, data: &[f32], extra| {
            ctx.device
                .create_buffer_init(&wgpu::util::BufferInitDescriptor {
                    label: Some(label),
                    contents: bytemuck::cast_slice(data),
                    usage: wgpu::BufferUsages::STORAGE | extra,
                })
        };
        Self {
            q: init("q", q, wgpu::BufferUsages::empty()),
            k: init("k", k, wgpu::BufferUsages::empty()),
            v: init("v", v, wgpu::BufferUsages::empty()),
            out: init(
                "out",
                &vec![f32::NAN; shape.elements()],
                wgpu::BufferUsages::COPY_SRC,
            ),
            lse: init(
                "lse",
                &vec![f32::NAN; shape.rows()],
                wgpu::BufferUsages::COPY_SRC,
            ),
        }
    }

    fn tensors(&self) -> GpuTensors<'_> {
        GpuTensors {
            q: &self.q,
            k: &self.k,
            v: &self.v,
            out: &self.out,
            lse: Some(&self.lse),
        }
    }
}

struct Qkv {
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
}

/// The f64 FMA of the options' problem (its shape replaced by `shape` when given: K and V
/// repeated per query head, say).
fn fma_reference(
    o: &Options,
    shape: Option<Shape>,
    q: &[f64],
    k: &[f64],
    v: &[f64],
) -> multipole_attn::Result<cpu::Reference> {
    // The options' own errors are JsErrors; the reference speaks FmaError.
    let invalid = |_| multipole_attn::FmaError::InvalidConfig {
        what: "options",
        value: format!("{o:?}"),
        allowed: "a valid problem and FMA configuration".into(),
    };
    let problem = o.problem().map_err(invalid)?;
    let problem = Problem {
        shape: shape.unwrap_or(problem.shape),
        ..problem
    };
    let cfg = o.config().map_err(invalid)?;
    cpu::forward(&Method::Fma(cfg), &problem, q, k, v)
}

fn qkv(seed: u64, shape: Shape) -> Qkv {
    Qkv {
        q: normal_tensor(seed, shape.elements()),
        k: normal_tensor(seed ^ 0x9e37_79b9, shape.kv_elements()),
        v: normal_tensor(seed ^ 0x7f4a_7c15, shape.kv_elements()),
    }
}

async fn gpu() -> Gpu {
    let g = Gpu::create()
        .await
        .unwrap_or_else(|e| panic!("no WebGPU in this browser: {:?}", JsValue::from(e)));
    console_log!(
        "adapter: {}, max workgroup {}, workgroup memory {} B",
        g.adapter(),
        g.max_workgroup(),
        g.workgroup_memory()
    );
    g
}

#[wasm_bindgen_test]
async fn fma_matches_the_cpu_reference_under_browser_limits() {
    let g = gpu().await;
    let ctx = g.context();
    // What the browser grants is what the plans must fit: at most 256 invocations per workgroup.
    assert!(ctx.max_workgroup() <= 256);
    let seed = fresh_seed();
    console_log!("seed {seed}");
    // (batch, heads, n, d, m, p, causal, coarse queries): awkward n, d not a multiple of 4,
    // m = 256 (one workgroup of the browser's maximum per block), m = 512 (two query tiles per
    // block); coarse queries (bidirectional only) on two shapes.
    let cases = [
        (1, 1, 1, 16, 4, 2, false, false),
        (1, 2, 7, 3, 4, 1, true, false),
        (1, 2, 97, 40, 16, 4, true, false),
        (2, 1, 1025, 64, 64, 2, false, false),
        (1, 1, 1025, 128, 32, 2, true, false),
        (1, 2, 2048, 64, 64, 2, true, false),
        (1, 1, 1100, 32, 256, 4, false, false),
        (1, 1, 1100, 128, 512, 2, true, false),
        (1, 2, 97, 40, 16, 2, false, true),
        (1, 1, 1100, 64, 256, 4, false, true),
    ];
    for (i, &(b, h, n, d, m, p, causal, coarse)) in cases.iter().enumerate() {
        let shape = Shape::new(b, h, n, d);
        let queries = if coarse {
            multipole_attn::Queries::Coarse
        } else {
            multipole_attn::Queries::Fine
        };
        let method = Method::Fma(FmaConfig::new(m, p).queries(queries));
        let problem = Problem::new(shape).causal(causal);
        let label =
            format!("seed {seed} case {i}: {shape} m={m} p={p} causal={causal} {queries:?}");
        let x = qkv(seed + i as u64, shape);
        let fma = Attention::new(ctx, method.clone()).unwrap();
        let plan = fma.plan(&problem).unwrap();
        let wg = plan.fma().map(|p| p.attention.spec.wg);
        assert!(
            wg.is_some_and(|wg| wg <= ctx.max_workgroup()),
            "{label}: {plan:?}"
        );
        let bufs = Poisoned::new(ctx, &x.q, &x.k, &x.v, shape);
        fma.forward_async(&problem, Resident(bufs.tensors()))
            .await
            .unwrap_or_else(|e| panic!("{label}: {e}"));
        let o = read_back(ctx, &bufs.out).await;
        let lse = read_back(ctx, &bufs.lse).await;
        let r = cpu::forward(&method, &problem, &widen(&x.q), &widen(&x.k), &widen(&x.v)).unwrap();
        let co = closeness(&o[..shape.elements()], &r.o, O_ATOL, O_RTOL);
        let cl = closeness(&lse[..shape.rows()], &r.lse, LSE_ATOL, LSE_RTOL);
        let (err_o, err_l) = (co.max_abs, cl.max_abs);
        console_log!("{label}: max |O - ref| {err_o:.2e}, max |LSE - ref| {err_l:.2e}");
        assert_eq!(co.violations, 0, "{label}: O off by up to {err_o}");
        assert_eq!(cl.violations, 0, "{label}: LSE off by up to {err_l}");
    }
}

#[wasm_bindgen_test]
async fn heads_split_across_small_bindings_match_unsplit_runs_to_the_bit() {
    // The library capped at 16 KiB per binding: heads of 1025 x 16 go through the split paths
    // (FMA chunks of whole blocks, dense chunk pairs), as a head over the browser's 128 MiB
    // would; the bits must be the uncapped run's, and O within the reference's tolerance.
    let g = gpu().await;
    let ctx = g.context();
    let seed = fresh_seed();
    console_log!("seed {seed}");
    let shape = Shape::new(1, 2, 1025, 16);
    let x = qkv(seed, shape);
    let cap = 16 << 10;
    let host = Host::new(&x.q, &x.k, &x.v);
    for (cfg, causal) in [
        (FmaConfig::new(32, 2), false),
        (FmaConfig::new(32, 1), true),
        (
            FmaConfig::new(32, 2).queries(multipole_attn::Queries::Coarse),
            false,
        ),
    ] {
        let problem = Problem::new(shape).causal(causal);
        let method = Method::Fma(cfg.clone());
        let fma = |limit| {
            Attention::new(ctx, method.clone())
                .and_then(|a| a.max_binding(limit))
                .unwrap()
        };
        let split = fma(cap).forward_async(&problem, host).await.unwrap();
        let whole = fma(u64::MAX).forward_async(&problem, host).await.unwrap();
        assert!(
            split.o == whole.o && split.lse == whole.lse,
            "seed {seed} {cfg:?} causal {causal}"
        );
        let r = cpu::forward(&method, &problem, &widen(&x.q), &widen(&x.k), &widen(&x.v)).unwrap();
        let c = closeness(&split.o, &r.o, O_ATOL, O_RTOL);
        console_log!("split {cfg:?}: max |O - ref| {:.2e}", c.max_abs);
        assert_eq!(
            c.violations, 0,
            "seed {seed} {cfg:?}: O off by up to {}",
            c.max_abs
        );
    }
    for causal in [false, true] {
        let problem = Problem::new(shape).causal(causal);
        let dense = |limit| {
            Attention::dense(ctx)
                .and_then(|a| a.max_binding(limit))
                .unwrap()
        };
        let split = dense(cap).forward_async(&problem, host).await.unwrap();
        // Each key chunk of the split run ends the rows as a partial (O, LSE) that the next
        // resumes from: an uncapped run with its key chunks at the same boundaries does the
        // same float operations.
        let limits = KernelLimits::from_wgpu(&ctx.limits).capped(cap);
        let keys = DenseSplitPlan::new(shape.seq, shape.head_dim, causal, &limits)
            .unwrap()
            .chunks[0]
            .1;
        let whole = dense(u64::MAX)
            .keys_per_dispatch(keys)
            .unwrap()
            .forward_async(&problem, host)
            .await
            .unwrap();
        assert!(
            split.o == whole.o && split.lse == whole.lse,
            "seed {seed} dense {causal}"
        );
    }
}

#[wasm_bindgen_test]
async fn dense_matches_the_cpu_reference() {
    let g = gpu().await;
    let ctx = g.context();
    let seed = fresh_seed();
    for (i, &(h, n, d, causal)) in [(2, 97, 40, true), (1, 1025, 64, false), (1, 300, 128, true)]
        .iter()
        .enumerate()
    {
        let shape = Shape::new(1, h, n, d);
        let label = format!("seed {seed} dense {shape} causal={causal}");
        let x = qkv(seed + 100 + i as u64, shape);
        let dense = Attention::dense(ctx).unwrap();
        let bufs = Poisoned::new(ctx, &x.q, &x.k, &x.v, shape);
        dense
            .forward_async(
                &Problem::new(shape).causal(causal),
                Resident(bufs.tensors()),
            )
            .await
            .unwrap_or_else(|e| panic!("{label}: {e}"));
        let o = read_back(ctx, &bufs.out).await;
        let r =
            cpu::dense_attention(&widen(&x.q), &widen(&x.k), &widen(&x.v), shape, causal).unwrap();
        let c = closeness(&o[..shape.elements()], &r.o, O_ATOL, O_RTOL);
        console_log!("{label}: max |O - ref| {:.2e}", c.max_abs);
        assert_eq!(c.violations, 0, "{label}: O off by up to {}", c.max_abs);
    }
}

/// The JS-facing path (options object in, Float32Array out) gives the reference's output, also
/// on a second call that reuses the cached buffers of the shape with different inputs.
#[wasm_bindgen_test]
async fn exported_fma_and_dense_match_the_reference() {
    let g = gpu().await;
    let seed = fresh_seed() as u32;
    for o in [
        opts(1, 2, 333, 24, 16, 2, false),
        opts(1, 1, 1000, 64, 64, 2, true),
    ] {
        let shape = o.shape().unwrap();
        for round in 0..2u32 {
            let label = format!("seed {seed} round {round} {o:?}");
            let x = make_inputs(o.to_js().unwrap(), "random", seed + round).unwrap();
            let (q, k, v) = (x.q.clone(), x.k.clone(), x.v.clone());
            let got = g
                .fma(q.clone(), k.clone(), v.clone(), o.to_js().unwrap())
                .await
                .unwrap();
            let r = fma_reference(&o, None, &widen(&q), &widen(&k), &widen(&v)).unwrap();
            let c = closeness(&got, &r.o, O_ATOL, O_RTOL);
            assert_eq!(c.violations, 0, "{label}: FMA off by up to {}", c.max_abs);
            let exact = g
                .dense(q.clone(), k.clone(), v.clone(), o.to_js().unwrap())
                .await
                .unwrap();
            let d =
                cpu::dense_attention(&widen(&q), &widen(&k), &widen(&v), shape, o.causal).unwrap();
            let c = closeness(&exact, &d.o, O_ATOL, O_RTOL);
            assert_eq!(c.violations, 0, "{label}: dense off by up to {}", c.max_abs);
            // compareOutputs agrees with the f64 distance between the two references, to
            // within the GPU's own error.
            let e = compare_outputs(&got, &exact).unwrap();
            let num: f64 = r.o.iter().zip(&d.o).map(|(a, b)| (a - b).powi(2)).sum();
            let den: f64 = d.o.iter().map(|b| b * b).sum();
            let want = (num / den).sqrt();
            assert!(
                (e.rel_error - want).abs() < 1e-4,
                "{label}: {} vs {want}",
                e.rel_error
            );
            assert!(
                e.max_abs_error > 0.0 && e.rel_error > 0.0,
                "{label}: FMA equals dense?"
            );
        }
    }
}

/// `kvHeads` (grouped-query attention) through the JS-facing path: K and V from `makeInputs`
/// have kvHeads heads; FMA and dense equal the reference run on K, V with each K/V head repeated
/// for its group; a kvHeads that does not divide heads is an Error naming it.
#[wasm_bindgen_test]
async fn kv_heads_option_runs_grouped_query_attention() {
    let g = gpu().await;
    let seed = fresh_seed() as u32;
    for (kv_heads, causal) in [(1, false), (2, true)] {
        let o = Options {
            kv_heads: Some(kv_heads),
            ..opts(1, 4, 200, 16, 16, 2, causal)
        };
        let shape = o.shape().unwrap();
        let label = format!("seed {seed} {o:?}");
        let x = make_inputs(o.to_js().unwrap(), "random", seed).unwrap();
        assert_eq!(x.k.len(), shape.kv_elements(), "{label}");
        // Multi-head K, V: each K/V head repeated for its group.
        let per_head = 200 * 16;
        let repeat = |t: &[f32]| -> Vec<f64> {
            (0..4)
                .flat_map(|h| &t[(h / (4 / kv_heads)) * per_head..][..per_head])
                .map(|&v| v as f64)
                .collect()
        };
        let (k, v) = (repeat(&x.k), repeat(&x.v));
        let mha = Shape::new(1, 4, 200, 16);
        let got = g
            .fma(x.q.clone(), x.k.clone(), x.v.clone(), o.to_js().unwrap())
            .await
            .unwrap();
        let r = fma_reference(&o, Some(mha), &widen(&x.q), &k, &v).unwrap();
        let c = closeness(&got, &r.o, O_ATOL, O_RTOL);
        assert_eq!(c.violations, 0, "{label}: FMA off by up to {}", c.max_abs);
        let exact = g
            .dense(x.q.clone(), x.k.clone(), x.v.clone(), o.to_js().unwrap())
            .await
            .unwrap();
        let d = cpu::dense_attention(&widen(&x.q), &k, &v, mha, causal).unwrap();
        let c = closeness(&exact, &d.o, O_ATOL, O_RTOL);
        assert_eq!(c.violations, 0, "{label}: dense off by up to {}", c.max_abs);
    }
    let bad = js_opts(r#"{"heads": 4, "kvHeads": 3, "n": 16, "headDim": 8}"#);
    let e = make_inputs(bad, "random", 1)
        .err()
        .expect("kvHeads 3 of 4 heads");
    let m = message(e);
    assert!(
        m.contains("kv_heads") && m.contains("divisor of heads = 4"),
        "{m}"
    );
}

/// Model-shaped inputs through the JS-facing path: `nKv` (Q shorter or longer than K, V; causal
/// bottom-right aligned), dense and FMA's causal chunk, and `seqlensKv` (each packed sequence
/// with keys of its own length), against the CPU reference with the forward's tolerance.
#[wasm_bindgen_test]
async fn n_kv_and_seqlens_kv_options_run_cross_length_attention() {
    let g = gpu().await;
    let seed = fresh_seed() as u32;
    let cases = [
        Options {
            n_kv: Some(300),
            kv_heads: Some(1),
            ..opts(1, 2, 37, 16, 16, 2, true)
        },
        Options {
            n_kv: Some(20),
            ..opts(1, 1, 50, 8, 16, 2, true)
        },
        Options {
            seqlens: Some(vec![5, 0, 17]),
            seqlens_kv: Some(vec![9, 4, 17]),
            n_kv: Some(30),
            ..opts(1, 2, 22, 8, 8, 2, true)
        },
    ];
    for o in cases {
        let shape = o.shape().unwrap();
        let label = format!("seed {seed} {o:?}");
        let x = make_inputs(o.to_js().unwrap(), "random", seed).unwrap();
        assert_eq!(x.k.len(), shape.kv_elements(), "{label}");
        let (q, k, v) = (widen(&x.q), widen(&x.k), widen(&x.v));
        let (want_dense, want_fma) = match o.sequences().unwrap() {
            Some(seqs) => (
                cpu::dense_attention_varlen(&q, &k, &v, shape, &seqs, true).unwrap(),
                fma_reference(&o, None, &q, &k, &v).ok(),
            ),
            None => (
                cpu::dense_attention(&q, &k, &v, shape, true).unwrap(),
                fma_reference(&o, None, &q, &k, &v).ok(),
            ),
        };
        let exact = g
            .dense(x.q.clone(), x.k.clone(), x.v.clone(), o.to_js().unwrap())
            .await
            .unwrap();
        let c = closeness(&exact, &want_dense.o, O_ATOL, O_RTOL);
        assert_eq!(c.violations, 0, "{label}: dense off by up to {}", c.max_abs);
        let fma = g
            .fma(x.q.clone(), x.k.clone(), x.v.clone(), o.to_js().unwrap())
            .await;
        match (want_fma, fma) {
            (Some(r), Ok(got)) => {
                let c = closeness(&got, &r.o, O_ATOL, O_RTOL);
                assert_eq!(c.violations, 0, "{label}: FMA off by up to {}", c.max_abs);
            }
            // Fewer keys than queries has no FMA meaning: an Error on both paths.
            (None, Err(e)) => assert!(message(e).contains("keys"), "{label}"),
            (r, got) => panic!(
                "{label}: reference {} but the GPU {}",
                r.is_some(),
                got.is_ok()
            ),
        }
    }
}

/// `seqlens` (a packed variable-length batch) through the JS-facing path: FMA and dense equal
/// the reference run sequence by sequence; lengths that do not sum to n are an Error.
#[wasm_bindgen_test]
async fn seqlens_option_runs_each_sequence_alone() {
    let g = gpu().await;
    let seed = fresh_seed() as u32;
    let o = Options {
        seqlens: Some(vec![1, 7, 97, 150]),
        kv_heads: Some(1),
        ..opts(1, 2, 255, 16, 16, 2, false)
    };
    let shape = o.shape().unwrap();
    let seqs = o.sequences().unwrap().unwrap();
    let label = format!("seed {seed} {o:?}");
    let x = make_inputs(o.to_js().unwrap(), "random", seed).unwrap();
    let (q, k, v) = (widen(&x.q), widen(&x.k), widen(&x.v));
    let got = g
        .fma(x.q.clone(), x.k.clone(), x.v.clone(), o.to_js().unwrap())
        .await
        .unwrap();
    let r = fma_reference(&o, None, &q, &k, &v).unwrap();
    let c = closeness(&got, &r.o, O_ATOL, O_RTOL);
    assert_eq!(c.violations, 0, "{label}: FMA off by up to {}", c.max_abs);
    let exact = g
        .dense(x.q.clone(), x.k.clone(), x.v.clone(), o.to_js().unwrap())
        .await
        .unwrap();
    let d = cpu::dense_attention_varlen(&q, &k, &v, shape, &seqs, false).unwrap();
    let c = closeness(&exact, &d.o, O_ATOL, O_RTOL);
    assert_eq!(c.violations, 0, "{label}: dense off by up to {}", c.max_abs);
    let bad = js_opts(r#"{"n": 10, "headDim": 8, "seqlens": [3, 4]}"#);
    let e = g
        .fma(vec![0.5; 80], vec![0.5; 80], vec![0.5; 80], bad)
        .await
        .expect_err("lengths summing to 7 of 10");
    let m = message(e);
    assert!(m.contains("lengths sum to 7"), "{m}");
}

/// The message of a thrown JS Error.
fn message(e: wasm_bindgen::JsError) -> String {
    let v: JsValue = e.into();
    v.dyn_into::<js_sys::Error>()
        .map(|e| String::from(e.message()))
        .unwrap_or_else(|v| format!("not an Error: {v:?}"))
}

fn js_opts(json: &str) -> JsValue {
    js_sys::JSON::parse(json).unwrap()
}

#[wasm_bindgen_test]
async fn errors_are_js_exceptions_with_the_library_message() {
    let g = gpu().await;
    let o = opts(1, 2, 100, 16, 16, 2, false);
    let x = normal_tensor(1, o.shape().unwrap().elements());
    let short = x[1..].to_vec();
    let e = g
        .fma(x.clone(), x.clone(), short, o.to_js().unwrap())
        .await
        .unwrap_err();
    let msg = message(e);
    assert!(msg.starts_with("shape mismatch for V: expected"), "{msg}");

    let bad_p = js_opts(r#"{"n": 100, "headDim": 16, "m": 16, "p": 3}"#);
    let msg = message(
        g.fma(x.clone(), x.clone(), x.clone(), bad_p)
            .await
            .unwrap_err(),
    );
    assert!(msg.contains("p divides the block size m = 16"), "{msg}");

    let typo = js_opts(r#"{"n": 100, "headDim": 16, "heds": 2}"#);
    let msg = message(
        g.dense(x.clone(), x.clone(), x.clone(), typo)
            .await
            .unwrap_err(),
    );
    assert!(
        msg.starts_with("invalid options:") && msg.contains("heds"),
        "{msg}"
    );

    let coarse = js_opts(r#"{"n": 100, "headDim": 16, "queries": "coarse", "causal": true}"#);
    let msg = message(
        g.fma(x.clone(), x.clone(), x.clone(), coarse)
            .await
            .unwrap_err(),
    );
    assert!(
        msg.contains("coarse queries are bidirectional only"),
        "{msg}"
    );

    let wide = js_opts(r#"{"n": 10, "headDim": 300}"#);
    let y = normal_tensor(2, 3000);
    let msg = message(g.dense(y.clone(), y.clone(), y, wide).await.unwrap_err());
    assert!(
        msg.contains("head_dim") && msg.contains("1 ..= 256"),
        "{msg}"
    );

    let msg = message(
        make_inputs(o.to_js().unwrap(), "noise", 1)
            .map(|_| ())
            .unwrap_err(),
    );
    assert!(msg.contains("\"smooth\" or \"random\""), "{msg}");
    let msg = message(structure(o.to_js().unwrap(), 100).unwrap_err());
    assert!(msg.contains("query index"), "{msg}");

    // The device still works after every refusal.
    let y = normal_tensor(3, o.shape().unwrap().elements());
    let out = g
        .fma(y.clone(), y.clone(), y, o.to_js().unwrap())
        .await
        .unwrap();
    assert!(out.iter().all(|v| v.is_finite()));
}

/// The bands drawn for a query tile the sequence exactly once (causal: up to the query), their
/// width is w_l / p at level l (doubling per level, clipped only at n), and the key count is
/// the CPU reference's.
#[wasm_bindgen_test]
fn structure_bands_tile_the_sequence() {
    for &(n, m, p, causal) in &[
        (1, 4, 2, false),
        (97, 4, 2, true),
        (1025, 16, 4, false),
        (4096, 64, 2, false),
        (4096, 64, 2, true),
        (1000, 8, 1, true),
    ] {
        let o = opts(1, 1, n, 8, m, p, causal);
        for i in [0, n / 3, n / 2, n - 1] {
            let js = structure(o.to_js().unwrap(), i as u32).unwrap();
            let s: Structure = multipole_attn_web::structure::structure_of(&o, i).unwrap();
            // The JS object carries the same bands.
            let bands = js_sys::Reflect::get(&js, &"bands".into()).unwrap();
            assert_eq!(js_sys::Array::from(&bands).length() as usize, s.bands.len());
            let mut cover = vec![0u32; n];
            for b in &s.bands {
                assert!(b.start < b.end && b.end <= n, "{b:?}");
                if b.level > 0 {
                    let g = s.levels[b.level];
                    assert_eq!(g.window, m << (b.level - 1));
                    assert_eq!(g.sub_window, g.window / p);
                    assert!(b.end - b.start == g.sub_window || b.end == n, "{b:?} {g:?}");
                }
                cover[b.start..b.end].iter_mut().for_each(|c| *c += 1);
            }
            for (t, &c) in cover.iter().enumerate() {
                let want = u32::from(!causal || t <= i);
                assert_eq!(
                    c, want,
                    "n={n} m={m} p={p} causal={causal} query {i} key {t}"
                );
            }
            let levels = multipole_attn::levels::Levels::new(n, m, p);
            let keys = multipole_attn::cpu::gather::seen_keys(&levels, causal, i).len();
            assert_eq!(s.keys, keys);
        }
    }
}

#[wasm_bindgen_test]
fn level_mass_sums_to_one_and_matches_the_reference_lse() {
    let seed = fresh_seed() as u32;
    let o = opts(1, 2, 1500, 32, 32, 2, true);
    let x = make_inputs(o.to_js().unwrap(), "smooth", seed).unwrap();
    let (q, k, v) = (x.q.clone(), x.k.clone(), x.v.clone());
    let r = fma_reference(&o, None, &widen(&q), &widen(&k), &widen(&v)).unwrap();
    for i in [0, 700, 1499] {
        let js = multipole_attn_web::level_mass(&q, &k, &v, o.to_js().unwrap(), 1, i).unwrap();
        let mass: Vec<f64> =
            serde_wasm_bindgen::from_value(js_sys::Reflect::get(&js, &"mass".into()).unwrap())
                .unwrap();
        let lse = js_sys::Reflect::get(&js, &"lse".into())
            .unwrap()
            .as_f64()
            .unwrap();
        let levels = multipole_attn::levels::num_levels(1500, 32);
        assert_eq!(mass.len(), levels + 1);
        assert!(
            (mass.iter().sum::<f64>() - 1.0).abs() < 1e-12,
            "seed {seed} query {i}: {mass:?}"
        );
        let want = r.lse[1500 + i as usize];
        assert!(
            (lse - want).abs() < 1e-9,
            "seed {seed} query {i}: lse {lse} vs {want}"
        );
    }
}

/// The keys `Options::from_js` accepts are exactly the ones serde reads and writes.
#[wasm_bindgen_test]
fn option_field_names_round_trip() {
    let o = opts(2, 3, 10, 8, 4, 2, true);
    let js = o.to_js().unwrap();
    let keys: Vec<String> = js_sys::Object::keys(js.unchecked_ref::<js_sys::Object>())
        .iter()
        .map(|k| k.as_string().unwrap())
        .collect();
    assert_eq!(
        keys,
        ["batch", "heads", "n", "headDim", "m", "p", "causal", "queries"]
    );
    let variants = Options::from_js(js_opts(
        r#"{"n": 5, "headDim": 4, "heads": 2, "softcap": 30, "sinks": [0.5, -1], "window": [3, 0]}"#,
    ))
    .unwrap();
    assert_eq!(
        (variants.softcap, variants.sinks.as_deref(), variants.window),
        (Some(30.0), Some(&[0.5, -1.0][..]), Some([3, 0]))
    );
    assert_eq!(
        Options::from_js(variants.to_js().unwrap()).unwrap(),
        variants
    );
    assert_eq!(Options::from_js(js).unwrap(), o);
    let two_d = Options::from_js(js_opts(r#"{"n": 35, "headDim": 4, "grid": [7, 5]}"#)).unwrap();
    assert_eq!(two_d.grid, Some([7, 5]));
    assert_eq!(Options::from_js(two_d.to_js().unwrap()).unwrap(), two_d);
    let defaults = Options::from_js(js_opts(r#"{"n": 5, "headDim": 4}"#)).unwrap();
    assert_eq!(defaults, opts(1, 1, 5, 4, 64, 2, false));
    let msg = message(Options::from_js(js_opts(r#"{"n": 5.5, "headDim": 4}"#)).unwrap_err());
    assert!(msg.starts_with("invalid options:"), "{msg}");
}

/// Options of a 2D problem: `heads` heads on an h x w grid, cells r x r, rank p.
fn grid_opts(
    heads: usize,
    h: usize,
    w: usize,
    d: usize,
    r: usize,
    p: usize,
    coarse: bool,
) -> Options {
    Options {
        grid: Some([h, w]),
        queries: if coarse {
            Queries::Coarse
        } else {
            Queries::Fine
        },
        ..opts(1, heads, h * w, d, r, p, false)
    }
}

/// 2D FMA (`grid: [H, W]`, algorithm.md §9) in the browser against the f64 CPU reference on
/// awkward grids (partial cells at the bottom and right edges, non-square), fine and coarse
/// queries: the library's forward into NaN-poisoned buffers (O and LSE, the tolerance above:
/// the grid only changes which keys are gathered, at most 9 r^2 + 27 p L of them), and the
/// JS-facing `fma` and `dense` with the same options.
#[wasm_bindgen_test]
async fn grid_fma_matches_the_cpu_reference() {
    let g = gpu().await;
    let ctx = g.context();
    let seed = fresh_seed();
    console_log!("seed {seed}");
    // (heads, H, W, d, r, p, coarse): 7 x 5 with cells 2 x 2 (L = 1, clipped cells); 33 x 20
    // with cells 4 x 4 (L = 3) both query resolutions, d not a multiple of 4 once.
    let cases = [
        (2, 7, 5, 16, 2, 2, false),
        (1, 33, 20, 24, 4, 2, false),
        (2, 33, 20, 13, 4, 4, true),
        (1, 7, 5, 16, 2, 1, true),
    ];
    for (i, &(heads, h, w, d, r, p, coarse)) in cases.iter().enumerate() {
        let o = grid_opts(heads, h, w, d, r, p, coarse);
        let shape = o.shape().unwrap();
        let cfg = o.config().unwrap();
        assert_eq!(cfg.grid, Some(multipole_attn::Grid::new(h, w)));
        let label = format!("seed {seed} case {i}: {o:?}");
        let x = qkv(seed + i as u64, shape);
        let fma = Attention::fma(ctx, cfg.clone()).unwrap();
        let bufs = Poisoned::new(ctx, &x.q, &x.k, &x.v, shape);
        fma.forward_async(&Problem::new(shape), Resident(bufs.tensors()))
            .await
            .unwrap_or_else(|e| panic!("{label}: {e}"));
        let out = read_back(ctx, &bufs.out).await;
        let lse = read_back(ctx, &bufs.lse).await;
        let (q, k, v) = (widen(&x.q), widen(&x.k), widen(&x.v));
        let r = cpu::fma_forward(&q, &k, &v, shape, &cfg).unwrap();
        let co = closeness(&out[..shape.elements()], &r.o, O_ATOL, O_RTOL);
        let cl = closeness(&lse[..shape.rows()], &r.lse, LSE_ATOL, LSE_RTOL);
        console_log!(
            "{label}: max |O - ref| {:.2e}, max |LSE - ref| {:.2e}",
            co.max_abs,
            cl.max_abs
        );
        assert_eq!(co.violations, 0, "{label}: O off by up to {}", co.max_abs);
        assert_eq!(cl.violations, 0, "{label}: LSE off by up to {}", cl.max_abs);
        // The 2D reference is not the 1D one of the same tokens: the grid was used.
        let line = cpu::fma_forward(&q, &k, &v, shape, &cfg.clone().grid(None)).unwrap();
        assert!(
            closeness(&out[..shape.elements()], &line.o, O_ATOL, O_RTOL).violations > 0,
            "{label}: 2D output equals 1D"
        );
        // The JS-facing calls with the same options object.
        let got = g
            .fma(x.q.clone(), x.k.clone(), x.v.clone(), o.to_js().unwrap())
            .await
            .unwrap();
        let c = closeness(&got, &r.o, O_ATOL, O_RTOL);
        assert_eq!(
            c.violations, 0,
            "{label}: JS fma off by up to {}",
            c.max_abs
        );
        let exact = g
            .dense(x.q.clone(), x.k.clone(), x.v.clone(), o.to_js().unwrap())
            .await
            .unwrap();
        let dr = cpu::dense_attention(&q, &k, &v, shape, false).unwrap();
        let c = closeness(&exact, &dr.o, O_ATOL, O_RTOL);
        assert_eq!(
            c.violations, 0,
            "{label}: JS dense off by up to {}",
            c.max_abs
        );
    }
}

/// A bad `grid` is a thrown Error that says what is wrong: H W != n, p not dividing the cell
/// side, causal, with seqlens, a zero side, a malformed value; the 1D views refuse a grid and
/// the 2D view needs one.
#[wasm_bindgen_test]
async fn grid_option_errors_are_clear() {
    let g = gpu().await;
    let x = normal_tensor(4, 35 * 8);
    let fma_err = |json: &str| {
        let (g, x, o) = (&g, x.clone(), js_opts(json));
        async move { message(g.fma(x.clone(), x.clone(), x, o).await.unwrap_err()) }
    };
    let m = fma_err(r#"{"n": 35, "headDim": 8, "m": 2, "p": 2, "grid": [6, 5]}"#).await;
    assert!(
        m.contains("grid")
            && m.contains("H * W = the sequence length 35")
            && m.contains("6x5 = 30"),
        "{m}"
    );
    let m = fma_err(r#"{"n": 35, "headDim": 8, "m": 4, "p": 3, "grid": [7, 5]}"#).await;
    assert!(m.contains("p divides the block size m = 4"), "{m}");
    let m = fma_err(r#"{"n": 35, "headDim": 8, "m": 2, "causal": true, "grid": [7, 5]}"#).await;
    assert!(m.contains("bidirectional"), "{m}");
    let m = fma_err(r#"{"n": 35, "headDim": 8, "m": 2, "grid": [0, 5]}"#).await;
    assert!(m.contains("H >= 1 and W >= 1"), "{m}");
    let m =
        fma_err(r#"{"n": 35, "headDim": 8, "m": 2, "grid": [7, 5], "seqlens": [20, 15]}"#).await;
    assert!(m.contains("grid") && m.contains("seqlens"), "{m}");
    let m = fma_err(r#"{"n": 35, "headDim": 8, "grid": [7]}"#).await;
    assert!(m.starts_with("invalid options:"), "{m}");
    // Dense refuses the same misfit grid.
    let bad = js_opts(r#"{"n": 35, "headDim": 8, "m": 2, "grid": [5, 5]}"#);
    let m = message(
        g.dense(x.clone(), x.clone(), x.clone(), bad)
            .await
            .unwrap_err(),
    );
    assert!(m.contains("H * W = the sequence length 35"), "{m}");
    let two_d = grid_opts(1, 7, 5, 8, 2, 2, false).to_js().unwrap();
    let m = message(structure(two_d.clone(), 3).unwrap_err());
    assert!(m.contains("gridStructure"), "{m}");
    let m = message(grid_structure(two_d, 35).unwrap_err());
    assert!(m.contains("query index"), "{m}");
    let m =
        message(grid_structure(opts(1, 1, 35, 8, 2, 2, false).to_js().unwrap(), 3).unwrap_err());
    assert!(m.contains("[H, W]"), "{m}");
    // The device still works.
    let o = grid_opts(1, 7, 5, 8, 2, 2, false).to_js().unwrap();
    let out = g.fma(x.clone(), x.clone(), x, o).await.unwrap();
    assert!(out.iter().all(|v| v.is_finite()));
}

/// What `gridStructure` gives the page: the near rectangle and the far bands cover the grid
/// exactly once, each band is s_l / p rows by s_l columns of a cell of side s_l = r 2^(l-1)
/// (doubling per level, clipped only at the bottom and right edges), the near rectangle holds
/// the query, and the key count is the CPU reference geometry's.
#[wasm_bindgen_test]
fn grid_structure_covers_the_grid_once() {
    use multipole_attn::geometry::{Geometry, GridGeometry};
    for &(h, w, r, p) in &[
        (1, 1, 2, 1),
        (7, 5, 2, 2),
        (33, 20, 4, 2),
        (32, 32, 4, 4),
        (45, 70, 8, 2),
    ] {
        let o = grid_opts(1, h, w, 8, r, p, false);
        let geometry = GridGeometry::new(multipole_attn::Grid::new(h, w), r, p);
        for t in [0, h * w / 3, h * w / 2, h * w - 1] {
            let js = grid_structure(o.to_js().unwrap(), t as u32).unwrap();
            let s: GridStructure =
                multipole_attn_web::grid_structure::grid_structure_of(&o, t).unwrap();
            let far = js_sys::Reflect::get(&js, &"far".into()).unwrap();
            assert_eq!(js_sys::Array::from(&far).length() as usize, s.far.len());
            let label = format!("{h}x{w} r={r} p={p} query {t}");
            let (y, x) = (t / w, t % w);
            let n = &s.near;
            assert!(
                (n.y0..n.y1).contains(&y) && (n.x0..n.x1).contains(&x),
                "{label}"
            );
            let mut cover = vec![0u32; h * w];
            let mut paint = |rect: &multipole_attn_web::Rect| {
                for yy in rect.y0..rect.y1 {
                    for xx in rect.x0..rect.x1 {
                        cover[yy * w + xx] += 1;
                    }
                }
            };
            paint(n);
            assert_eq!(s.levels.len(), geometry.num_levels() + 1, "{label}");
            for b in &s.far {
                let side = r << (b.level - 1);
                assert_eq!(s.levels[b.level].side, side, "{label}");
                let rect = b.rect;
                assert!(rect.y1 <= h && rect.x1 <= w, "{label} {b:?}");
                assert!(
                    rect.y1 - rect.y0 == side / p || rect.y1 == h,
                    "{label} {b:?}"
                );
                assert!(rect.x1 - rect.x0 == side || rect.x1 == w, "{label} {b:?}");
                assert_eq!(rect.y0 % (side / p), 0, "{label} {b:?}");
                assert_eq!(rect.x0 % side, 0, "{label} {b:?}");
                paint(&rect);
            }
            assert!(cover.iter().all(|&c| c == 1), "{label}: {cover:?}");
            let fine: usize = geometry.fine_keys(t).iter().map(|k| k.len()).sum();
            let coarse: usize = (1..=geometry.num_levels())
                .map(|l| geometry.coarse_rows(t, l).len())
                .sum();
            assert_eq!(n.area(), fine, "{label}");
            assert_eq!(s.keys, fine + coarse, "{label}");
        }
    }
}

/// The backward (training) in the browser: fine queries (causal) and coarse queries
/// (algorithm.md §6, Learned mode, the query weights' gradients included) against the f64
/// reference under what the browser grants (no subgroups, 256 invocations, 16 KiB of workgroup
/// memory). Tolerance: tests/gpu/backward.rs's, 2e-4 of each tensor's scale (its header says
/// why; the browser's f32 exp is within the same ulp bounds).
#[wasm_bindgen_test]
async fn backward_matches_the_cpu_reference_for_fine_and_coarse_queries() {
    let g = gpu().await;
    let ctx = g.context();
    let seed = fresh_seed();
    console_log!("seed {seed}");
    let (n, d, m, p) = (97, 12, 8, 2);
    let shape = Shape::new(1, 2, n, d);
    let x = qkv(seed, shape);
    let dout = normal_tensor(seed ^ 0x2545_f491, shape.elements());
    let mut w = multipole_attn::LearnedWeights::box_init_for(d, m, p, n);
    for (l, lw) in w.levels.iter_mut().enumerate() {
        for (k, buf) in [&mut lw.wk, &mut lw.wq, &mut lw.bq].into_iter().enumerate() {
            let noise = normal_tensor(seed + 10 * l as u64 + k as u64, buf.len());
            buf.iter_mut().zip(noise).for_each(|(x, e)| *x += 0.05 * e);
        }
    }
    let learned = multipole_attn::Downsample::Learned(w);
    for (cfg, causal) in [
        (FmaConfig::new(m, p), true),
        (
            FmaConfig::new(m, p)
                .queries(multipole_attn::Queries::Coarse)
                .downsample(learned),
            false,
        ),
    ] {
        let label = format!("seed {seed} {:?} queries", cfg.queries);
        let problem = Problem::new(shape).causal(causal);
        let method = Method::Fma(cfg);
        let fma = Attention::new(ctx, method.clone()).unwrap();
        let (_, saved) = fma
            .train_async(&problem, Host::new(&x.q, &x.k, &x.v))
            .await
            .unwrap_or_else(|e| panic!("{label}: {e}"));
        let got = fma
            .backward_async(&saved, HostGrad(&dout))
            .await
            .unwrap_or_else(|e| panic!("{label}: {e}"));
        let qkv = (&widen(&x.q)[..], &widen(&x.k)[..], &widen(&x.v)[..]);
        let want = cpu::backward(&method, &problem, qkv, &widen(&dout)).unwrap();
        let mut pairs = vec![
            ("dQ", got.dq.clone(), want.dq.clone()),
            ("dK", got.dk.clone(), want.dk.clone()),
            ("dV", got.dv.clone(), want.dv.clone()),
        ];
        for (l, (a, b)) in got
            .weights
            .iter()
            .flatten()
            .zip(want.weights.iter().flatten())
            .enumerate()
        {
            pairs.push(("k_w", a.wk.clone(), b.wk.clone()));
            pairs.push(("k_b", a.bk.clone(), b.bk.clone()));
            pairs.push(("v_w", a.wv.clone(), b.wv.clone()));
            pairs.push(("v_b", a.bv.clone(), b.bv.clone()));
            pairs.push(("q_w", a.wq.clone(), b.wq.clone()));
            pairs.push(("q_b", a.bq.clone(), b.bq.clone()));
            console_log!("{label}: level {} weight gradients compared", l + 1);
        }
        for (name, a, b) in pairs {
            let scale = b.iter().fold(1.0f64, |m, x| m.max(x.abs()));
            let c = closeness(&a, &b, 2e-4 * scale, 2e-4);
            console_log!(
                "{label}: {name} max error {:.2e} of scale {scale:.2e}",
                c.max_abs
            );
            assert_eq!(c.violations, 0, "{label}: {name} {c:?}");
        }
    }
}

/// The softmax variants through the JS-facing path (`softcap`, `sinks`, `window` in the options
/// object), alone and combined (sinks + window as in gpt-oss, softcap + window as in Gemma 2),
/// causal or not, with grouped K/V heads and a packed batch: `Gpu.fma` and `Gpu.dense` against
/// the f64 reference of the same options' problem (`cpu::forward`), with the forward's
/// tolerance. Each case's reference also differs from the plain softmax's, so a variant the
/// options dropped would fail. What the library refuses is an Error naming the variant.
#[wasm_bindgen_test]
async fn softmax_variant_options_match_the_reference() {
    let g = gpu().await;
    let seed = fresh_seed() as u32;
    console_log!("seed {seed}");
    // Sinks comparable with the row sums (about n e^{1/2} for N(0, 1) logits): e^4 and more.
    let sinks: Vec<f32> = normal_tensor(u64::from(seed) ^ 0x5155, 2)
        .iter()
        .map(|s| 4.0 + s)
        .collect();
    let base = |causal| Options {
        kv_heads: Some(1),
        ..opts(1, 2, 200, 16, 16, 2, causal)
    };
    let cases = [
        Options {
            softcap: Some(1.5),
            ..base(false)
        },
        Options {
            sinks: Some(sinks.clone()),
            ..base(true)
        },
        Options {
            window: Some([12, 0]),
            ..base(true)
        },
        Options {
            window: Some([5, 9]),
            ..base(false)
        },
        Options {
            sinks: Some(sinks.clone()),
            window: Some([16, 0]),
            ..base(true)
        },
        Options {
            softcap: Some(2.0),
            window: Some([7, 3]),
            ..base(false)
        },
        Options {
            softcap: Some(1.5),
            sinks: Some(sinks.clone()),
            seqlens: Some(vec![50, 0, 150]),
            ..base(true)
        },
    ];
    for (i, o) in cases.into_iter().enumerate() {
        let label = format!("seed {seed} case {i} {o:?}");
        let x = make_inputs(o.to_js().unwrap(), "random", seed + i as u32).unwrap();
        let (q, k, v) = (widen(&x.q), widen(&x.k), widen(&x.v));
        let problem = o.problem().unwrap();
        let want_dense = cpu::forward(&Method::Dense, &problem, &q, &k, &v).unwrap();
        let want_fma = fma_reference(&o, None, &q, &k, &v).unwrap();
        let plain = Problem {
            variants: Default::default(),
            ..problem.clone()
        };
        let plain = cpu::forward(&Method::Dense, &plain, &q, &k, &v).unwrap();
        let moved = closeness(
            &want_dense.o.iter().map(|&x| x as f32).collect::<Vec<_>>(),
            &plain.o,
            1e-3,
            0.0,
        );
        assert!(moved.violations > 0, "{label}: the variant changes nothing");
        let exact = g
            .dense(x.q.clone(), x.k.clone(), x.v.clone(), o.to_js().unwrap())
            .await
            .unwrap_or_else(|e| panic!("{label}: dense: {}", message(e)));
        let c = closeness(&exact, &want_dense.o, O_ATOL, O_RTOL);
        console_log!("{label}: dense max |O - ref| {:.2e}", c.max_abs);
        assert_eq!(c.violations, 0, "{label}: dense off by up to {}", c.max_abs);
        let fma = g
            .fma(x.q.clone(), x.k.clone(), x.v.clone(), o.to_js().unwrap())
            .await
            .unwrap_or_else(|e| panic!("{label}: FMA: {}", message(e)));
        let c = closeness(&fma, &want_fma.o, O_ATOL, O_RTOL);
        console_log!("{label}: FMA max |O - ref| {:.2e}", c.max_abs);
        assert_eq!(c.violations, 0, "{label}: FMA off by up to {}", c.max_abs);
        if o.window.is_some() {
            // FMA with a window is exact windowed attention: its reference is dense's.
            let c = closeness(&fma, &want_dense.o, O_ATOL, O_RTOL);
            assert_eq!(
                c.violations, 0,
                "{label}: FMA window vs dense {}",
                c.max_abs
            );
        }
    }

    // Refusals, as JS Errors with the library's message; the device works after them.
    let x = normal_tensor(u64::from(seed), 2 * 40 * 8);
    let base = r#""heads": 2, "n": 40, "headDim": 8, "m": 8"#;
    for (extra, fma, want) in [
        (r#""softcap": 0"#, false, "invalid softcap = 0"),
        (r#""softcap": -2"#, true, "invalid softcap = -2"),
        (r#""sinks": [1]"#, true, "shape mismatch for sinks"),
        (
            r#""window": [4, 2], "causal": true"#,
            false,
            "invalid window",
        ),
        (r#""window": [20, 0]"#, true, "window"),
        (r#""softcap": 5, "queries": "coarse""#, true, "coarse"),
        (r#""window": [-1, 0]"#, false, "invalid options:"),
        (r#""sinks": 3"#, false, "invalid options:"),
    ] {
        let json = format!("{{{base}, {extra}}}");
        let (x, o) = (x.clone(), js_opts(&json));
        let r = if fma {
            g.fma(x.clone(), x.clone(), x, o).await
        } else {
            g.dense(x.clone(), x.clone(), x, o).await
        };
        let m = message(r.expect_err(&json));
        assert!(m.contains(want), "{json}: {m}");
    }
    let o = js_opts(&format!(r#"{{{base}, "window": [20, 0]}}"#));
    let out = g.dense(x.clone(), x.clone(), x.clone(), o).await.unwrap();
    assert!(out.iter().all(|v| v.is_finite()), "dense takes any window");
    // The 1D views draw the plain softmax: a variant there is an Error, not a silent omission.
    let o = js_opts(&format!(r#"{{{base}, "softcap": 5}}"#));
    let m = message(structure(o, 3).unwrap_err());
    assert!(m.contains("variants"), "{m}");
}
