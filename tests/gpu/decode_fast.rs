//! Decoding at memory speed (issue 29, docs/perf.md change 30): what a step records and
//! makes. (1) Steady-state steps make no buffer and no bind group (`Decoder::objects_made`),
//! on the host path and on `EncodeStep` with the same buffers, FMA and dense, while their
//! outputs stay equal to the f64 causal forward; other buffers do make bind groups (the
//! counter counts). Both tunings: the adapter's (lavapipe: two-pass FMA steps, a CPU's dense
//! split) and a GPU's (`DecodeTuning::GPU`: one-pass steps, its split). (2) The one-pass FMA
//! step (`decode_step`, chunks of at most m + 1 tokens) and the two-pass record
//! (`decode_ingest` + `decode_attention`: a CPU's tuning, or longer chunks) give the same
//! bits: every row's keys, their order and every pooled sum are the same whatever the chunking
//! (the pooling adds a window's tokens in token order, carried across steps), so any
//! difference is a wrong key, window or slot. (3) The dense decode split as a GPU splits it
//! (`DenseSplit`, segments down to 4 keys, over several history pages of a 4 KiB binding, the
//! dispatches covering a power of two of segments) against exact causal attention, and the
//! same split under the CPU tuning (segments bit-reversed over the workgroups, the upkeep a
//! dispatch per role) giving the same bits.
//!
//! Tolerance as tests/gpu/decode.rs (5e-5 + 5e-5 |ref| on O, 5e-5 + 1e-5 |ref| on the LSE):
//! f32 sums of the same keys in another order than the f64 reference, a few ulps of O(1)
//! values; a wrong key or segment moves them by 1e-2 or more.

use crate::common::{closeness, gpu, random_learned, read_buffer};
use multipole_attn::cpu::{self, widen};
use multipole_attn::gpu::{DecodeMode, Decoder, EncodeStep, GpuContext, Host, StepTensors};
use multipole_attn::plan::{DecodeTuning, DenseSplit};
use multipole_attn::random::{fresh_seed, normal_tensor};
use multipole_attn::{DecodeConfig, Downsample, FmaConfig, Method, Problem, Shape};
use wgpu::util::DeviceExt;

const O_ATOL: f64 = 5e-5;
const O_RTOL: f64 = 5e-5;
const LSE_ATOL: f64 = 5e-5;
const LSE_RTOL: f64 = 1e-5;

/// Q (batch, heads, n, d), K, V (batch, kv_heads, n, d) of one run.
struct Inputs {
    b: usize,
    h: usize,
    hk: usize,
    n: usize,
    d: usize,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
}

impl Inputs {
    fn new(seed: u64, b: usize, h: usize, hk: usize, n: usize, d: usize) -> Self {
        Self {
            b,
            h,
            hk,
            n,
            d,
            q: normal_tensor(seed, b * h * n * d),
            k: normal_tensor(seed + 1, b * hk * n * d),
            v: normal_tensor(seed + 2, b * hk * n * d),
        }
    }

    /// Tokens [lo, lo + len) of each of `heads` rows of x, as (b, heads, len, d).
    fn part(&self, x: &[f32], heads: usize, lo: usize, len: usize) -> Vec<f32> {
        let (n, d) = (self.n, self.d);
        (0..self.b * heads)
            .flat_map(|r| x[(r * n + lo) * d..(r * n + lo + len) * d].to_vec())
            .collect()
    }

    fn step(&self, lo: usize, len: usize) -> [Vec<f32>; 3] {
        [
            self.part(&self.q, self.h, lo, len),
            self.part(&self.k, self.hk, lo, len),
            self.part(&self.v, self.hk, lo, len),
        ]
    }

    /// Exact causal attention (`Method::Dense`) or FMA (`fma`) of the whole sequences.
    fn reference(&self, method: &Method) -> (Vec<f64>, Vec<f64>) {
        let shape = Shape::new(self.b, self.h, self.n, self.d).with_kv_heads(self.hk);
        let p = Problem::new(shape).causal(true);
        let r = cpu::forward(
            method,
            &p,
            &widen(&self.q),
            &widen(&self.k),
            &widen(&self.v),
        )
        .unwrap();
        (r.o, r.lse)
    }
}

/// Rows [lo, lo + len) of every (sequence, head) of the reference's O and LSE, in a step's
/// (b, h, len) order.
fn reference_rows(
    x: &Inputs,
    r: &(Vec<f64>, Vec<f64>),
    lo: usize,
    len: usize,
) -> (Vec<f64>, Vec<f64>) {
    let (n, d) = (x.n, x.d);
    let mut o = Vec::new();
    let mut l = Vec::new();
    for row in 0..x.b * x.h {
        o.extend_from_slice(&r.0[(row * n + lo) * d..(row * n + lo + len) * d]);
        l.extend_from_slice(&r.1[row * n + lo..row * n + lo + len]);
    }
    (o, l)
}

fn check(label: &str, o: &[f32], lse: &[f32], want: &(Vec<f64>, Vec<f64>)) {
    let co = closeness(o, &want.0, O_ATOL, O_RTOL);
    let cl = closeness(lse, &want.1, LSE_ATOL, LSE_RTOL);
    assert_eq!(co.violations, 0, "{label}: O {co:?}");
    assert_eq!(cl.violations, 0, "{label}: LSE {cl:?}");
}

fn buffer(ctx: &GpuContext, data: &[f32]) -> wgpu::Buffer {
    ctx.device
        .create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: Some("decode_fast test"),
            contents: bytemuck::cast_slice(data),
            usage: wgpu::BufferUsages::STORAGE
                | wgpu::BufferUsages::COPY_SRC
                | wgpu::BufferUsages::COPY_DST,
        })
}

/// One step of `len` tokens from `lo` through `EncodeStep` into the given buffers (Q, K, V
/// uploaded, O and the LSE poisoned with NaN first), returning O and the LSE.
fn encoded_step(
    ctx: &GpuContext,
    dec: &Decoder,
    mode: DecodeMode,
    x: &Inputs,
    lo: usize,
    len: usize,
    bufs: &[wgpu::Buffer; 5],
) -> (Vec<f32>, Vec<f32>) {
    let [q, k, v] = x.step(lo, len);
    for (buf, data) in bufs.iter().zip([&q, &k, &v]) {
        ctx.queue.write_buffer(buf, 0, bytemuck::cast_slice(data));
    }
    ctx.queue
        .write_buffer(&bufs[3], 0, bytemuck::cast_slice(&vec![f32::NAN; q.len()]));
    let rows = q.len() / x.d;
    ctx.queue
        .write_buffer(&bufs[4], 0, bytemuck::cast_slice(&vec![f32::NAN; rows]));
    let mut enc = ctx.device.create_command_encoder(&Default::default());
    let tensors = StepTensors {
        q: &bufs[0],
        k: &bufs[1],
        v: &bufs[2],
        out: &bufs[3],
        lse: &bufs[4],
    };
    let io = EncodeStep {
        encoder: &mut enc,
        tensors,
        tokens: len,
    };
    dec.step(mode, io).expect("encoded step");
    ctx.queue.submit([enc.finish()]);
    let o = read_buffer(ctx, &bufs[3]);
    let l = read_buffer(ctx, &bufs[4]);
    (o[..q.len()].to_vec(), l[..rows].to_vec())
}

fn step_buffers(ctx: &GpuContext, x: &Inputs, len: usize) -> [wgpu::Buffer; 5] {
    let (qn, kn) = (x.b * x.h * len * x.d, x.b * x.hk * len * x.d);
    [qn, kn, kn, qn, x.b * x.h * len].map(|n| buffer(ctx, &vec![0.0; n]))
}

/// After two warm-up steps (one per half of the lengths), further steps of the same shape make
/// nothing, host and encoded, FMA and dense; their rows equal the f64 causal forward. New
/// step buffers do make bind groups.
#[test]
fn steady_state_steps_make_no_buffer_and_no_bind_group() {
    let Some(ctx) = gpu() else { return };
    let seed = fresh_seed();
    // Grouped heads, an odd head width, a prompt past one dense segment (1024 keys on a CPU
    // adapter, so the dense cut stays put), windows of every level completing on the way.
    let (b, h, hk, d, prompt, steps) = (2, 4, 2, 20, 1037, 12);
    let x = Inputs::new(seed, b, h, hk, prompt + 2 * steps, d);
    let modes = [DecodeMode::Fma, DecodeMode::Dense];
    for (mode, gpu_tuning) in modes.into_iter().flat_map(|m| [(m, false), (m, true)]) {
        let label = format!("seed {seed} {mode:?} GPU tuning {gpu_tuning}");
        let fma = FmaConfig::new(8, 2);
        let cfg = DecodeConfig::new(fma, b, h, d, x.n)
            .kv_heads(hk)
            .max_chunk(4);
        // The decoder's configuration is the causal one.
        let method = match mode {
            DecodeMode::Fma => Method::Fma(cfg.fma.clone()),
            DecodeMode::Dense => Method::Dense,
        };
        let want = x.reference(&method);
        let dec = if gpu_tuning {
            Decoder::with_tuning(ctx, cfg, DecodeTuning::GPU, None).unwrap()
        } else {
            Decoder::new(ctx, cfg).unwrap()
        };
        dec.extend(
            &x.part(&x.k, hk, 0, prompt),
            &x.part(&x.v, hk, 0, prompt),
            &[prompt; 2],
        )
        .unwrap();
        let bufs = step_buffers(ctx, &x, 1);
        let mut at = prompt;
        let mut counts = Vec::new();
        for s in 0..steps {
            // Host and encoded steps alternate: each path's own objects are warm after its
            // first two steps (both halves of the lengths).
            let (o, l) = if s % 2 == 0 {
                let [q, k, v] = x.step(at, 1);
                let out = dec.step(mode, Host::new(&q, &k, &v)).expect("host step");
                (out.o, out.lse.unwrap())
            } else {
                encoded_step(ctx, &dec, mode, &x, at, 1, &bufs)
            };
            check(
                &format!("{label} step {s} at {at}"),
                &o,
                &l,
                &reference_rows(&x, &want, at, 1),
            );
            at += 1;
            counts.push(dec.objects_made().unwrap());
        }
        for (s, c) in counts.iter().enumerate().skip(4) {
            assert_eq!(
                *c, counts[3],
                "{label}: step {s} made something: {counts:?}"
            );
        }
        // Another set of step buffers: new bind groups (and nothing else).
        let other = step_buffers(ctx, &x, 1);
        let (o, l) = encoded_step(ctx, &dec, mode, &x, at, 1, &other);
        check(&label, &o, &l, &reference_rows(&x, &want, at, 1));
        let after = dec.objects_made().unwrap();
        assert!(
            after.bind_groups > counts[3].bind_groups,
            "{label}: {after:?}"
        );
        assert_eq!(after.buffers, counts[3].buffers, "{label}");
    }
}

/// Decodes every token of `x` after a prefill of `prompt` in steps of `chunk` through the
/// host path, tuned as `tuning` says, returning every row's O and LSE.
fn decode_in_chunks(
    ctx: &GpuContext,
    (cfg, tuning): (&DecodeConfig, DecodeTuning),
    x: &Inputs,
    prompt: usize,
    chunk: usize,
) -> (Vec<f32>, Vec<f32>) {
    let dec = Decoder::with_tuning(ctx, cfg.clone(), tuning, None).unwrap();
    assert_eq!(
        dec.layout().fused(chunk),
        tuning.one_pass && chunk <= dec.layout().block + 1 && !dec.layout().learned
    );
    dec.extend(
        &x.part(&x.k, x.hk, 0, prompt),
        &x.part(&x.v, x.hk, 0, prompt),
        &vec![prompt; x.b],
    )
    .unwrap();
    let (mut o, mut l) = (Vec::new(), Vec::new());
    let mut at = prompt;
    while at < x.n {
        let c = chunk.min(x.n - at);
        let [q, k, v] = x.step(at, c);
        let out = dec.step(DecodeMode::Fma, Host::new(&q, &k, &v)).unwrap();
        // Per (sequence, head) row, tokens in order: gather them by row.
        o.push((at, c, out.o));
        l.push(out.lse.unwrap());
        at += c;
    }
    // Rows (b * h, n - prompt, d) whatever the chunking.
    let (rows, d, tail) = (x.b * x.h, x.d, x.n - prompt);
    let mut oo = vec![f32::NAN; rows * tail * d];
    let mut ll = vec![f32::NAN; rows * tail];
    for ((at, c, os), ls) in o.iter().zip(&l) {
        for r in 0..rows {
            let dst = r * tail + at - prompt;
            oo[dst * d..(dst + c) * d].copy_from_slice(&os[r * c * d..(r + 1) * c * d]);
            ll[dst..dst + c].copy_from_slice(&ls[r * c..(r + 1) * c]);
        }
    }
    (oo, ll)
}

/// The one-pass step (a GPU's tuning, chunks of 1 and m + 1 tokens) and the two-pass record
/// (m + 2 and 2m + 3 tokens: windows completed and read inside one step; the upkeep in one
/// dispatch on a GPU's tuning, a dispatch per role on a CPU's) give the same bits, and equal
/// the f64 causal FMA forward; Learned pooling (always two passes) equals its forward too.
#[test]
fn one_pass_and_two_pass_steps_give_the_same_bits() {
    let Some(ctx) = gpu() else { return };
    let seed = fresh_seed();
    let (b, h, hk, d, m, prompt, n) = (2, 3, 1, 12, 4, 3, 97);
    let x = Inputs::new(seed, b, h, hk, n, d);
    let fma = FmaConfig::new(m, 2);
    let cfg = DecodeConfig::new(fma.clone(), b, h, d, n)
        .kv_heads(hk)
        .max_chunk(2 * m + 3);
    let want = x.reference(&Method::Fma(cfg.fma.clone()));
    let tail = reference_rows(&x, &want, prompt, n - prompt);
    let mut runs = Vec::new();
    let (gpu, cpu) = (DecodeTuning::GPU, DecodeTuning::CPU);
    for (chunk, tuning) in [
        (1, gpu),
        (m + 1, gpu),
        (m + 2, gpu),
        (2 * m + 3, gpu),
        (1, cpu),
        (m + 2, cpu),
        (2 * m + 3, cpu),
    ] {
        let got = decode_in_chunks(ctx, (&cfg, tuning), &x, prompt, chunk);
        let label = format!("seed {seed} chunk {chunk} {tuning:?}");
        check(&label, &got.0, &got.1, &tail);
        runs.push((label, got));
    }
    let bits = |r: &(Vec<f32>, Vec<f32>)| -> Vec<u32> {
        r.0.iter().chain(&r.1).map(|x| x.to_bits()).collect()
    };
    for (label, r) in &runs[1..] {
        assert_eq!(
            bits(r),
            bits(&runs[0].1),
            "{label} differs from one-token one-pass steps"
        );
    }
    let learned = fma.downsample(Downsample::Learned(random_learned(seed, d, m, 2, n)));
    let cfg = DecodeConfig::new(learned, b, h, d, n)
        .kv_heads(hk)
        .max_chunk(m + 1);
    let want = x.reference(&Method::Fma(cfg.fma.clone()));
    let got = decode_in_chunks(ctx, (&cfg, gpu), &x, prompt, m + 1);
    let tail = reference_rows(&x, &want, prompt, n - prompt);
    check(&format!("seed {seed} learned"), &got.0, &got.1, &tail);
    // The upkeep a dispatch per role gives the bits of one dispatch under Learned pooling too.
    let apart = decode_in_chunks(ctx, (&cfg, cpu), &x, prompt, m + 1);
    assert_eq!(
        bits(&apart),
        bits(&got),
        "seed {seed} learned: the CPU tuning differs from the GPU's"
    );
}

/// Dense decoding split as a GPU splits it, scaled down (segments of 4 keys and up, 16
/// workgroups per one-token step), over history pages of a 4 KiB binding: every row equals
/// exact causal attention while the segment length, the pages and the covered segments change
/// under it, with single tokens and chunks. The same split under the CPU tuning (its
/// workgroups taking the segments bit-reversed, `DecodeTuning::interleave_segments`, the
/// upkeep a dispatch per role) gives the same bits.
#[test]
fn dense_decoding_split_for_a_gpu_equals_exact_attention() {
    let Some(ctx) = gpu() else { return };
    let seed = fresh_seed();
    let (b, h, hk, d, prompt, n) = (2, 2, 1, 8, 5, 150);
    let x = Inputs::new(seed, b, h, hk, n, d);
    let want = x.reference(&Method::Dense);
    let split = DenseSplit {
        workgroups: 16,
        min_segment: 4,
    };
    let cfg = DecodeConfig::new(FmaConfig::new(8, 2), b, h, d, n)
        .kv_heads(hk)
        .max_chunk(5);
    let run = |tuning: DecodeTuning| {
        let dec = Decoder::with_tuning(ctx, cfg.clone(), tuning, Some(4 << 10)).unwrap();
        let l = dec.layout();
        assert!(l.page_tokens < n && l.min_segment == 4, "{l:?}");
        let pre = dec
            .prefill(
                &x.part(&x.q, h, 0, prompt),
                &x.part(&x.k, hk, 0, prompt),
                &x.part(&x.v, hk, 0, prompt),
                &[prompt; 2],
                DecodeMode::Dense,
            )
            .unwrap();
        check(
            &format!("seed {seed} {tuning:?} prefill"),
            &pre.o,
            pre.lse.as_ref().unwrap(),
            &reference_rows(&x, &want, 0, prompt),
        );
        let bufs = step_buffers(ctx, &x, 5);
        let mut outs = Vec::new();
        let mut at = prompt;
        let mut s = 0;
        while at < n {
            // 1, 5, 1, 5, ... tokens: the encoded path takes the chunk from `tokens`.
            let c = if s % 2 == 0 { 1 } else { 5 }.min(n - at);
            let (o, lse) = if s % 3 == 2 {
                let [q, k, v] = x.step(at, c);
                let out = dec.step(DecodeMode::Dense, Host::new(&q, &k, &v)).unwrap();
                (out.o, out.lse.unwrap())
            } else {
                encoded_step(ctx, &dec, DecodeMode::Dense, &x, at, c, &bufs)
            };
            check(
                &format!("seed {seed} {tuning:?} step {s} at {at} chunk {c}"),
                &o,
                &lse,
                &reference_rows(&x, &want, at, c),
            );
            outs.push((o, lse));
            at += c;
            s += 1;
        }
        outs
    };
    let in_order = run(DecodeTuning {
        dense: split,
        ..DecodeTuning::GPU
    });
    let interleaved = run(DecodeTuning {
        dense: split,
        ..DecodeTuning::CPU
    });
    let bits = |r: &[(Vec<f32>, Vec<f32>)]| -> Vec<u32> {
        r.iter()
            .flat_map(|(o, l)| o.iter().chain(l))
            .map(|x| x.to_bits())
            .collect()
    };
    assert_eq!(
        bits(&interleaved),
        bits(&in_order),
        "seed {seed}: interleaved segments differ from segments in order"
    );
}

/// f16 storage (issue 29): the one-pass step reads the step's own keys from f16 K, V (the
/// composer's f16 loads) and writes the f16 ring; it gives the two-pass record's bits (which
/// tests/gpu/f16_decode.rs checks against the f32 decoder and the reference), FMA with grouped
/// heads, over windows of several levels completing.
#[test]
fn one_pass_steps_under_f16_storage_give_the_two_pass_bits() {
    let Some(ctx) = gpu() else { return };
    if !ctx.device.features().contains(wgpu::Features::SHADER_F16) {
        return;
    }
    let seed = fresh_seed();
    let (b, h, hk, d, m, prompt, n) = (2, 4, 2, 16, 4, 7, 61);
    let x = Inputs::new(seed, b, h, hk, n, d);
    let cfg = DecodeConfig::new(FmaConfig::new(m, 2), b, h, d, n)
        .kv_heads(hk)
        .max_chunk(m + 1)
        .storage(multipole_attn::Storage::F16);
    let runs: Vec<_> = [
        (1, DecodeTuning::GPU),
        (m + 1, DecodeTuning::GPU),
        (1, DecodeTuning::CPU),
    ]
    .into_iter()
    .map(|(chunk, tuning)| decode_in_chunks(ctx, (&cfg, tuning), &x, prompt, chunk))
    .collect();
    assert!(runs[0].0.iter().all(|v| v.is_finite()), "seed {seed}");
    for r in &runs[1..] {
        assert!(
            r.0 == runs[0].0 && r.1 == runs[0].1,
            "seed {seed}: f16 paths differ"
        );
    }
}
