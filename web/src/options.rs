//! The options object every JS call takes, checked and turned into the library's types.

use multipole_attn::{FmaConfig, FmaError, Grid, Problem, Sequences, Shape, Variants, Window};
use serde::{Deserialize, Serialize};
use wasm_bindgen::prelude::*;
use wasm_bindgen::JsCast;

/// Which queries attend at the coarse levels (algorithm.md §6): `"fine"` or `"coarse"`
/// (bidirectional only; with `causal: true` it is an error saying so).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Queries {
    /// Every query attends at full resolution to every level: O(n log n).
    #[default]
    Fine,
    /// Queries pooled like the keys at every coarse level: O(n), bidirectional only.
    Coarse,
}

/// A problem and an FMA configuration, as JS passes it:
/// `{ batch?: 1, heads?: 1, kvHeads?: heads, n, nKv?: n, headDim, m?: 64, p?: 2, causal?:
/// false, queries?: "fine", seqlens?: [..], seqlensKv?: [..], grid?: [H, W], softcap?: C,
/// sinks?: [..], window?: [L, R] }`. Q and O are
/// (batch, heads, n, headDim) f32, row-major; K and V (batch, kvHeads, nKv, headDim)
/// (grouped-query attention when kvHeads < heads; cross-length attention when nKv != n, causal
/// bottom-right aligned). With `grid` the n = H W tokens of every head lie on an H x W image in
/// raster order (token t = y W + x) and `m` is the cell side r (2D FMA, algorithm.md §9).
/// `softcap`, `sinks` and `window` are the softmax variants (docs/variants.md), for dense
/// attention and FMA with fine queries.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Options {
    /// Batch size (default 1).
    #[serde(default = "one")]
    pub batch: usize,
    /// Heads per batch element (default 1).
    #[serde(default = "one")]
    pub heads: usize,
    /// K/V heads per batch element (default `heads`): a divisor of `heads`; query head h
    /// reads K/V head h / (heads / kvHeads) (grouped-query attention; 1: multi-query).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kv_heads: Option<usize>,
    /// Sequence length (of Q).
    pub n: usize,
    /// Keys (and values) per head (default `n`): another length is cross-length attention,
    /// causal bottom-right aligned (the queries are the last n positions); dense takes any,
    /// FMA more keys than queries with `causal` and fine queries.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub n_kv: Option<usize>,
    /// Head dimension d (1..=256).
    pub head_dim: usize,
    /// Fine block size m (default 64; divisible by p). With `grid`: the cell side r (the
    /// default 64 makes an image of at most 64 x 64 one cell, i.e. dense attention).
    #[serde(default = "default_m")]
    pub m: usize,
    /// Coarse rank p (default 2).
    #[serde(default = "default_p")]
    pub p: usize,
    /// Causal mask (default false).
    #[serde(default)]
    pub causal: bool,
    /// Query resolution at the coarse levels (default `"fine"`).
    #[serde(default)]
    pub queries: Queries,
    /// A packed variable-length batch (FlashAttention's cu_seqlens as lengths): sequences of
    /// these lengths (summing to `n`, `batch` 1; an empty one has no rows) one after another along the
    /// sequence axis, each its own attention problem.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seqlens: Option<Vec<usize>>,
    /// With `seqlens`: each sequence's key length (FlashAttention's cu_seqlens_k as lengths;
    /// summing to `nKv`), K and V packed by these.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seqlens_kv: Option<Vec<usize>>,
    /// `[H, W]`: the tokens lie on an H x W grid in raster order (2D FMA, algorithm.md §9):
    /// H W must be `n`, `m` is the cell side r (p divides it), not causal, no `seqlens`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grid: Option<[usize; 2]>,
    /// Logit softcap C > 0 (Gemma 2): every logit l, fine or coarse, becomes C tanh(l / C).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub softcap: Option<f32>,
    /// Attention sinks (gpt-oss): one finite logit per query head (`heads` of them), whose
    /// term exp(S_h) joins each row's softmax denominator and carries no value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sinks: Option<Vec<f32>>,
    /// `[L, R]`: a sliding window, query i sees key j iff i - L <= j <= i + R (bottom-right
    /// aligned for cross-length inputs; R = 0 with `causal`). FMA with a window is its near
    /// field alone (exact windowed attention): L, R <= m.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window: Option<[usize; 2]>,
}

/// The JS names of the fields of [`Options`].
const FIELDS: [&str; 16] = [
    "batch",
    "heads",
    "kvHeads",
    "n",
    "nKv",
    "headDim",
    "m",
    "p",
    "causal",
    "queries",
    "seqlens",
    "seqlensKv",
    "grid",
    "softcap",
    "sinks",
    "window",
];

fn one() -> usize {
    1
}
fn default_m() -> usize {
    FmaConfig::default().block
}
fn default_p() -> usize {
    FmaConfig::default().rank
}

impl Options {
    /// Reads the options object passed from JS; a wrong field is an error naming it.
    pub fn from_js(value: JsValue) -> Result<Self, JsError> {
        // serde-wasm-bindgen reads only the declared fields of a JS object, so
        // `deny_unknown_fields` alone would let a typo pass silently: check the keys here.
        if let Some(obj) = value.dyn_ref::<js_sys::Object>() {
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
        serde_wasm_bindgen::from_value(value)
            .map_err(|e| JsError::new(&format!("invalid options: {e}")))
    }

    /// The options as a JS object (what `from_js` reads).
    pub fn to_js(&self) -> Result<JsValue, JsError> {
        serde_wasm_bindgen::to_value(self).map_err(|e| JsError::new(&e.to_string()))
    }

    /// (batch, heads, n, head_dim) with `kvHeads` K/V heads, validated.
    pub fn shape(&self) -> Result<Shape, JsError> {
        let n_kv = self.n_kv.unwrap_or(self.n);
        let shape = Shape::cross(self.batch, self.heads, self.n, n_kv, self.head_dim)
            .with_kv_heads(self.kv_heads.unwrap_or(self.heads));
        shape.validate()?;
        Ok(shape)
    }

    /// The packed sequences of `seqlens`, checked against the shape (`None` without them).
    pub fn sequences(&self) -> Result<Option<Sequences>, JsError> {
        let Some(lens) = &self.seqlens else {
            if self.seqlens_kv.is_some() {
                return Err(FmaError::InvalidConfig {
                    what: "seqlensKv",
                    value: "given without seqlens".into(),
                    allowed: "the key lengths of the sequences of seqlens, beside it".into(),
                }
                .into());
            }
            return Ok(None);
        };
        if let Some(grid) = self.grid_shape() {
            // A packed batch is a batch of 1D sequences; the FMA plan refuses it too, but the
            // dense path would run it and ignore the grid: refuse it here for both.
            return Err(FmaError::InvalidConfig {
                what: "grid",
                value: grid.to_string(),
                allowed: "none with seqlens: a variable-length batch is a batch of 1D sequences"
                    .into(),
            }
            .into());
        }
        let seqs = match &self.seqlens_kv {
            Some(kv) => Sequences::packed_cross(lens.clone(), kv.clone())?,
            None => Sequences::packed(lens.clone())?,
        };
        seqs.check(self.shape()?)?;
        Ok(Some(seqs))
    }

    /// The 2D grid of `grid` (`None` in 1D), not yet checked against `n`.
    pub fn grid_shape(&self) -> Option<Grid> {
        self.grid.map(|[h, w]| Grid::new(h, w))
    }

    /// The FMA configuration (Average downsampling, count correction on), validated: with
    /// `grid`, H W = n, p divides the cell side m and not causal (typed errors naming each).
    pub fn config(&self) -> Result<FmaConfig, JsError> {
        let cfg = match self.queries {
            Queries::Fine => FmaConfig::new(self.m, self.p),
            Queries::Coarse => {
                FmaConfig::new(self.m, self.p).queries(multipole_attn::Queries::Coarse)
            }
        }
        .grid(self.grid_shape());
        cfg.validate_values()?;
        // m, p, the mask against coarse queries and grids, and the keys' lengths.
        multipole_attn::cross::check(&cfg, &self.problem()?)?;
        Ok(cfg)
    }

    /// The softmax variants of `softcap`, `sinks` and `window` (not yet checked: the problem
    /// checks them against the heads and the mask).
    pub fn variants(&self) -> Variants {
        Variants {
            softcap: self.softcap,
            sinks: self.sinks.clone(),
            window: self.window.map(|[left, right]| Window { left, right }),
        }
    }

    /// Whether any softmax variant is set.
    pub fn has_variants(&self) -> bool {
        self.variants() != Variants::default()
    }

    /// The problem: shape, packed sequences, mask and softmax variants, validated (typed
    /// errors: a softcap C <= 0 or not finite, not one finite sink per query head, a window
    /// with R > 0 under the causal mask; what FMA's configuration refuses with a variant, a
    /// window wider than its near field or coarse queries, the call's executor says).
    pub fn problem(&self) -> Result<Problem, JsError> {
        let problem = Problem {
            shape: self.shape()?,
            sequences: self.sequences()?,
            causal: self.causal,
            variants: self.variants(),
        };
        problem.validate()?;
        Ok(problem)
    }
}
