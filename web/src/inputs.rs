//! Seeded inputs for the demo: the library's own generators, so the page and the native demo
//! (`examples/demo.rs`) use the same data for the same seed.

use multipole_attn::random::{normal_tensor, smooth_tensor};
use wasm_bindgen::prelude::*;

use crate::options::Options;

/// Q, K, V of one problem, Q (batch, heads, n, headDim) and K, V (batch, kvHeads, n, headDim)
/// f32 (JS: `x.q`, `x.k`, `x.v` are copies as `Float32Array`).
#[wasm_bindgen(getter_with_clone)]
pub struct Inputs {
    /// Queries.
    pub q: Vec<f32>,
    /// Keys.
    pub k: Vec<f32>,
    /// Values.
    pub v: Vec<f32>,
}

/// Makes Q, K, V for `options` from `seed`. `kind`:
/// - `"smooth"`: Q i.i.d. N(0, 1); K and V vary smoothly along the sequence (two sinusoids per
///   channel plus N(0, 0.1²) noise), the far-field structure FMA's coarse levels summarise;
/// - `"random"`: Q, K, V i.i.d. N(0, 1), FMA's worst case (nothing to summarise).
#[wasm_bindgen(js_name = makeInputs)]
pub fn make_inputs(
    #[wasm_bindgen(unchecked_param_type = "FmaOptions")] options: JsValue,
    #[wasm_bindgen(unchecked_param_type = "\"smooth\" | \"random\"")] kind: &str,
    seed: u32,
) -> Result<Inputs, JsError> {
    let opts = Options::from_js(options)?;
    let shape = opts.shape()?;
    let (len, kv_len, seed) = (shape.elements(), shape.kv_elements(), seed as u64);
    let q = normal_tensor(seed, len);
    let (k, v) = match kind {
        "smooth" => {
            let (rows, n, d) = (shape.kv_batch_heads(), shape.seq, shape.head_dim);
            (
                smooth_tensor(seed + 1, rows, n, d, 0.1),
                smooth_tensor(seed + 2, rows, n, d, 0.1),
            )
        }
        "random" => (
            normal_tensor(seed + 1, kv_len),
            normal_tensor(seed + 2, kv_len),
        ),
        other => {
            return Err(JsError::new(&format!(
                "invalid input kind {other:?}: \"smooth\" or \"random\""
            )))
        }
    };
    Ok(Inputs { q, k, v })
}
