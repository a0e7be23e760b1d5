//! The decoder with f16 storage (issue 29, `DecodeConfig::storage`) on a device with
//! SHADER_F16 (lavapipe has it): its ring, history pages and step tensors f16, the coarse slots,
//! partials, LSE and sums f32. FMA and dense modes, grouped-query heads, sequences at different
//! positions, several steps into NaN-poisoned f16 buffers and a host step; the variants
//! (softcap, sinks, a window); the cache's bytes; the typed errors.
//!
//! Two checks per run. (1) Bit for bit: on inputs already rounded to f16, the f16 decoder loads
//! exactly the f32 decoder's values (an f16 converts to f32 exactly, and the ring and pages hold
//! the tokens as they came) and runs the same arithmetic, so its O must be the f32 decoder's O
//! rounded to f16 and its LSE the same f32 bits; anything else (a byte offset of 4-byte
//! elements, a missed conversion) breaks it. (2) Against the f64 reference of the causal
//! forward of each whole sequence on the rounded inputs, with the forward's f16 bound
//! (tests/gpu/f16.rs): |O - ref| <= 5e-5 + (5e-5 + 2^-11) |ref| (the f32 path's error, then one
//! rounding to f16 when O is stored), the LSE 5e-5 + 1e-5 |ref| (f32, as the f32 decoder).

use crate::common::{browser_like_gpu, gpu, read_buffer};
use multipole_attn::closeness::closeness;
use multipole_attn::cpu::{self, widen};
use multipole_attn::gpu::{DecodeMode, Decoder, EncodeStep, GpuContext, Host, StepTensors};
use multipole_attn::random::{fresh_seed, normal_tensor};
use multipole_attn::storage::{from_f16_bits, round_to_f16, to_f16_bits, F16_UNIT_ROUNDOFF};
use multipole_attn::{
    DecodeConfig, FmaConfig, FmaError, Method, Problem, Shape, Storage, Variants, Window,
};
use wgpu::util::DeviceExt;

const O_ATOL: f64 = 5e-5;
const O_RTOL: f64 = 5e-5 + F16_UNIT_ROUNDOFF as f64;
const LSE_ATOL: f64 = 5e-5;
const LSE_RTOL: f64 = 1e-5;

const B: usize = 2;
const H: usize = 4;
const HK: usize = 2;
const D: usize = 16;
const PREFILL: [usize; B] = [5, 9];
const CHUNK: usize = 3;
const STEPS: usize = 4;
/// Tokens of sequence b after the prefill, the encoded steps and one host step of one token.
fn len(b: usize) -> usize {
    PREFILL[b] + STEPS * CHUNK + 1
}
const MAX_LEN: usize = 9 + STEPS * CHUNK + 1;

/// Q (H, len_b, D), K, V (HK, len_b, D) of each sequence, N(0, 1) rounded to f16.
fn sequences(seed: u64) -> Vec<[Vec<f32>; 3]> {
    (0..B)
        .map(|b| {
            let s = seed + 7 * b as u64;
            [
                round_to_f16(&normal_tensor(s, H * len(b) * D)),
                round_to_f16(&normal_tensor(s + 1, HK * len(b) * D)),
                round_to_f16(&normal_tensor(s + 2, HK * len(b) * D)),
            ]
        })
        .collect()
}

/// Tokens [lo, lo + n) of every head of x (heads, len_b, D), padded with zeros to `width`.
fn rows(x: &[f32], b: usize, heads: usize, lo: usize, n: usize, width: usize) -> Vec<f32> {
    let mut out = Vec::new();
    for h in 0..heads {
        let base = (h * len(b) + lo) * D;
        out.extend_from_slice(&x[base..base + n * D]);
        out.extend(std::iter::repeat_n(0.0, (width - n) * D));
    }
    out
}

/// A storage buffer of `x` in `storage`'s elements (f16: whole words, NaN stays NaN).
fn buffer(ctx: &GpuContext, storage: Storage, x: &[f32]) -> wgpu::Buffer {
    let bytes: Vec<u8> = match storage {
        Storage::F32 => bytemuck::cast_slice(x).to_vec(),
        Storage::F16 => {
            let mut bits = to_f16_bits("test", x).unwrap();
            bits.resize(bits.len().next_multiple_of(2), 0);
            bytemuck::cast_slice(&bits).to_vec()
        }
    };
    ctx.device
        .create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: Some("f16 decode test"),
            contents: &bytes,
            usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC,
        })
}

/// The first `n` values of `buf` as f32 (f16 widened).
fn read(ctx: &GpuContext, storage: Storage, buf: &wgpu::Buffer, n: usize) -> Vec<f32> {
    let words = read_buffer(ctx, buf);
    match storage {
        Storage::F32 => words[..n].to_vec(),
        Storage::F16 => from_f16_bits(&bytemuck::cast_slice::<f32, u16>(&words)[..n]),
    }
}

/// Decodes every sequence with `dec` (prefill, STEPS encoded steps into NaN-poisoned buffers of
/// `dec`'s storage, one host step): O (H, len_b, D) and LSE (H, len_b) per sequence.
fn decode(
    ctx: &GpuContext,
    dec: &Decoder,
    mode: DecodeMode,
    seqs: &[[Vec<f32>; 3]],
) -> Vec<(Vec<f32>, Vec<f32>)> {
    let storage = dec.config().storage;
    let heads = [H, HK, HK];
    let width = *PREFILL.iter().max().unwrap();
    let mut out: Vec<(Vec<f32>, Vec<f32>)> = (0..B)
        .map(|b| (vec![f32::NAN; H * len(b) * D], vec![f32::NAN; H * len(b)]))
        .collect();
    // Rows (B, H, c) of a step starting at `at[b]` written into `out`.
    let mut put = |o: &[f32], lse: &[f32], at: &[usize], c: usize| {
        for (b, seq) in out.iter_mut().enumerate() {
            let n = len(b);
            for h in 0..H {
                let src = (b * H + h) * c;
                let dst = h * n + at[b];
                let take = c.min(n - at[b]);
                seq.0[dst * D..(dst + take) * D].copy_from_slice(&o[src * D..(src + take) * D]);
                seq.1[dst..dst + take].copy_from_slice(&lse[src..src + take]);
            }
        }
    };
    let prompt = |t: usize| -> Vec<f32> {
        (0..B)
            .flat_map(|b| rows(&seqs[b][t], b, heads[t], 0, PREFILL[b], width))
            .collect()
    };
    let pre = dec
        .prefill(&prompt(0), &prompt(1), &prompt(2), &PREFILL, mode)
        .expect("prefill");
    put(&pre.o, &pre.lse.unwrap(), &[0; B], width);
    for s in 0..STEPS {
        let at: Vec<usize> = (0..B).map(|b| PREFILL[b] + s * CHUNK).collect();
        let step = |t: usize| -> Vec<f32> {
            (0..B)
                .flat_map(|b| rows(&seqs[b][t], b, heads[t], at[b], CHUNK, CHUNK))
                .collect()
        };
        let (q, k, v) = (step(0), step(1), step(2));
        let bufs = [&q, &k, &v].map(|x| buffer(ctx, storage, x));
        let o_buf = buffer(ctx, storage, &vec![f32::NAN; q.len()]);
        let l_buf = buffer(ctx, Storage::F32, &vec![f32::NAN; q.len() / D]);
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
            tokens: CHUNK,
        };
        dec.step(mode, io).expect("step");
        ctx.queue.submit([enc.finish()]);
        let o = read(ctx, storage, &o_buf, q.len());
        let lse = read(ctx, Storage::F32, &l_buf, q.len() / D);
        put(&o, &lse, &at, CHUNK);
    }
    let at: Vec<usize> = (0..B).map(|b| len(b) - 1).collect();
    let last = |t: usize| -> Vec<f32> {
        (0..B)
            .flat_map(|b| rows(&seqs[b][t], b, heads[t], at[b], 1, 1))
            .collect()
    };
    let host = dec
        .step(mode, Host::new(&last(0), &last(1), &last(2)))
        .expect("host step");
    put(&host.o, &host.lse.unwrap(), &at, 1);
    out
}

fn cfg(storage: Storage, variants: Variants) -> DecodeConfig {
    DecodeConfig::new(FmaConfig::new(4, 2), B, H, D, MAX_LEN)
        .kv_heads(HK)
        .max_chunk(CHUNK)
        .variants(variants)
        .storage(storage)
}

/// Each K/V head of x (HK, n, D) repeated for its query heads: (H, n, D).
fn repeat(x: &[f32], n: usize) -> Vec<f32> {
    (0..H)
        .flat_map(|h| {
            let kv = h / (H / HK);
            x[kv * n * D..(kv + 1) * n * D].to_vec()
        })
        .collect()
}

/// The f16 decoder against the f32 one (bit for bit after rounding) and, when `reference`,
/// against the f64 causal forward. Returns the largest |O - ref| (0 without reference).
fn check(ctx: &GpuContext, mode: DecodeMode, variants: Variants, reference: bool) -> f64 {
    let seed = fresh_seed();
    let label = format!("seed {seed} {mode:?} {variants:?}");
    let seqs = sequences(seed);
    let half = Decoder::new(ctx, cfg(Storage::F16, variants.clone()))
        .unwrap_or_else(|e| panic!("{label}: {e}"));
    let single = Decoder::new(ctx, cfg(Storage::F32, variants.clone()))
        .unwrap_or_else(|e| panic!("{label}: {e}"));
    let got = decode(ctx, &half, mode, &seqs);
    let want = decode(ctx, &single, mode, &seqs);
    let mut worst = 0.0f64;
    for b in 0..B {
        let (o, lse) = &got[b];
        assert!(o.iter().all(|x| x.is_finite()), "{label} sequence {b}: O");
        let rounded = round_to_f16(&want[b].0);
        let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        assert_eq!(
            bits(o),
            bits(&rounded),
            "{label} sequence {b}: O vs f32 rounded"
        );
        assert_eq!(
            bits(lse),
            bits(&want[b].1),
            "{label} sequence {b}: LSE vs f32"
        );
        if !reference {
            continue;
        }
        let n = len(b);
        let causal = Problem::new(Shape::new(1, H, n, D)).causal(true);
        let [q, k, v] = &seqs[b];
        let method = match mode {
            DecodeMode::Fma => Method::Fma(half.config().fma.clone()),
            DecodeMode::Dense => Method::Dense,
        };
        let r = cpu::forward(
            &method,
            &causal,
            &widen(q),
            &widen(&repeat(k, n)),
            &widen(&repeat(v, n)),
        )
        .unwrap();
        let co = closeness(o, &r.o, O_ATOL, O_RTOL);
        let cl = closeness(lse, &r.lse, LSE_ATOL, LSE_RTOL);
        assert_eq!(co.violations, 0, "{label} sequence {b}: O {co:?}");
        assert_eq!(cl.violations, 0, "{label} sequence {b}: LSE {cl:?}");
        for (x, y) in o.iter().zip(&r.o) {
            worst = worst.max((*x as f64 - y).abs());
        }
    }
    worst
}

fn f16_gpu() -> Option<&'static GpuContext> {
    gpu().filter(|ctx| ctx.device.features().contains(wgpu::Features::SHADER_F16))
}

#[test]
fn f16_decoding_matches_the_f32_decoder_and_the_reference() {
    let Some(ctx) = f16_gpu() else { return };
    for mode in [DecodeMode::Fma, DecodeMode::Dense] {
        let worst = check(ctx, mode, Variants::default(), true);
        eprintln!("f16 decode {mode:?}: max |O - ref| {worst:.3e}");
    }
    // The variants: softcap and sinks (both modes), a window (the ring only).
    let sinks = Variants {
        softcap: Some(5.0),
        sinks: Some(vec![0.5, -1.0, 0.0, 1.5]),
        window: None,
    };
    let window = Variants {
        softcap: Some(5.0),
        window: Some(Window { left: 4, right: 0 }),
        ..Variants::default()
    };
    for mode in [DecodeMode::Fma, DecodeMode::Dense] {
        check(ctx, mode, sinks.clone(), false);
        check(ctx, mode, window.clone(), false);
    }
}

#[test]
fn f16_decoding_halves_the_cache() {
    let Some(ctx) = f16_gpu() else { return };
    let seqs = sequences(fresh_seed());
    // The history pages and the ring: exactly half of f32's.
    let dec = |s| Decoder::new(ctx, cfg(s, Variants::default())).unwrap();
    let (half, single) = (dec(Storage::F16), dec(Storage::F32));
    decode(ctx, &half, DecodeMode::Dense, &seqs);
    decode(ctx, &single, DecodeMode::Dense, &seqs);
    let (h, s) = (half.bytes().unwrap(), single.bytes().unwrap());
    assert!(
        s.1 > 0 && 2 * h.1 == s.1,
        "history f16 {} vs f32 {}",
        h.1,
        s.1
    );
    // The ring: half, but for the padding of each row to 256 bytes.
    let (lh, ls) = (half.layout(), single.layout());
    assert!(lh.ring_bytes() <= ls.ring_bytes() / 2 + 256 && lh.ring_bytes() % 256 == 0);
    assert!(lh.ring_stride >= 2 * lh.ring * D && lh.ring_stride < 2 * lh.ring * D + 128);
    eprintln!(
        "f16 decode bytes: history {} vs {}, allocated {} vs {}",
        h.1,
        s.1,
        half.allocated_bytes().unwrap(),
        single.allocated_bytes().unwrap()
    );
    // A windowed decoder's memory is its ring and the step tensors: about half (the lengths,
    // the LSE and the one-row coarse placeholder stay f32).
    let window = Variants {
        window: Some(Window {
            left: 200,
            right: 0,
        }),
        ..Variants::default()
    };
    let big = |s| {
        DecodeConfig::new(FmaConfig::new(256, 2), B, H, 64, 4096)
            .kv_heads(HK)
            .max_chunk(8)
            .variants(window.clone())
            .storage(s)
    };
    let mut bytes = Vec::new();
    for s in [Storage::F16, Storage::F32] {
        let dec = Decoder::new(ctx, big(s)).unwrap();
        let q = normal_tensor(1, B * H * 8 * 64);
        let kv = normal_tensor(2, B * HK * 8 * 64);
        dec.step(DecodeMode::Fma, Host::new(&q, &kv, &kv)).unwrap();
        bytes.push(dec.allocated_bytes().unwrap());
    }
    eprintln!(
        "windowed decoder allocated: f16 {} f32 {}",
        bytes[0], bytes[1]
    );
    assert!(
        bytes[0] * 100 <= bytes[1] * 55 && bytes[0] * 2 >= bytes[1] * 9 / 10,
        "f16 {} vs f32 {}",
        bytes[0],
        bytes[1]
    );
}

#[test]
fn f16_decoding_errors_are_typed() {
    let Some(_) = gpu() else { return };
    if let Some(web) = browser_like_gpu() {
        let err = Decoder::new(web, cfg(Storage::F16, Variants::default())).err();
        assert!(
            matches!(
                err,
                Some(FmaError::MissingFeature {
                    feature: "SHADER_F16",
                    ..
                })
            ),
            "{err:?}"
        );
    }
    let Some(ctx) = f16_gpu() else { return };
    // Odd rows of f16 history would start mid-word for the cache's buffer copies.
    let odd = DecodeConfig::new(FmaConfig::new(4, 2), 1, 2, 15, 32).storage(Storage::F16);
    let err = Decoder::new(ctx, odd.clone()).err();
    assert!(
        matches!(err, Some(FmaError::InvalidConfig { .. })),
        "{err:?}"
    );
    // Without history the odd width decodes.
    let dec = Decoder::new(ctx, odd.history(false)).unwrap();
    let q = normal_tensor(3, 2 * 15);
    assert!(dec.step(DecodeMode::Fma, Host::new(&q, &q, &q)).is_ok());
    // A value beyond f16's range: a typed error, and the cache is not touched.
    let mut big = q.clone();
    big[4] = 1.0e6;
    let err = dec
        .step(DecodeMode::Fma, Host::new(&q, &big, &q))
        .unwrap_err();
    assert!(err.to_string().contains("65504"), "{err}");
    assert_eq!(dec.lens().unwrap(), vec![1]);
}
