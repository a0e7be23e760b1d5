//! `Decoding`: incremental causal decoding on the browser's GPU (algorithm.md §10), the
//! library's [`Decoder`] for JavaScript.
//!
//! ```js
//! const dec = new Decoding(gpu, { heads: 2, headDim: 64, maxLen: 4096 });  // m = 64, p = 2
//! await dec.prefill(q, k, v, [100], "fma");  // (batch, heads, 100, headDim): the prompt
//! const r = await dec.step(q1, k1, v1, "fma"); // (batch, heads, C, headDim): C new tokens
//! r.o; r.lse;                                  // Float32Arrays; dec.lens is [101 ...]
//! // gpt-oss's softmax: a sink logit per query head and a sliding window of 127 keys back.
//! new Decoding(gpu, { heads: 2, headDim: 64, maxLen: 4096, sinks: [0.5, -1], window: [127, 0] });
//! ```

use multipole_attn::gpu::{DecodeMode, Decoder, Host};
use multipole_attn::{DecodeConfig, FmaConfig, Variants, Window};
use serde::Deserialize;
use wasm_bindgen::prelude::*;
use wasm_bindgen::JsCast;

use crate::gpu::Gpu;

/// The options of `new Decoding(gpu, options)`: `{ batch?: 1, heads?: 1, headDim, maxLen,
/// maxChunk?: 64, m?: 64, p?: 2, countCorrection?: true, history?: true, softcap?: C,
/// sinks?: [..], window?: [L, 0] }` (Average downsampling; `history` keeps every key and
/// value, which the `"dense"` mode needs). `softcap`, `sinks` and `window` are the softmax
/// variants as the forward's options take them (`Options`, docs/variants.md), applied to the
/// prefill and every step; decoding is causal, so the window's R must be 0, and in the
/// `"fma"` mode L <= m (FMA's window is its near field). With a window the cache keeps a
/// ring of the last L + maxChunk tokens only, and `history` is ignored.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DecodeOptions {
    #[serde(default = "one")]
    batch: usize,
    #[serde(default = "one")]
    heads: usize,
    head_dim: usize,
    max_len: usize,
    #[serde(default = "default_chunk")]
    max_chunk: usize,
    #[serde(default = "default_m")]
    m: usize,
    #[serde(default = "default_p")]
    p: usize,
    #[serde(default = "yes")]
    count_correction: bool,
    #[serde(default = "yes")]
    history: bool,
    /// Logit softcap C > 0: every logit l becomes C tanh(l / C).
    #[serde(default)]
    softcap: Option<f32>,
    /// One finite sink logit per query head (`heads` of them).
    #[serde(default)]
    sinks: Option<Vec<f32>>,
    /// `[L, R]`: query i sees keys i - L ..= i + R; R must be 0 (decoding is causal).
    #[serde(default)]
    window: Option<[usize; 2]>,
}

impl DecodeOptions {
    /// The softmax variants of `softcap`, `sinks` and `window` (checked by the decoder: a
    /// typed error for C <= 0, not one finite sink per head, R > 0, or in the "fma" mode
    /// L > m).
    fn variants(&self) -> Variants {
        Variants {
            softcap: self.softcap,
            sinks: self.sinks.clone(),
            window: self.window.map(|[left, right]| Window { left, right }),
        }
    }
}

const FIELDS: [&str; 12] = [
    "batch",
    "heads",
    "headDim",
    "maxLen",
    "maxChunk",
    "m",
    "p",
    "countCorrection",
    "history",
    "softcap",
    "sinks",
    "window",
];

fn one() -> usize {
    1
}
fn yes() -> bool {
    true
}
fn default_chunk() -> usize {
    64
}
fn default_m() -> usize {
    FmaConfig::default().block
}
fn default_p() -> usize {
    FmaConfig::default().rank
}

fn mode(name: &str) -> Result<DecodeMode, JsError> {
    match name {
        "fma" => Ok(DecodeMode::Fma),
        "dense" => Ok(DecodeMode::Dense),
        _ => Err(JsError::new(&format!(
            "invalid mode `{name}`: \"fma\" or \"dense\""
        ))),
    }
}

/// The output of a step or a prefill: `{ o, lse }`.
#[wasm_bindgen]
pub struct Decoded {
    o: Vec<f32>,
    lse: Vec<f32>,
}

#[wasm_bindgen]
impl Decoded {
    /// O, (batch, heads, C, headDim).
    #[wasm_bindgen(getter)]
    pub fn o(&self) -> Vec<f32> {
        self.o.clone()
    }

    /// The LSE, (batch, heads, C).
    #[wasm_bindgen(getter)]
    pub fn lse(&self) -> Vec<f32> {
        self.lse.clone()
    }
}

/// A KV cache on the GPU and steps through it (JS: `new Decoding(gpu, options)`).
#[wasm_bindgen]
pub struct Decoding {
    dec: Decoder,
}

#[wasm_bindgen]
impl Decoding {
    /// An empty cache for `options` on `gpu`'s device; throws on invalid options.
    #[wasm_bindgen(constructor)]
    pub fn new(gpu: &Gpu, options: JsValue) -> Result<Decoding, JsError> {
        if let Some(obj) = options.dyn_ref::<js_sys::Object>() {
            for key in js_sys::Object::keys(obj).iter() {
                let key = key.as_string().unwrap_or_default();
                if !FIELDS.contains(&key.as_str()) {
                    return Err(JsError::new(&format!(
                        "invalid options: unknown field `{key}`, expected one of {}",
                        FIELDS.join(", ")
                    )));
                }
            }
        }
        let o: DecodeOptions = serde_wasm_bindgen::from_value(options)
            .map_err(|e| JsError::new(&format!("invalid options: {e}")))?;
        let fma = FmaConfig::new(o.m, o.p).count_correction(o.count_correction);
        let cfg = DecodeConfig::new(fma, o.batch, o.heads, o.head_dim, o.max_len)
            .max_chunk(o.max_chunk)
            .history(o.history)
            .variants(o.variants());
        Ok(Decoding {
            dec: Decoder::new(gpu.context(), cfg)?,
        })
    }

    /// Prefills sequence b with the first `lengths[b]` tokens of Q, K, V ((batch, heads, P,
    /// headDim)); resolves to their outputs (causal forward, `mode` "fma" or "dense").
    pub async fn prefill(
        &self,
        q: Vec<f32>,
        k: Vec<f32>,
        v: Vec<f32>,
        lengths: Vec<u32>,
        mode_name: String,
    ) -> Result<Decoded, JsError> {
        let lengths: Vec<usize> = lengths.into_iter().map(|x| x as usize).collect();
        let out = self
            .dec
            .prefill_async(&q, &k, &v, &lengths, mode(&mode_name)?)
            .await?;
        Ok(Decoded {
            o: out.o,
            lse: out.lse.unwrap_or_default(),
        })
    }

    /// Appends C tokens to every sequence (Q, K, V: (batch, heads, C, headDim)) and resolves to
    /// their outputs, FMA or exact dense attention over the cache.
    pub async fn step(
        &self,
        q: Vec<f32>,
        k: Vec<f32>,
        v: Vec<f32>,
        mode_name: String,
    ) -> Result<Decoded, JsError> {
        let out = self
            .dec
            .step_async(mode(&mode_name)?, Host::new(&q, &k, &v))
            .await?;
        Ok(Decoded {
            o: out.o,
            lse: out.lse.unwrap_or_default(),
        })
    }

    /// Appends keys and values without queries (a prompt whose outputs are not needed).
    pub async fn extend(&self, k: Vec<f32>, v: Vec<f32>, lengths: Vec<u32>) -> Result<(), JsError> {
        let lengths: Vec<usize> = lengths.into_iter().map(|x| x as usize).collect();
        Ok(self.dec.extend_async(&k, &v, &lengths).await?)
    }

    /// Empties sequence `b`; the others keep their tokens.
    pub fn reset(&self, b: usize) -> Result<(), JsError> {
        Ok(self.dec.reset(b)?)
    }

    /// Tokens each sequence holds.
    #[wasm_bindgen(getter)]
    pub fn lens(&self) -> Result<Vec<u32>, JsError> {
        Ok(self.dec.lens()?.into_iter().map(|x| x as u32).collect())
    }

    /// Bytes of the FMA state (fixed size) and of the history now held.
    #[wasm_bindgen(js_name = cacheBytes)]
    pub fn cache_bytes(&self) -> Result<Vec<f64>, JsError> {
        let (fma, history) = self.dec.bytes()?;
        Ok(vec![fma as f64, history as f64])
    }
}
