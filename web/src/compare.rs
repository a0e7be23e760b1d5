//! How far an output is from another: the figures the demo prints.

use wasm_bindgen::prelude::*;

/// Distance of an approximate output from an exact one.
#[wasm_bindgen]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Errors {
    /// ||approx - exact||_F / ||exact||_F over the whole tensor.
    #[wasm_bindgen(js_name = relError)]
    pub rel_error: f64,
    /// max |approx - exact| over the whole tensor.
    #[wasm_bindgen(js_name = maxAbsError)]
    pub max_abs_error: f64,
}

/// Relative Frobenius and max-abs error of `approx` against `exact` (same length; a NaN
/// anywhere makes both errors NaN, so a broken run never looks accurate).
#[wasm_bindgen(js_name = compareOutputs)]
pub fn compare_outputs(approx: &[f32], exact: &[f32]) -> Result<Errors, JsError> {
    if approx.len() != exact.len() || exact.is_empty() {
        return Err(JsError::new(&format!(
            "compareOutputs: both outputs must have the same non-zero length, got {} and {}",
            approx.len(),
            exact.len()
        )));
    }
    let (mut num, mut den, mut max_abs) = (0f64, 0f64, 0f64);
    for (&a, &b) in approx.iter().zip(exact) {
        let (a, b) = (a as f64, b as f64);
        let e = (a - b).abs();
        num += e * e;
        den += b * b;
        // f64::max would drop a NaN; keep it.
        max_abs = if e.is_nan() || max_abs.is_nan() {
            f64::NAN
        } else {
            max_abs.max(e)
        };
    }
    Ok(Errors {
        rel_error: (num / den).sqrt(),
        max_abs_error: max_abs,
    })
}
