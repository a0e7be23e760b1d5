//! Decoding with the softmax variants of issue 30 (softcap, sinks, sliding window;
//! docs/variants.md) on the GPU: every decoded row (prefill and steps) against the f64
//! reference of the causal forward of its whole sequence with the same variants
//! (`cpu::forward`, FMA and dense), each variant alone and combined (sinks + window as in
//! gpt-oss, softcap + window as in Gemma 2), grouped-query heads, sequences at different
//! positions, steps of several tokens whose windows wrap the ring many times, fresh seeds
//! (printed), step outputs written into NaN-poisoned buffers. Both kernel variants of the
//! prefill's forward (the default context, and `mismatched_subgroup_gpu`'s plain fallback)
//! give the reference and agree with each other. The windowed decoder's memory is flat: the
//! same bytes after a prompt of 100 and of 60 000 tokens, with rows still right. Decoding with
//! a window equals the GPU's causal forward with that window, row by row. A windowed cache
//! over 4 KiB bindings gives the bits of one binding, its prefill (heads run in runs, each
//! with its own sinks) included. Typed errors for what does not combine.
//!
//! Tolerance: tests/gpu/decode.rs's (5e-5 + 5e-5 |ref| on O, 5e-5 + 1e-5 |ref| on the LSE), for
//! its reasons (the same keys summed in f32 in another order) and those of
//! tests/gpu/variants.rs: the cap C tanh(l / C) has slope <= 1 and so does not amplify the
//! logits' f32 error, a sink is one more term of the same size, a window removes terms. A
//! missing cap, a sink counted twice or on the wrong head, or a key outside its window moves O
//! by 1e-2 or more.

use crate::common::{gpu, mismatched_subgroup_gpu, read_buffer};
use multipole_attn::closeness::closeness;
use multipole_attn::cpu::{self, widen};
use multipole_attn::gpu::{
    Attention, DecodeMode, Decoder, EncodeStep, GpuContext, Host, StepTensors,
};
use multipole_attn::random::{fresh_seed, normal_tensor};
use multipole_attn::{DecodeConfig, FmaConfig, FmaError, Method, Problem, Shape, Variants, Window};
use wgpu::util::DeviceExt;

const O_ATOL: f64 = 5e-5;
const O_RTOL: f64 = 5e-5;
const LSE_ATOL: f64 = 5e-5;
const LSE_RTOL: f64 = 1e-5;

/// One decoding run: `prefill[b]` tokens of sequence b through the prefill, then `steps` steps
/// of `chunk` tokens for every sequence.
#[derive(Clone)]
struct Run {
    m: usize,
    heads: usize,
    kv_heads: usize,
    d: usize,
    prefill: Vec<usize>,
    chunk: usize,
    steps: usize,
    mode: DecodeMode,
    variants: Variants,
}

impl Run {
    fn len(&self, b: usize) -> usize {
        self.prefill[b] + self.steps * self.chunk
    }

    fn cfg(&self) -> DecodeConfig {
        let max_len = (0..self.prefill.len()).map(|b| self.len(b)).max().unwrap();
        DecodeConfig::new(
            FmaConfig::new(self.m, 2),
            self.prefill.len(),
            self.heads,
            self.d,
            max_len,
        )
        .kv_heads(self.kv_heads)
        .max_chunk(self.chunk)
        .variants(self.variants.clone())
    }

    fn method(&self) -> Method {
        match self.mode {
            DecodeMode::Fma => Method::Fma(FmaConfig::new(self.m, 2)),
            DecodeMode::Dense => Method::Dense,
        }
    }

    fn label(&self, seed: u64) -> String {
        format!(
            "seed {seed} m {} heads {}/{} prefill {:?} chunk {} steps {} {:?} {:?}",
            self.m,
            self.heads,
            self.kv_heads,
            self.prefill,
            self.chunk,
            self.steps,
            self.mode,
            self.variants
        )
    }
}

/// Q (heads, len_b, d), K, V (kv_heads, len_b, d) of each sequence.
fn sequences(seed: u64, run: &Run) -> Vec<[Vec<f32>; 3]> {
    (0..run.prefill.len())
        .map(|b| {
            let n = run.len(b) * run.d;
            let s = seed + 7 * b as u64;
            [
                normal_tensor(s, run.heads * n),
                normal_tensor(s + 1, run.kv_heads * n),
                normal_tensor(s + 2, run.kv_heads * n),
            ]
        })
        .collect()
}

/// Rows [lo, lo + len) of each of the `heads` rows of a sequence's tensor x (n rows each),
/// padded with zeros to `width` rows.
fn rows(
    x: &[f32],
    n: usize,
    d: usize,
    heads: usize,
    lo: usize,
    len: usize,
    width: usize,
) -> Vec<f32> {
    let mut out = Vec::new();
    for h in 0..heads {
        out.extend_from_slice(&x[(h * n + lo) * d..(h * n + lo + len) * d]);
        out.extend(std::iter::repeat_n(0.0, (width - len) * d));
    }
    out
}

fn storage(ctx: &GpuContext, data: &[f32]) -> wgpu::Buffer {
    ctx.device
        .create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: Some("decode variants test"),
            contents: bytemuck::cast_slice(data),
            usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC,
        })
}

/// Decodes `run` on `ctx` and returns every sequence's O (heads, len_b, d) and LSE (heads,
/// len_b): the prefill's rows, then each step's written into NaN-poisoned buffers
/// (`EncodeStep`).
fn decode(ctx: &GpuContext, run: &Run, seqs: &[[Vec<f32>; 3]]) -> Vec<(Vec<f32>, Vec<f32>)> {
    decode_with(
        &Decoder::new(ctx, run.cfg()).expect("decoder"),
        ctx,
        run,
        seqs,
    )
}

/// [`decode`] with a decoder of `run.cfg()` made by the caller.
fn decode_with(
    dec: &Decoder,
    ctx: &GpuContext,
    run: &Run,
    seqs: &[[Vec<f32>; 3]],
) -> Vec<(Vec<f32>, Vec<f32>)> {
    let (bn, h, hk, d) = (run.prefill.len(), run.heads, run.kv_heads, run.d);
    let width = *run.prefill.iter().max().unwrap();
    let mut out: Vec<(Vec<f32>, Vec<f32>)> = (0..bn)
        .map(|b| {
            (
                vec![f32::NAN; h * run.len(b) * d],
                vec![f32::NAN; h * run.len(b)],
            )
        })
        .collect();
    if width > 0 {
        let prompt = |t: usize, heads: usize| -> Vec<f32> {
            (0..bn)
                .flat_map(|b| rows(&seqs[b][t], run.len(b), d, heads, 0, run.prefill[b], width))
                .collect()
        };
        let pre = dec
            .prefill(
                &prompt(0, h),
                &prompt(1, hk),
                &prompt(2, hk),
                &run.prefill,
                run.mode,
            )
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
        let step = |t: usize, heads: usize| -> Vec<f32> {
            (0..bn)
                .flat_map(|b| {
                    rows(
                        &seqs[b][t],
                        run.len(b),
                        d,
                        heads,
                        run.prefill[b] + s * c,
                        c,
                        c,
                    )
                })
                .collect()
        };
        let (q, k, v) = (step(0, h), step(1, hk), step(2, hk));
        let bufs = [&q, &k, &v].map(|x| storage(ctx, x));
        let o_buf = storage(ctx, &vec![f32::NAN; q.len()]);
        let l_buf = storage(ctx, &vec![f32::NAN; q.len() / d]);
        let mut enc = ctx.device.create_command_encoder(&Default::default());
        let io = EncodeStep {
            encoder: &mut enc,
            tensors: StepTensors {
                q: &bufs[0],
                k: &bufs[1],
                v: &bufs[2],
                out: &o_buf,
                lse: &l_buf,
            },
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

/// The causal problem of sequence b with the run's variants.
fn problem(run: &Run, b: usize) -> Problem {
    let shape = Shape::new(1, run.heads, run.len(b), run.d).with_kv_heads(run.kv_heads);
    Problem::new(shape)
        .causal(true)
        .variants(run.variants.clone())
}

/// Decodes `run` on `ctx` and checks every row against the f64 causal forward of each
/// sequence; returns the decoded rows.
fn check_on(ctx: &GpuContext, run: &Run, seed: u64) -> Vec<(Vec<f32>, Vec<f32>)> {
    let label = run.label(seed);
    let seqs = sequences(seed, run);
    let got = decode(ctx, run, &seqs);
    for (b, (o, lse)) in got.iter().enumerate() {
        let [q, k, v] = seqs[b].clone().map(|x| widen(&x));
        let r = cpu::forward(&run.method(), &problem(run, b), &q, &k, &v)
            .unwrap_or_else(|e| panic!("{label}: reference: {e}"));
        let co = closeness(o, &r.o, O_ATOL, O_RTOL);
        let cl = closeness(lse, &r.lse, LSE_ATOL, LSE_RTOL);
        assert_eq!(co.violations, 0, "{label} sequence {b}: O {co:?}");
        assert_eq!(cl.violations, 0, "{label} sequence {b}: LSE {cl:?}");
    }
    got
}

/// Every variant alone and the combinations models ship (sinks + window: gpt-oss; softcap +
/// window: Gemma 2; all three), for `heads` query heads and a window of `left` keys.
fn variant_cases(seed: u64, heads: usize, left: usize) -> Vec<Variants> {
    let sinks = Some(normal_tensor(seed ^ 0x51, heads));
    let window = Some(Window { left, right: 0 });
    let none = Variants::default();
    vec![
        Variants {
            softcap: Some(1.5),
            ..none.clone()
        },
        Variants {
            sinks: sinks.clone(),
            ..none.clone()
        },
        Variants {
            window,
            ..none.clone()
        },
        Variants {
            sinks: sinks.clone(),
            window,
            ..none.clone()
        },
        Variants {
            softcap: Some(2.0),
            window,
            ..none.clone()
        },
        Variants {
            softcap: Some(1.0),
            sinks,
            window,
        },
    ]
}

fn base(mode: DecodeMode) -> Run {
    Run {
        m: 8,
        heads: 2,
        kv_heads: 2,
        d: 16,
        // Two sequences at different positions; 13 + 20 * 3 = 73 tokens: a window of 5 keys
        // (ring of 8) wraps the ring about 9 times, and the FMA cache has 3 coarse levels.
        prefill: vec![13, 4],
        chunk: 3,
        steps: 20,
        mode,
        variants: Variants::default(),
    }
}

/// Each variant alone and combined, FMA and dense, on the default context and on the plain
/// fallback of the subgroup variant; both give the reference, and their rows agree.
#[test]
fn decoded_rows_with_variants_equal_the_causal_forward() {
    let Some(ctx) = gpu() else { return };
    let plain = mismatched_subgroup_gpu();
    let seed = fresh_seed();
    for mode in [DecodeMode::Fma, DecodeMode::Dense] {
        for variants in variant_cases(seed, 2, 5) {
            let run = Run {
                variants,
                ..base(mode)
            };
            let a = check_on(ctx, &run, seed);
            if let Some(plain) = plain {
                let b = check_on(plain, &run, seed);
                let flat = |x: &Vec<(Vec<f32>, Vec<f32>)>| -> Vec<f32> {
                    x.iter()
                        .flat_map(|(o, l)| o.iter().chain(l).copied())
                        .collect()
                };
                let wide: Vec<f64> = flat(&b).iter().map(|&x| x as f64).collect();
                let c = closeness(&flat(&a), &wide, O_ATOL, O_RTOL);
                assert_eq!(
                    c.violations,
                    0,
                    "{}: subgroup and plain kernels differ: {c:?}",
                    run.label(seed)
                );
            }
        }
    }
}

/// Grouped-query heads (6 query heads over 2 K/V heads: each sink belongs to its query head,
/// not its K/V head), one token per step and a window of one block (L = m), FMA and dense.
#[test]
fn grouped_query_heads_decode_with_variants() {
    let Some(ctx) = gpu() else { return };
    let seed = fresh_seed();
    for mode in [DecodeMode::Fma, DecodeMode::Dense] {
        for variants in variant_cases(seed, 6, 4) {
            let run = Run {
                m: 4,
                heads: 6,
                kv_heads: 2,
                d: 8,
                prefill: vec![9, 0, 17],
                chunk: 1,
                steps: 23,
                mode,
                variants,
            };
            check_on(ctx, &run, seed);
        }
    }
}

/// Decoding with a window equals the GPU's causal forward (`Attention`) of the whole sequence
/// with that window, row by row (both exact windowed attention in f32: the forward's tolerance
/// twice over, since both carry their own rounding), FMA and dense, with a softcap and sinks.
#[test]
fn windowed_decoding_equals_the_windowed_causal_forward_row_by_row() {
    let Some(ctx) = gpu() else { return };
    let seed = fresh_seed();
    for mode in [DecodeMode::Fma, DecodeMode::Dense] {
        let run = Run {
            m: 16,
            prefill: vec![21],
            chunk: 4,
            steps: 15,
            variants: Variants {
                softcap: Some(3.0),
                sinks: Some(normal_tensor(seed ^ 7, 2)),
                window: Some(Window { left: 11, right: 0 }),
            },
            ..base(mode)
        };
        let label = run.label(seed);
        let seqs = sequences(seed, &run);
        let got = decode(ctx, &run, &seqs);
        let attention = Attention::new(ctx, run.method()).expect("attention");
        let [q, k, v] = &seqs[0];
        let fwd = attention
            .forward(&problem(&run, 0), Host::new(q, k, v))
            .unwrap_or_else(|e| panic!("{label}: forward: {e}"));
        let (o, lse) = &got[0];
        let wide = |x: &[f32]| -> Vec<f64> { x.iter().map(|&y| y as f64).collect() };
        let co = closeness(o, &wide(&fwd.o), 2.0 * O_ATOL, 2.0 * O_RTOL);
        let cl = closeness(
            lse,
            &wide(&fwd.lse.unwrap()),
            2.0 * LSE_ATOL,
            2.0 * LSE_RTOL,
        );
        assert_eq!(co.violations, 0, "{label}: O {co:?}");
        assert_eq!(cl.violations, 0, "{label}: LSE {cl:?}");
    }
}

/// The sliding-window decoder's memory does not grow with the context: after a prompt of 100
/// tokens and after one of 60 000 (and steps after each), every buffer it holds adds up to the
/// same bytes; the long context's steps still equal windowed attention over their last keys.
#[test]
fn a_windowed_decoder_s_memory_stays_flat_as_the_context_grows() {
    let Some(ctx) = gpu() else { return };
    let seed = fresh_seed();
    let (b, h, d, left, chunk, steps) = (2, 2, 16, 24, 4, 3);
    let variants = Variants {
        sinks: Some(vec![0.5, -0.25]),
        window: Some(Window { left, right: 0 }),
        ..Variants::default()
    };
    let cfg = DecodeConfig::new(FmaConfig::new(32, 2), b, h, d, 1 << 20)
        .max_chunk(chunk)
        .variants(variants.clone());
    let mut bytes = Vec::new();
    for prompt in [100usize, 60_000] {
        let label = format!("seed {seed} prompt {prompt}");
        let dec = Decoder::new(ctx, cfg.clone()).expect("decoder");
        let n = prompt + steps * chunk;
        // Per (sequence, head) rows of n tokens.
        let [q, k, v] = [0u64, 1, 2].map(|t| normal_tensor(seed + t, b * h * n * d));
        let part = |x: &[f32], lo: usize, len: usize| -> Vec<f32> {
            (0..b * h)
                .flat_map(|r| x[(r * n + lo) * d..(r * n + lo + len) * d].to_vec())
                .collect()
        };
        dec.extend(&part(&k, 0, prompt), &part(&v, 0, prompt), &[prompt; 2])
            .unwrap_or_else(|e| panic!("{label}: extend: {e}"));
        let after_prompt = dec.allocated_bytes().unwrap();
        let mut got = Vec::new();
        for s in 0..steps {
            let at = prompt + s * chunk;
            let out = dec
                .step(
                    DecodeMode::Fma,
                    Host::new(
                        &part(&q, at, chunk),
                        &part(&k, at, chunk),
                        &part(&v, at, chunk),
                    ),
                )
                .unwrap_or_else(|e| panic!("{label}: step {s}: {e}"));
            got.push(out);
        }
        assert_eq!(dec.lens().unwrap(), vec![n; 2], "{label}");
        let after_steps = dec.allocated_bytes().unwrap();
        assert_eq!(
            dec.bytes().unwrap().1,
            0,
            "{label}: no history with a window"
        );
        bytes.push((after_prompt, after_steps));
        // The reference: windowed causal attention over the last left + steps * chunk tokens
        // (every key the steps' windows hold), whose last rows are the steps'.
        let tail = left + steps * chunk;
        let lo = n - tail;
        let shape = Shape::new(b, h, tail, d);
        let r = cpu::dense_attention_with(
            &widen(&part(&q, lo, tail)),
            &widen(&part(&k, lo, tail)),
            &widen(&part(&v, lo, tail)),
            shape,
            true,
            &variants,
        )
        .unwrap();
        for (s, out) in got.iter().enumerate() {
            let (mut want_o, mut want_l) = (Vec::new(), Vec::new());
            for row in 0..b * h {
                let first = row * tail + left + s * chunk;
                want_o.extend_from_slice(&r.o[first * d..(first + chunk) * d]);
                want_l.extend_from_slice(&r.lse[first..first + chunk]);
            }
            let co = closeness(&out.o, &want_o, O_ATOL, O_RTOL);
            let cl = closeness(out.lse.as_ref().unwrap(), &want_l, LSE_ATOL, LSE_RTOL);
            assert_eq!(co.violations, 0, "{label} step {s}: O {co:?}");
            assert_eq!(cl.violations, 0, "{label} step {s}: LSE {cl:?}");
        }
    }
    assert_eq!(
        bytes[0], bytes[1],
        "seed {seed}: bytes at 100 and 60 000 tokens"
    );
    // Sized by the window: the ring of L + C tokens of K and V per (sequence, head) leads.
    let ring = (2 * b * h * (left + chunk) * d * 4) as u64;
    assert!(
        bytes[0].1 >= ring && bytes[0].1 < ring + (64 << 10),
        "seed {seed}: {bytes:?} bytes for a ring of {ring}"
    );
}

/// What does not combine is a typed error, before anything is recorded: a window looking
/// right (R > 0), sinks not of shape (heads,), and in FMA mode a window wider than the block
/// (L > m: FMA's window is its near field), which the dense mode of the same decoder takes.
#[test]
fn what_does_not_combine_is_a_typed_error() {
    let Some(ctx) = gpu() else { return };
    let (h, d) = (2, 8);
    let cfg = |v: Variants| DecodeConfig::new(FmaConfig::new(4, 2), 1, h, d, 64).variants(v);
    let window = |left, right| Variants {
        window: Some(Window { left, right }),
        ..Variants::default()
    };
    let right = Decoder::new(ctx, cfg(window(3, 1))).err().expect("R > 0");
    assert!(
        matches!(right, FmaError::InvalidConfig { what: "window", .. }),
        "{right}"
    );
    let sinks = Variants {
        sinks: Some(vec![0.0; 3]),
        ..Variants::default()
    };
    let bad = Decoder::new(ctx, cfg(sinks))
        .err()
        .expect("3 sinks for 2 heads");
    assert!(matches!(bad, FmaError::ShapeMismatch { .. }), "{bad}");
    let dec = Decoder::new(ctx, cfg(window(6, 0))).expect("a window for the dense mode");
    let x = normal_tensor(fresh_seed(), h * d);
    let wide = dec
        .step(DecodeMode::Fma, Host::new(&x, &x, &x))
        .unwrap_err();
    assert!(
        matches!(wide, FmaError::InvalidConfig { what: "window", .. }),
        "{wide}"
    );
    let pre = dec.prefill(&x, &x, &x, &[1], DecodeMode::Fma).unwrap_err();
    assert!(
        matches!(pre, FmaError::InvalidConfig { what: "window", .. }),
        "{pre}"
    );
    // Nothing was appended by the refused calls; the dense mode runs the window.
    assert_eq!(dec.lens().unwrap(), vec![0]);
    dec.step(DecodeMode::Dense, Host::new(&x, &x, &x))
        .expect("dense windowed step");
    assert_eq!(dec.lens().unwrap(), vec![1]);
}

/// A windowed cache with sinks and a softcap bound in 4 KiB ranges (rows in several groups,
/// each sequence's heads split between them) gives the bits of one binding, and two runs
/// repeat: a row's work does not depend on its group. With a prefill too, FMA and dense: a
/// prompt of 30 tokens x 6 heads (11,520 bytes per tensor) runs in runs of one K/V group
/// (2 heads, 3,840 bytes) from heads 0, 2 and 4, each reading its own heads' sinks
/// (`HeadSpan`); the rows are also checked against the f64 reference.
#[test]
fn a_windowed_cache_over_4_kib_bindings_gives_the_bits_of_one_binding() {
    let Some(ctx) = gpu() else { return };
    let seed = fresh_seed();
    for (mode, prefill) in [
        (DecodeMode::Fma, vec![0, 0]),
        (DecodeMode::Fma, vec![30, 17]),
        (DecodeMode::Dense, vec![30, 17]),
    ] {
        over_4_kib(ctx, seed, mode, prefill);
    }
}

fn over_4_kib(ctx: &GpuContext, seed: u64, mode: DecodeMode, prefill: Vec<usize>) {
    let run = Run {
        heads: 6,
        kv_heads: 3,
        prefill,
        steps: 25,
        variants: Variants {
            softcap: Some(2.5),
            sinks: Some(normal_tensor(seed ^ 3, 6)),
            window: Some(Window { left: 7, right: 0 }),
        },
        ..base(mode)
    };
    let seqs = sequences(seed, &run);
    let whole = check_on(ctx, &run, seed);
    let again = decode(ctx, &run, &seqs);
    let split_dec = Decoder::with_max_binding(ctx, run.cfg(), 4 << 10).expect("decoder");
    assert!(split_dec.layout().group < 6, "{:?}", split_dec.layout());
    let split = decode_with(&split_dec, ctx, &run, &seqs);
    let bits = |x: &Vec<(Vec<f32>, Vec<f32>)>| -> Vec<u32> {
        x.iter()
            .flat_map(|(o, l)| o.iter().chain(l).map(|f| f.to_bits()))
            .collect()
    };
    let label = run.label(seed);
    assert_eq!(bits(&whole), bits(&again), "{label}: two runs differ");
    assert_eq!(
        bits(&whole),
        bits(&split),
        "{label}: the split cache differs"
    );
}
