//! What the demo draws: which keys one query sees at each level (from the library's index
//! maps, `levels` and `cpu::gather`, not re-derived here) and how its softmax splits by level.

use multipole_attn::cpu::gather::{seen_keys, SeenKey};
use multipole_attn::cpu::level_mass::level_mass as cpu_level_mass;
use multipole_attn::cpu::widen;
use multipole_attn::levels::{sub_window, Levels};
use multipole_attn::{FmaError, Problem, Shape};
use serde::Serialize;
use wasm_bindgen::prelude::*;

use crate::options::Options;

/// A run of key positions [start, end) that a query sees as one unit: at level 0 the fine keys
/// of one near block (each attended one by one), at level l >= 1 the sub-window S(l, window, j)
/// that one coarse key stands for (w_l / p tokens, doubling per level).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Band {
    /// 0 = fine keys; l >= 1 = coarse level l.
    pub level: usize,
    /// First token position.
    pub start: usize,
    /// One past the last token position.
    pub end: usize,
    /// The fine block (level 0) or the window a at level l.
    pub window: usize,
    /// Sub-window (coarse key) index j < p; 0 at level 0.
    pub j: usize,
}

/// The geometry of one level: window size and count.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct LevelGeometry {
    /// 0 = fine blocks; l >= 1 = coarse level l.
    pub level: usize,
    /// Tokens per window (m at level 0, w_l = m 2^(l-1) at level l).
    pub window: usize,
    /// Windows over the sequence, ceil(n / window).
    pub windows: usize,
    /// Tokens per coarse key, w_l / p (1 at level 0: fine keys are single tokens).
    pub sub_window: usize,
}

/// One query's view of the sequence.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Structure {
    /// Sequence length.
    pub n: usize,
    /// The query position.
    pub query: usize,
    /// Level 0 then coarse levels 1..=L.
    pub levels: Vec<LevelGeometry>,
    /// Every band the query sees, level 0 first; together they cover 0..n (causal: 0..=query)
    /// exactly once.
    pub bands: Vec<Band>,
    /// Keys the query attends to (fine keys plus coarse keys), against n for dense attention.
    pub keys: usize,
}

/// The 1D views have no 2D counterpart here (the 2D one is `gridStructure`): a grid is an error.
fn refuse_grid(opts: &Options) -> Result<(), JsError> {
    match opts.grid_shape() {
        None => Ok(()),
        Some(grid) => Err(FmaError::InvalidConfig {
            what: "grid",
            value: grid.to_string(),
            allowed: "none: structure and levelMass are the 1D views (gridStructure is 2D)".into(),
        }
        .into()),
    }
}

/// The views draw the plain softmax: a softmax variant (softcap, sinks, window) is an error
/// rather than a picture or a mass that would silently leave it out.
fn refuse_variants(opts: &Options) -> Result<(), JsError> {
    if !opts.has_variants() {
        return Ok(());
    }
    Err(FmaError::InvalidConfig {
        what: "variants",
        value: format!("{:?}", opts.variants()),
        allowed: "none: structure and levelMass show the plain softmax (leave out softcap, \
                  sinks and window)"
            .into(),
    }
    .into())
}

/// The bands query `query` sees for (n, m, p, causal) of `opts`.
pub fn structure_of(opts: &Options, query: usize) -> Result<Structure, JsError> {
    opts.config()?;
    refuse_grid(opts)?;
    refuse_variants(opts)?;
    if query >= opts.n {
        return Err(FmaError::ShapeMismatch {
            what: "query index".into(),
            expected: format!("< n = {}", opts.n),
            got: query.to_string(),
        }
        .into());
    }
    let (n, m, p) = (opts.n, opts.m, opts.p);
    let lv = Levels::new(n, m, p);
    let mut levels = vec![LevelGeometry {
        level: 0,
        window: m,
        windows: lv.fine_blocks(),
        sub_window: 1,
    }];
    levels.extend(lv.levels.iter().map(|l| LevelGeometry {
        level: l.level,
        window: l.window,
        windows: l.windows,
        sub_window: l.window / p,
    }));
    let keys = seen_keys(&lv, opts.causal, query);
    let mut bands: Vec<Band> = Vec::new();
    for key in &keys {
        match *key {
            SeenKey::Fine(t) => match bands.last_mut() {
                // Consecutive fine keys of the same block make one band.
                Some(b) if b.level == 0 && b.end == t && b.window == t / m => b.end = t + 1,
                _ => bands.push(Band {
                    level: 0,
                    start: t,
                    end: t + 1,
                    window: t / m,
                    j: 0,
                }),
            },
            SeenKey::Coarse { level, window, j } => {
                let r = sub_window(n, m, p, level, window, j);
                bands.push(Band {
                    level,
                    start: r.start,
                    end: r.end,
                    window,
                    j,
                });
            }
        }
    }
    Ok(Structure {
        n,
        query,
        levels,
        bands,
        keys: keys.len(),
    })
}

/// JS `structure(options, query)`: `{ n, query, levels: [{ level, window, windows, subWindow }],
/// bands: [{ level, start, end, window, j }], keys }` for the query at position `query`.
#[wasm_bindgen(unchecked_return_type = "Structure")]
pub fn structure(
    #[wasm_bindgen(unchecked_param_type = "FmaOptions")] options: JsValue,
    query: u32,
) -> Result<JsValue, JsError> {
    let s = structure_of(&Options::from_js(options)?, query as usize)?;
    serde_wasm_bindgen::to_value(&s).map_err(|e| JsError::new(&e.to_string()))
}

/// The softmax mass one query puts on each level, and the keys it sees there.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Mass {
    /// Per level 0..=L; sums to 1.
    pub mass: Vec<f64>,
    /// Keys seen per level 0..=L.
    pub keys: Vec<usize>,
    /// The query's log-sum-exp.
    pub lse: f64,
}

/// The per-level mass of query `query` of head `head` (flat batch * heads + head index):
/// computed in f64 on the CPU reference side, for one row (one head's downsampling, O(n d L)).
pub fn level_mass_of(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    opts: &Options,
    head: usize,
    query: usize,
) -> Result<Mass, JsError> {
    let shape = opts.shape()?;
    let cfg = opts.config()?;
    refuse_grid(opts)?;
    refuse_variants(opts)?;
    shape.check_len("Q", q.len())?;
    shape.check_kv_len("K", k.len())?;
    shape.check_kv_len("V", v.len())?;
    if head >= shape.batch_heads() {
        return Err(FmaError::ShapeMismatch {
            what: "head index".into(),
            expected: format!("< batch * heads = {}", shape.batch_heads()),
            got: head.to_string(),
        }
        .into());
    }
    // Only this head's rows, widened to f64: a single-head problem.
    let one = Shape::new(1, 1, shape.seq, shape.head_dim);
    let r = head * one.elements()..(head + 1) * one.elements();
    // Its K/V head (grouped-query attention).
    let kv = head / shape.group();
    let kv = kv * one.elements()..(kv + 1) * one.elements();
    let (qh, kh, vh) = (widen(&q[r]), widen(&k[kv.clone()]), widen(&v[kv]));
    let problem = Problem::new(one).causal(opts.causal);
    let lm = cpu_level_mass(&qh, &kh, &vh, &problem, &cfg, 0, query)?;
    Ok(Mass {
        mass: lm.mass,
        keys: lm.keys,
        lse: lm.lse,
    })
}

/// JS `levelMass(q, k, v, options, head, query)`: `{ mass: [...], keys: [...], lse }`, one
/// entry per level 0..=L; `mass` sums to 1.
#[wasm_bindgen(js_name = levelMass, unchecked_return_type = "LevelMass")]
pub fn level_mass(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    #[wasm_bindgen(unchecked_param_type = "FmaOptions")] options: JsValue,
    head: u32,
    query: u32,
) -> Result<JsValue, JsError> {
    let opts = Options::from_js(options)?;
    let m = level_mass_of(q, k, v, &opts, head as usize, query as usize)?;
    serde_wasm_bindgen::to_value(&m).map_err(|e| JsError::new(&e.to_string()))
}
