//! "Test this GPU": the conformance suite of `multipole-attn doctor` (the same cases and
//! bounds, `multipole_attn::conformance`) on the browser's WebGPU adapter, returning the same
//! JSON document as `multipole-attn doctor --json`.

use multipole_attn::conformance::report::{AdapterReport, Report};
use wasm_bindgen::prelude::*;

use crate::gpu::Gpu;

/// Seconds from the page's clock (`std::time::Instant` panics on wasm32).
fn now_seconds() -> f64 {
    let ms = web_sys::window()
        .and_then(|w| w.performance())
        .or_else(|| {
            js_sys::global()
                .dyn_into::<web_sys::WorkerGlobalScope>()
                .ok()
                .and_then(|w| w.performance())
        })
        .map_or(0.0, |p| p.now());
    ms / 1000.0
}

#[wasm_bindgen]
impl Gpu {
    /// Runs the conformance suite on this device and resolves to the report as JSON (the
    /// document `multipole-attn doctor --json` prints, with this one adapter). Calls
    /// `onProgress({ done, total, name, passed, maxErr, seconds })` after every case, if given.
    /// `adapterName` names the adapter where the browser withholds its name (GPUAdapterInfo's
    /// description, say). Failing cases are part of the report, not exceptions.
    pub async fn conformance(
        &self,
        #[wasm_bindgen(
            js_name = onProgress,
            unchecked_param_type = "((p: ConformanceProgress) => void) | null"
        )]
        on_progress: Option<js_sys::Function>,
        #[wasm_bindgen(js_name = adapterName)] adapter_name: Option<String>,
    ) -> Result<String, JsError> {
        let mut report = AdapterReport::run(self.context(), &now_seconds, |done, total, r| {
            if let Some(f) = &on_progress {
                let p = Progress {
                    done,
                    total,
                    name: &r.name,
                    passed: r.passed,
                    max_err: r.max_err,
                    seconds: r.seconds,
                };
                // A throwing callback must not abort the suite: its error is dropped.
                if let Ok(v) = serde_wasm_bindgen::to_value(&p) {
                    let _ = f.call1(&JsValue::NULL, &v);
                }
            }
        })
        .await;
        if report.adapter.is_empty() {
            report.adapter = adapter_name
                .filter(|n| !n.is_empty())
                .unwrap_or_else(|| "unnamed adapter".into());
        }
        Ok(Report::new(vec![report]).to_json())
    }
}

/// What `onProgress` receives.
#[derive(serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct Progress<'a> {
    done: usize,
    total: usize,
    name: &'a str,
    passed: bool,
    max_err: f64,
    seconds: f64,
}
