//! # multipole-attn in the browser
//!
//! The library compiled to WebAssembly with the same WGSL shaders and the same scheduler, on
//! the browser's WebGPU, exposed to JavaScript through wasm-bindgen. Every function that can
//! fail throws a JS `Error` whose message is the library's [`multipole_attn::FmaError`] text.
//!
//! ```js
//! import init, { Gpu, makeInputs, compareOutputs, structure, levelMass } from "./pkg/multipole_attn_web.js";
//! await init();
//! const gpu = await Gpu.create();                  // throws when the browser has no WebGPU
//! const opts = { heads: 2, n: 4096, headDim: 64, m: 64, p: 2, causal: false };
//! const x = makeInputs(opts, "smooth", 2310);      // Q, K, V: (1, heads, n, headDim) f32
//! const o = await gpu.fma(x.q, x.k, x.v, opts);    // Float32Array, same shape
//! const exact = await gpu.dense(x.q, x.k, x.v, opts);
//! const err = compareOutputs(o, exact);            // { relError, maxAbsError }
//! const s = structure(opts, 1000);                 // bands query 1000 sees, per level
//! const w = levelMass(x.q, x.k, x.v, opts, 0, 1000); // its softmax mass per level
//! ```
//!
//! Options (`opts`) are checked in Rust: unknown fields, non-integers and values the algorithm
//! does not allow are errors. `queries` is `"fine"` (the default, O(n log n)) or `"coarse"`
//! (O(n), bidirectional only: with `causal: true` it throws); see [`options::Queries`].
//!
//! Softmax variants (docs/variants.md), for dense attention and FMA with fine queries:
//! `softcap: C` (every logit becomes C tanh(l / C)), `sinks: [..]` (one logit per query head
//! joining each row's softmax denominator), `window: [L, R]` (query i sees keys i - L ..= i + R;
//! FMA runs it through its near field alone, exactly, with L, R <= m). Values the library does
//! not allow throw its typed error; `structure` and `levelMass` draw the plain softmax and
//! throw with a variant. `new Decoding(gpu, options)` takes the same three (the window with
//! R = 0: decoding is causal).
//!
//! 2D (images, algorithm.md §9): `grid: [H, W]` lays the n = H W tokens of every head on an
//! H x W grid in raster order, with `m` the cell side r; `gridStructure(opts, t)` is what
//! token t sees (its near cells and its far bands per level):
//!
//! ```js
//! const img = { n: 32 * 32, headDim: 32, m: 4, p: 2, grid: [32, 32] };
//! const o2 = await gpu.fma(x.q, x.k, x.v, img);        // throws if H W != n, p ∤ m or causal
//! const view = gridStructure(img, 5 * 32 + 7);         // pixel (y, x) = (5, 7)
//! ```
#![warn(missing_docs)]

pub mod compare;
pub mod conformance;
pub mod decode;
pub mod gpu;
pub mod grid_structure;
pub mod inputs;
pub mod options;
pub mod structure;
pub mod types;

pub use compare::{compare_outputs, Errors};
pub use decode::{Decoded, Decoding};
pub use gpu::Gpu;
pub use grid_structure::{grid_structure, GridBand, GridLevel, GridStructure, Rect};
pub use inputs::{make_inputs, Inputs};
pub use options::{Options, Queries};
pub use structure::{level_mass, structure, Band, LevelGeometry, Structure};
