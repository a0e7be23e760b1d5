//! Decoding in the browser (`Decoding`, the JS face of `multipole_attn::gpu::Decoder`): every
//! decoded row against the f64 causal forward of its whole sequence, FMA and dense, two
//! sequences at different positions, plain and with the softmax variants (softcap, sinks, a
//! window that the ring wraps), and the JS errors of bad options and modes.
//!
//! Run as `browser.rs` (scripts/test_web.sh). Tolerance as there and as the native
//! `tests/gpu/decode.rs`: |gpu - ref| <= 5e-5 + 5e-5 |ref| for O, 5e-5 + 1e-5 |ref| for the LSE.
#![cfg(target_arch = "wasm32")]

use multipole_attn::closeness::closeness;
use multipole_attn::cpu::{self, widen};
use multipole_attn::random::{fresh_seed, normal_tensor};
use multipole_attn::{FmaConfig, Method, Problem, Shape, Variants, Window};
use multipole_attn_web::{Decoding, Gpu};
use wasm_bindgen::JsValue;
use wasm_bindgen_test::*;

wasm_bindgen_test_configure!(run_in_browser);

fn options(js: &str) -> JsValue {
    js_sys::JSON::parse(js).expect("valid JSON")
}

/// Rows [lo, lo + len) of sequence tensor x ((heads, n, d)), padded to `width` rows.
fn rows(x: &[f32], h: usize, n: usize, d: usize, lo: usize, len: usize, width: usize) -> Vec<f32> {
    let mut out = Vec::new();
    for hh in 0..h {
        out.extend_from_slice(&x[(hh * n + lo) * d..(hh * n + lo + len) * d]);
        out.extend(std::iter::repeat_n(0.0, (width - len) * d));
    }
    out
}

#[wasm_bindgen_test]
async fn decoded_rows_equal_the_causal_forward_in_the_browser() {
    decode_and_check("", Variants::default()).await;
}

/// The variants reach the decoder from the JS options: a softcap, one sink per head and a
/// window of 3 keys back (a ring of 3 + maxChunk = 6 tokens, wrapped several times by 28
/// tokens), against the reference with the same variants. A sink on the wrong head, a
/// missing cap or a key outside the window moves O by far more than the tolerance.
#[wasm_bindgen_test]
async fn decoded_rows_with_variants_equal_the_causal_forward_in_the_browser() {
    let variants = Variants {
        softcap: Some(2.5),
        sinks: Some(vec![0.75, -0.5]),
        window: Some(Window { left: 3, right: 0 }),
    };
    let js = r#", "softcap": 2.5, "sinks": [0.75, -0.5], "window": [3, 0]"#;
    decode_and_check(js, variants).await;
}

/// Decodes two sequences (a prefill, then steps of 3 tokens) with the options' `extra` JSON
/// fields, FMA and dense, and checks every row against the reference's causal forward with
/// `variants`.
async fn decode_and_check(extra: &str, variants: Variants) {
    let gpu = Gpu::create().await.expect("WebGPU");
    let seed = fresh_seed();
    let (h, d, m, p, c, steps) = (2usize, 8usize, 4usize, 2usize, 3usize, 6usize);
    let prefill = [10usize, 3];
    for mode in ["fma", "dense"] {
        let lens: Vec<usize> = prefill.iter().map(|&x| x + c * steps).collect();
        let max_len = *lens.iter().max().unwrap();
        let dec = Decoding::new(
            &gpu,
            options(&format!(
                r#"{{"batch": 2, "heads": {h}, "headDim": {d}, "maxLen": {max_len}, "maxChunk": {c}, "m": {m}, "p": {p}{extra}}}"#
            )),
        )
        .map_err(JsValue::from)
        .expect("decoder");
        let seqs: Vec<[Vec<f32>; 3]> = (0..2)
            .map(|b| [0u64, 1, 2].map(|t| normal_tensor(seed + 10 * b as u64 + t, h * lens[b] * d)))
            .collect();
        let width = 10;
        let prompt = |t: usize| -> Vec<f32> {
            (0..2)
                .flat_map(|b| rows(&seqs[b][t], h, lens[b], d, 0, prefill[b], width))
                .collect()
        };
        let pre = dec
            .prefill(
                prompt(0),
                prompt(1),
                prompt(2),
                prefill.map(|x| x as u32).to_vec(),
                mode.into(),
            )
            .await
            .map_err(JsValue::from)
            .expect("prefill");
        let mut got: Vec<(Vec<f32>, Vec<f32>)> = lens
            .iter()
            .map(|&n| (vec![f32::NAN; h * n * d], vec![f32::NAN; h * n]))
            .collect();
        let (po, pl) = (pre.o(), pre.lse());
        for (b, g) in got.iter_mut().enumerate() {
            for hh in 0..h {
                let (n, src) = (lens[b], (b * h + hh) * width);
                let len = prefill[b];
                g.0[hh * n * d..(hh * n + len) * d].copy_from_slice(&po[src * d..(src + len) * d]);
                g.1[hh * n..hh * n + len].copy_from_slice(&pl[src..src + len]);
            }
        }
        for s in 0..steps {
            let step = |t: usize| -> Vec<f32> {
                (0..2)
                    .flat_map(|b| rows(&seqs[b][t], h, lens[b], d, prefill[b] + s * c, c, c))
                    .collect()
            };
            let out = dec
                .step(step(0), step(1), step(2), mode.into())
                .await
                .map_err(JsValue::from)
                .expect("step");
            let (o, l) = (out.o(), out.lse());
            for (b, g) in got.iter_mut().enumerate() {
                for hh in 0..h {
                    let (n, at, src) = (lens[b], prefill[b] + s * c, (b * h + hh) * c);
                    g.0[(hh * n + at) * d..(hh * n + at + c) * d]
                        .copy_from_slice(&o[src * d..(src + c) * d]);
                    g.1[hh * n + at..hh * n + at + c].copy_from_slice(&l[src..src + c]);
                }
            }
        }
        for (b, (o, l)) in got.iter().enumerate() {
            let shape = Shape::new(1, h, lens[b], d);
            let [q, k, v] = seqs[b].clone().map(|x| widen(&x));
            let method = if mode == "fma" {
                Method::Fma(FmaConfig::new(m, p))
            } else {
                Method::Dense
            };
            let problem = Problem::new(shape).causal(true).variants(variants.clone());
            let r = cpu::forward(&method, &problem, &q, &k, &v).unwrap();
            let co = closeness(o, &r.o, 5e-5, 5e-5);
            let cl = closeness(l, &r.lse, 5e-5, 1e-5);
            assert_eq!(
                co.violations, 0,
                "seed {seed} {mode} {variants:?} sequence {b}: O {co:?}"
            );
            assert_eq!(
                cl.violations, 0,
                "seed {seed} {mode} {variants:?} sequence {b}: LSE {cl:?}"
            );
        }
        assert_eq!(dec.lens().map_err(JsValue::from).unwrap(), vec![28, 21]);
    }
}

#[wasm_bindgen_test]
async fn bad_decoding_options_and_modes_throw() {
    let gpu = Gpu::create().await.expect("WebGPU");
    assert!(Decoding::new(&gpu, options(r#"{"headDim": 8, "maxLen": 10, "chunk": 3}"#)).is_err());
    assert!(Decoding::new(
        &gpu,
        options(r#"{"headDim": 8, "maxLen": 10, "m": 4, "p": 3}"#)
    )
    .is_err());
    // The variants' errors: a window looking right, sinks not one per head, a softcap <= 0,
    // and (FMA mode) a window wider than the block.
    for bad in [
        r#"{"headDim": 4, "maxLen": 10, "window": [2, 1]}"#,
        r#"{"headDim": 4, "maxLen": 10, "heads": 2, "sinks": [0.5]}"#,
        r#"{"headDim": 4, "maxLen": 10, "softcap": 0}"#,
        r#"{"headDim": 4, "maxLen": 10, "window": [2]}"#,
    ] {
        assert!(Decoding::new(&gpu, options(bad)).is_err(), "{bad}");
    }
    let wide = Decoding::new(
        &gpu,
        options(r#"{"headDim": 4, "maxLen": 10, "m": 4, "window": [6, 0]}"#),
    )
    .map_err(JsValue::from)
    .expect("a window wider than m: dense decoding takes it");
    let y = vec![0.5f32; 4];
    assert!(wide
        .step(y.clone(), y.clone(), y.clone(), "fma".into())
        .await
        .is_err());
    assert!(wide
        .step(y.clone(), y.clone(), y, "dense".into())
        .await
        .is_ok());
    let dec = Decoding::new(&gpu, options(r#"{"headDim": 4, "maxLen": 10, "m": 4}"#))
        .map_err(JsValue::from)
        .unwrap();
    let x = vec![0.5f32; 4];
    assert!(dec
        .step(x.clone(), x.clone(), x.clone(), "sparse".into())
        .await
        .is_err());
    assert!(dec
        .step(x.clone(), x.clone(), vec![0.5; 3], "fma".into())
        .await
        .is_err());
    let ok = dec
        .step(x.clone(), x.clone(), x, "fma".into())
        .await
        .map_err(JsValue::from)
        .unwrap();
    // One token attends to itself only: its value.
    assert!(
        ok.o().iter().all(|&y| (y - 0.5).abs() < 1e-6),
        "{:?}",
        ok.o()
    );
}
