//! TypeScript types of the plain objects the JS API takes and returns, for the `.d.ts` that
//! wasm-bindgen writes into web/pkg/ (the functions name them with `unchecked_*_type`; wasm
//! itself sees `JsValue`s, checked in Rust by `Options::from_js`).

use wasm_bindgen::prelude::*;

#[wasm_bindgen(typescript_custom_section)]
const TYPES: &'static str = r#"
/** A problem and an FMA configuration; Q and O are (batch, heads, n, headDim) f32, row-major,
 * K and V (batch, kvHeads, nKv, headDim). */
export interface FmaOptions {
  /** Batch size (default 1). */
  batch?: number;
  /** Query heads per batch element (default 1). */
  heads?: number;
  /** K/V heads (default heads): a divisor of heads; query head h reads K/V head
   * h / (heads / kvHeads) (grouped-query attention; 1 = multi-query). */
  kvHeads?: number;
  /** Sequence length (of Q). */
  n: number;
  /** Keys and values per head (default n): cross-length attention, causal bottom-right aligned
   * (the queries are the last n positions); FMA needs causal, fine queries and nKv > n. */
  nKv?: number;
  /** Head dimension d, 1..=256. */
  headDim: number;
  /** Fine block size m (default 64; divisible by p). With grid: the cell side r (cells r x r;
   * 4 or 8 suit small images, and the default 64 makes an image of at most 64 x 64 one cell,
   * i.e. dense attention). */
  m?: number;
  /** Coarse rank p (default 2). */
  p?: number;
  /** Causal mask (default false). */
  causal?: boolean;
  /** "fine" (default, O(n log n)) or "coarse" (O(n), bidirectional only). */
  queries?: "fine" | "coarse";
  /** A packed variable-length batch: sequence lengths (summing to n, batch 1; 0 is an empty
   * sequence), one after another along the sequence axis, each its own attention problem. */
  seqlens?: number[];
  /** With seqlens: each sequence's key length (summing to nKv); K, V packed by these. */
  seqlensKv?: number[];
  /** [H, W]: the n = H W tokens lie on an H x W grid in raster order (token y W + x), 2D FMA
   * with m the cell side r (p divides it); H W must be n, not causal, no seqlens. */
  grid?: [number, number];
  /** Logit softcap C > 0 (Gemma 2): every logit l, fine or coarse, becomes C tanh(l / C).
   * Dense attention and FMA with fine queries. */
  softcap?: number;
  /** Attention sinks (gpt-oss): one finite logit S_h per query head (heads of them); each
   * row's softmax denominator gains exp(S_h), which carries no value. Dense and fine FMA. */
  sinks?: number[];
  /** [L, R]: sliding window, query i sees key j iff i - L <= j <= i + R (bottom-right aligned
   * for nKv != n; R must be 0 with causal). FMA with a window is exact windowed attention
   * through its near field alone: L, R <= m, fine queries, not on a grid. */
  window?: [number, number];
}

/** What `Gpu.plan` returns: coarse levels and dispatches in the one submit. */
export interface Plan {
  levels: number;
  dispatches: number;
}

/** One band of keys a query sees as one coarse key (level 0: its fine keys). */
export interface Band {
  level: number;
  start: number;
  end: number;
  window: number;
  j: number;
}

/** What `structure` returns. */
export interface Structure {
  n: number;
  query: number;
  levels: { level: number; window: number; windows: number; subWindow: number }[];
  bands: Band[];
  keys: number;
}

/** Pixels [y0, y1) x [x0, x1) of a grid. */
export interface Rect {
  y0: number;
  x0: number;
  y1: number;
  x1: number;
}

/** What `gridStructure` returns: the query's near pixels, and its coarse keys per level (band
 * j of cell `cell`, row-major among the level's cells); together they cover the grid once. */
export interface GridStructure {
  h: number;
  w: number;
  query: number;
  levels: { level: number; side: number; rows: number; cols: number }[];
  near: Rect;
  far: { level: number; cell: number; j: number; rect: Rect }[];
  keys: number;
}

/** What `levelMass` returns: per level 0..=L the softmax mass (sums to 1) and keys seen. */
export interface LevelMass {
  mass: number[];
  keys: number[];
  lse: number;
}

/** What `Gpu.conformance` passes to its progress callback after every case. */
export interface ConformanceProgress {
  done: number;
  total: number;
  name: string;
  passed: boolean;
  maxErr: number;
  seconds: number;
}
"#;
