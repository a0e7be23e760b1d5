//! Incremental decoding (algorithm.md §10) on the GPU: every decoded row against the f64
//! reference of the causal forward of its whole sequence (FMA, `cpu::fma_forward`; dense,
//! `cpu::dense_attention`), on awkward lengths, prefills and chunks, Average and Learned, with
//! and without the count correction, a batch whose sequences are at different positions;
//! a cache split over 16 KiB bindings equal to an unsplit one bit for bit; two runs
//! bit-identical; typed errors that leave the cache usable.
//!
//! Tolerance as `gpu_forward.rs` (5e-5 + 5e-5 |ref| on O, 5e-5 + 1e-5 |ref| on the LSE): the
//! decode sums the same keys in f32 in another order (a split softmax over 64 invocations,
//! pooled rows summed token by token), which moves results by a few ulps of the O(1) values,
//! far below the bound; a wrong key, level or window moves them by 1e-2 or more.

use crate::common;
use crate::common::{closeness, gpu, random_learned, read_buffer};
use multipole_attn::cpu::{self, widen};
use multipole_attn::gpu::{DecodeMode, Decoder, EncodeStep, GpuContext, Host, StepTensors};
use multipole_attn::random::{fresh_seed, normal_tensor};
use multipole_attn::{DecodeConfig, Downsample, FmaConfig, FmaError, Method, Problem, Shape};
use wgpu::util::DeviceExt;

const O_ATOL: f64 = 5e-5;
const O_RTOL: f64 = 5e-5;
const LSE_ATOL: f64 = 5e-5;
const LSE_RTOL: f64 = 1e-5;

/// One decoding run: `prefill[b]` tokens of sequence b prefilled, then `steps` steps of `chunk`
/// tokens for every sequence.
struct Run {
    m: usize,
    p: usize,
    heads: usize,
    d: usize,
    prefill: Vec<usize>,
    chunk: usize,
    steps: usize,
    learned: bool,
    count_correction: bool,
    mode: DecodeMode,
}

impl Run {
    fn len(&self, b: usize) -> usize {
        self.prefill[b] + self.steps * self.chunk
    }

    fn cfg(&self, seed: u64) -> DecodeConfig {
        let max_len = (0..self.prefill.len()).map(|b| self.len(b)).max().unwrap();
        let mut fma = FmaConfig::new(self.m, self.p).count_correction(self.count_correction);
        if self.learned {
            fma = fma.downsample(Downsample::Learned(random_learned(
                seed, self.d, self.m, self.p, max_len,
            )));
        }
        DecodeConfig::new(fma, self.prefill.len(), self.heads, self.d, max_len)
            .max_chunk(self.chunk.max(3))
    }
}

/// Q, K, V of each sequence, (heads, len_b, d).
fn sequences(seed: u64, run: &Run) -> Vec<[Vec<f32>; 3]> {
    (0..run.prefill.len())
        .map(|b| {
            let n = run.heads * run.len(b) * run.d;
            [0u64, 1, 2].map(|t| normal_tensor(seed + 7 * b as u64 + t, n))
        })
        .collect()
}

/// Rows [lo, lo + len) of every head of sequence b's tensor x, laid out (1, heads, len, d),
/// padded with zeros to `width` rows.
fn rows(x: &[f32], run: &Run, b: usize, lo: usize, len: usize, width: usize) -> Vec<f32> {
    let (n, d) = (run.len(b), run.d);
    let mut out = Vec::new();
    for h in 0..run.heads {
        let base = (h * n + lo) * d;
        out.extend_from_slice(&x[base..base + len * d]);
        out.extend(std::iter::repeat_n(0.0, (width - len) * d));
    }
    out
}

fn storage(ctx: &GpuContext, data: &[f32], extra: wgpu::BufferUsages) -> wgpu::Buffer {
    ctx.device
        .create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: Some("decode test"),
            contents: bytemuck::cast_slice(data),
            usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC | extra,
        })
}

/// Decodes `run` with `dec` and returns every sequence's O (heads, len_b, d) and LSE (heads,
/// len_b), step outputs written into NaN-poisoned buffers through `Decoder::step` with `EncodeStep`.
fn decode(
    ctx: &GpuContext,
    dec: &Decoder,
    run: &Run,
    seqs: &[[Vec<f32>; 3]],
) -> Vec<(Vec<f32>, Vec<f32>)> {
    let (bn, h, d) = (run.prefill.len(), run.heads, run.d);
    let width = *run.prefill.iter().max().unwrap();
    let prompt = |t: usize| -> Vec<f32> {
        (0..bn)
            .flat_map(|b| rows(&seqs[b][t], run, b, 0, run.prefill[b], width))
            .collect()
    };
    let mut out: Vec<(Vec<f32>, Vec<f32>)> = (0..bn)
        .map(|b| {
            (
                vec![f32::NAN; h * run.len(b) * d],
                vec![f32::NAN; h * run.len(b)],
            )
        })
        .collect();
    if width > 0 {
        let pre = dec
            .prefill(&prompt(0), &prompt(1), &prompt(2), &run.prefill, run.mode)
            .expect("prefill");
        let lse = pre.lse.unwrap();
        for (b, seq) in out.iter_mut().enumerate() {
            let (n, p) = (run.len(b), run.prefill[b]);
            for hh in 0..h {
                let src = (b * h + hh) * width;
                seq.0[hh * n * d..(hh * n + p) * d].copy_from_slice(&pre.o[src * d..(src + p) * d]);
                seq.1[hh * n..hh * n + p].copy_from_slice(&lse[src..src + p]);
            }
        }
    }
    let c = run.chunk;
    for s in 0..run.steps {
        let step = |t: usize| -> Vec<f32> {
            (0..bn)
                .flat_map(|b| rows(&seqs[b][t], run, b, run.prefill[b] + s * c, c, c))
                .collect()
        };
        let (q, k, v) = (step(0), step(1), step(2));
        let bufs = [&q, &k, &v].map(|x| storage(ctx, x, wgpu::BufferUsages::empty()));
        let o_buf = storage(ctx, &vec![f32::NAN; q.len()], wgpu::BufferUsages::empty());
        let l_buf = storage(
            ctx,
            &vec![f32::NAN; q.len() / d],
            wgpu::BufferUsages::empty(),
        );
        let mut enc = ctx.device.create_command_encoder(&Default::default());
        let t = StepTensors {
            q: &bufs[0],
            k: &bufs[1],
            v: &bufs[2],
            out: &o_buf,
            lse: &l_buf,
        };
        let io = EncodeStep {
            encoder: &mut enc,
            tensors: t,
            tokens: c,
        };
        dec.step(run.mode, io).expect("step");
        ctx.queue.submit([enc.finish()]);
        let (o, l) = (read_buffer(ctx, &o_buf), read_buffer(ctx, &l_buf));
        for (b, seq) in out.iter_mut().enumerate() {
            let (n, at) = (run.len(b), run.prefill[b] + s * c);
            for hh in 0..h {
                let src = (b * h + hh) * c;
                seq.0[(hh * n + at) * d..(hh * n + at + c) * d]
                    .copy_from_slice(&o[src * d..(src + c) * d]);
                seq.1[hh * n + at..hh * n + at + c].copy_from_slice(&l[src..src + c]);
            }
        }
    }
    out
}

/// Checks every row of `run` against the f64 causal forward of each whole sequence.
fn check(ctx: &GpuContext, run: &Run) {
    let seed = fresh_seed();
    let cfg = run.cfg(seed);
    let label = format!(
        "seed {seed} m {} p {} prefill {:?} chunk {} steps {} learned {} cc {} {:?}",
        run.m,
        run.p,
        run.prefill,
        run.chunk,
        run.steps,
        run.learned,
        run.count_correction,
        run.mode
    );
    let seqs = sequences(seed, run);
    let dec = Decoder::new(ctx, cfg.clone()).unwrap_or_else(|e| panic!("{label}: {e}"));
    let got = decode(ctx, &dec, run, &seqs);
    for (b, (o, lse)) in got.iter().enumerate() {
        let causal = Problem::new(Shape::new(1, run.heads, run.len(b), run.d)).causal(true);
        let [q, k, v] = seqs[b].clone().map(|x| widen(&x));
        let method = match run.mode {
            DecodeMode::Fma => Method::Fma(cfg.fma.clone()),
            DecodeMode::Dense => Method::Dense,
        };
        let r = cpu::forward(&method, &causal, &q, &k, &v).unwrap();
        let co = closeness(o, &r.o, O_ATOL, O_RTOL);
        let cl = closeness(lse, &r.lse, LSE_ATOL, LSE_RTOL);
        assert_eq!(co.violations, 0, "{label} sequence {b}: O {co:?}");
        assert_eq!(cl.violations, 0, "{label} sequence {b}: LSE {cl:?}");
    }
}

fn run(m: usize, p: usize, prefill: &[usize], chunk: usize, steps: usize) -> Run {
    Run {
        m,
        p,
        heads: 2,
        d: 16,
        prefill: prefill.to_vec(),
        chunk,
        steps,
        learned: false,
        count_correction: true,
        mode: DecodeMode::Fma,
    }
}

#[test]
fn decoded_rows_equal_the_causal_forward() {
    let Some(ctx) = gpu() else { return };
    for r in [
        run(4, 2, &[0], 1, 1),       // n = 1
        run(4, 2, &[1], 3, 2),       // n = 7
        run(4, 2, &[0], 1, 97),      // n = 97 token by token: every level's windows complete
        run(8, 2, &[63], 1, 2),      // prefill 63, 64
        run(8, 2, &[64, 65], 3, 11), // two sequences at different positions
        run(2, 1, &[5], 64, 2),      // windows of several levels complete inside one chunk
        run(16, 4, &[65], 64, 15),   // n = 1025
    ] {
        check(ctx, &r);
    }
}

#[test]
fn learned_and_uncorrected_decoding_equal_the_causal_forward() {
    let Some(ctx) = gpu() else { return };
    for (learned, cc, prefill, chunk, steps) in [
        (true, true, 13, 3, 20),
        (true, false, 0, 1, 40),
        (false, false, 30, 5, 8),
    ] {
        let mut r = run(4, 2, &[prefill, 1], chunk, steps);
        r.learned = learned;
        r.count_correction = cc;
        check(ctx, &r);
    }
}

#[test]
fn dense_decoding_equals_exact_causal_attention() {
    let Some(ctx) = gpu() else { return };
    for (prefill, chunk, steps) in [(&[0usize][..], 1, 5), (&[70, 3][..], 3, 40)] {
        let mut r = run(8, 2, prefill, chunk, steps);
        r.mode = DecodeMode::Dense;
        check(ctx, &r);
    }
}

#[test]
fn a_cache_over_16_kib_bindings_gives_the_bits_of_one_binding_and_runs_repeat() {
    let Some(ctx) = gpu() else { return };
    let seed = fresh_seed();
    for mode in [DecodeMode::Fma, DecodeMode::Dense] {
        let mut r = run(16, 2, &[100, 37], 4, 30);
        r.heads = 3;
        r.d = 32;
        r.mode = mode;
        let cfg = r.cfg(seed);
        let seqs = sequences(seed, &r);
        let whole = Decoder::new(ctx, cfg.clone()).unwrap();
        let split = Decoder::with_max_binding(ctx, cfg.clone(), 16 << 10).unwrap();
        assert!(
            split.layout().group < 6 && split.layout().page_tokens < 220,
            "{:?}",
            split.layout()
        );
        let a = decode(ctx, &whole, &r, &seqs);
        let b = decode(ctx, &split, &r, &seqs);
        let again = decode(ctx, &Decoder::new(ctx, cfg).unwrap(), &r, &seqs);
        let bits = |x: &Vec<(Vec<f32>, Vec<f32>)>| -> Vec<u32> {
            x.iter()
                .flat_map(|(o, l)| o.iter().chain(l).map(|f| f.to_bits()))
                .collect()
        };
        let differ = |x: &Vec<u32>, y: &Vec<u32>| x.iter().zip(y).filter(|(a, b)| a != b).count();
        let (wa, sb, ra) = (bits(&a), bits(&b), bits(&again));
        assert_eq!(wa.len(), sb.len());
        assert_eq!(differ(&wa, &ra), 0, "seed {seed} {mode:?}: two runs differ");
        match mode {
            // Every row's work is the same whatever the grouping: the same bits.
            DecodeMode::Fma => assert_eq!(differ(&wa, &sb), 0, "seed {seed}: split cache differs"),
            // Smaller pages mean shorter segments (a segment lies in one page), so another
            // summation order: equal to rounding only.
            DecodeMode::Dense => {
                let flat = |x: &Vec<(Vec<f32>, Vec<f32>)>| -> Vec<f64> {
                    x.iter()
                        .flat_map(|(o, l)| o.iter().chain(l).map(|&f| f as f64))
                        .collect()
                };
                let c = closeness(
                    &flat(&b).iter().map(|&x| x as f32).collect::<Vec<_>>(),
                    &flat(&a),
                    1e-5,
                    1e-5,
                );
                assert_eq!(c.violations, 0, "seed {seed}: split dense cache {c:?}");
            }
        }
    }
}

#[test]
fn bad_steps_are_typed_errors_and_leave_the_cache_usable() {
    let Some(ctx) = gpu() else { return };
    let (d, h) = (8, 2);
    let cfg = DecodeConfig::new(FmaConfig::new(4, 2), 2, h, d, 20)
        .max_chunk(4)
        .history(false);
    let dec = Decoder::new(ctx, cfg.clone()).unwrap();
    let x = |c: usize, s: u64| normal_tensor(s, 2 * h * c * d);
    // Reference: a twin that sees only the good calls.
    let twin = Decoder::new(ctx, cfg).unwrap();
    let good = |dec: &Decoder, s: u64| {
        dec.step(
            DecodeMode::Fma,
            Host::new(&x(2, s), &x(2, s + 1), &x(2, s + 2)),
        )
        .unwrap()
        .o
    };
    assert_eq!(good(&dec, 1), good(&twin, 1));
    let errs = [
        dec.step(DecodeMode::Fma, Host::new(&x(5, 9), &x(5, 9), &x(5, 9)))
            .unwrap_err(), // over max_chunk
        dec.step(DecodeMode::Fma, Host::new(&x(2, 9), &x(2, 9), &x(1, 9)))
            .unwrap_err(), // V too short
        dec.step(DecodeMode::Dense, Host::new(&x(2, 9), &x(2, 9), &x(2, 9)))
            .unwrap_err(), // no history
        dec.step(DecodeMode::Fma, Host::new(&[], &[], &[]))
            .unwrap_err(), // C = 0
        dec.prefill(&x(1, 9), &x(1, 9), &x(1, 9), &[1, 1], DecodeMode::Fma)
            .unwrap_err(), // not empty
        dec.reset(2).unwrap_err(),
    ];
    for e in &errs {
        assert!(
            matches!(
                e,
                FmaError::InvalidConfig { .. } | FmaError::ShapeMismatch { .. }
            ),
            "{e}"
        );
    }
    assert_eq!(good(&dec, 3), good(&twin, 3), "an error changed the cache");
    // 4 tokens held; 8 steps of 2 reach max_len = 20, one more passes it.
    for s in 0..8 {
        good(&dec, 10 + s);
        good(&twin, 10 + s);
    }
    let over = dec
        .step(DecodeMode::Fma, Host::new(&x(2, 5), &x(2, 5), &x(2, 5)))
        .unwrap_err();
    assert!(matches!(over, FmaError::LimitExceeded { .. }), "{over}");
    // Resetting sequence 0 leaves sequence 1 where it was.
    dec.reset(0).unwrap();
    assert_eq!(dec.lens().unwrap(), vec![0, 20]);
}

#[test]
fn a_lost_device_is_a_typed_error_for_the_decoder() {
    if gpu().is_none() {
        return;
    }
    // A device of its own (destroying the shared one would break the other tests).
    let ctx = common::gpu_with_binding_limit(128 << 20);
    let cfg = DecodeConfig::new(FmaConfig::new(4, 2), 1, 2, 8, 50);
    let dec = Decoder::new(&ctx, cfg.clone()).unwrap();
    let x = normal_tensor(fresh_seed(), 2 * 8);
    dec.step(DecodeMode::Fma, Host::new(&x, &x, &x)).unwrap();
    ctx.device.destroy();
    let lost = |e: FmaError| assert!(matches!(e, FmaError::DeviceLost(_)), "{e}");
    lost(
        dec.step(DecodeMode::Fma, Host::new(&x, &x, &x))
            .unwrap_err(),
    );
    lost(dec.prefill(&x, &x, &x, &[1], DecodeMode::Fma).unwrap_err());
    lost(Decoder::new(&ctx, cfg).err().unwrap());
}

/// Grouped-query heads (`DecodeConfig::kv_heads`): the cache holds the K/V heads only, and
/// each query head reads its group's. Decoding Q (2, 6, n, d) against K, V of 2 heads gives, bit
/// for bit, what decoding against those K, V repeated for every query head gives (each query
/// row does the same arithmetic on the same keys), FMA and dense, over 4 KiB bindings (cache
/// rows in groups that split a sequence's heads, partials of several query rows per cache
/// row); and the dense rows equal exact causal attention with grouped heads.
#[test]
fn grouped_query_heads_decode_as_their_repeated_k_v_heads() {
    let Some(ctx) = gpu() else { return };
    let (b, h, hk, n, d, chunk) = (2, 6, 2, 45, 8, 4);
    let seed = fresh_seed();
    let q = normal_tensor(seed, b * h * n * d);
    let k = normal_tensor(seed + 1, b * hk * n * d);
    let v = normal_tensor(seed + 2, b * hk * n * d);
    // K, V with every K/V head repeated for its query heads: (b, h, n, d).
    let repeat = |x: &[f32]| -> Vec<f32> {
        (0..b * h)
            .flat_map(|bh| {
                let kv = bh / (h / hk);
                x[kv * n * d..(kv + 1) * n * d].to_vec()
            })
            .collect()
    };
    let (k_rep, v_rep) = (repeat(&k), repeat(&v));
    // Tokens [lo, lo + len) of each of `heads` rows of x, as (b, heads, len, d).
    let part = |x: &[f32], heads: usize, lo: usize, len: usize| -> Vec<f32> {
        (0..heads)
            .flat_map(|r| x[(r * n + lo) * d..(r * n + lo + len) * d].to_vec())
            .collect()
    };
    for mode in [DecodeMode::Fma, DecodeMode::Dense] {
        let label = format!("seed {seed} {mode:?}");
        let decode_all = |kv_heads: usize, k: &[f32], v: &[f32]| -> (Vec<f32>, Vec<f32>) {
            let cfg = DecodeConfig::new(FmaConfig::new(4, 2), b, h, d, n)
                .kv_heads(kv_heads)
                .max_chunk(chunk);
            let dec = Decoder::with_max_binding(ctx, cfg, 4 << 10).expect("decoder");
            let (mut o, mut lse) = (Vec::new(), Vec::new());
            let prefill = 9;
            let pre = dec
                .prefill(
                    &part(&q, b * h, 0, prefill),
                    &part(k, b * kv_heads, 0, prefill),
                    &part(v, b * kv_heads, 0, prefill),
                    &[prefill; 2],
                    mode,
                )
                .unwrap_or_else(|e| panic!("{label}: prefill: {e}"));
            o.push(pre.o);
            lse.push(pre.lse.unwrap());
            let mut at = prefill;
            while at < n {
                let c = chunk.min(n - at);
                let out = dec
                    .step(
                        mode,
                        Host::new(
                            &part(&q, b * h, at, c),
                            &part(k, b * kv_heads, at, c),
                            &part(v, b * kv_heads, at, c),
                        ),
                    )
                    .unwrap_or_else(|e| panic!("{label}: step at {at}: {e}"));
                o.push(out.o);
                lse.push(out.lse.unwrap());
                at += c;
            }
            (o.concat(), lse.concat())
        };
        let grouped = decode_all(hk, &k, &v);
        let repeated = decode_all(h, &k_rep, &v_rep);
        assert!(grouped.0.iter().all(|x| x.is_finite()), "{label}: O");
        assert_eq!(grouped, repeated, "{label}: grouped vs repeated K/V heads");
        if mode == DecodeMode::Dense {
            // Step by step, the rows come in (step, b, h, token) order; compare them with the
            // grouped exact attention per step.
            let shape = Shape::new(b, h, n, d).with_kv_heads(hk);
            let r = cpu::dense_attention(&widen(&q), &widen(&k), &widen(&v), shape, true).unwrap();
            let mut at = 0;
            let (mut got_o, mut got_l) = (vec![0f32; b * h * n * d], vec![0f32; b * h * n]);
            let mut steps = vec![9];
            let mut t = 9;
            while t < n {
                steps.push(chunk.min(n - t));
                t += chunk;
            }
            let (mut oo, mut ol) = (0, 0);
            for len in steps {
                for bh in 0..b * h {
                    got_o[(bh * n + at) * d..(bh * n + at + len) * d]
                        .copy_from_slice(&grouped.0[oo..oo + len * d]);
                    got_l[bh * n + at..bh * n + at + len].copy_from_slice(&grouped.1[ol..ol + len]);
                    oo += len * d;
                    ol += len;
                }
                at += len;
            }
            let co = closeness(&got_o, &r.o, O_ATOL, O_RTOL);
            let cl = closeness(&got_l, &r.lse, LSE_ATOL, LSE_RTOL);
            assert_eq!(co.violations, 0, "{label}: O {co:?}");
            assert_eq!(cl.violations, 0, "{label}: LSE {cl:?}");
        }
    }
}
