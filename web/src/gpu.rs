//! `Gpu`: the browser's WebGPU device, and FMA and dense attention on it.

use std::cell::RefCell;
use std::rc::Rc;

use multipole_attn::gpu::{Attention, ContextOptions, GpuContext, Host, Plan};
use multipole_attn::Method;
use wasm_bindgen::prelude::*;

use crate::options::Options;

/// Prepared methods kept per `Gpu`: each holds its pipelines and per-shape buffers, so a
/// repeated run allocates and compiles nothing.
const KEPT: usize = 8;

/// A WebGPU device with the library's pipelines (JS: `await Gpu.create()`).
#[wasm_bindgen]
pub struct Gpu {
    ctx: GpuContext,
    kept: RefCell<Vec<(Method, Rc<Attention>)>>,
}

#[wasm_bindgen]
impl Gpu {
    /// Requests the browser's WebGPU adapter and a device with the limits the library uses
    /// (whatever the adapter grants: in Chromium at most 256 invocations per workgroup).
    /// Throws `Error("no GPU adapter found ...")` when the browser has no WebGPU.
    pub async fn create() -> Result<Gpu, JsError> {
        let ctx = GpuContext::new_async(ContextOptions::default()).await?;
        Ok(Gpu {
            ctx,
            kept: RefCell::new(Vec::new()),
        })
    }

    /// The adapter's name, backend, device type and driver, e.g. "unnamed adapter (BrowserWebGpu,
    /// Cpu)" for Chromium's SwiftShader fallback (Chromium does not tell pages the name).
    #[wasm_bindgen(getter)]
    pub fn adapter(&self) -> String {
        let i = &self.ctx.info;
        // Browsers may withhold the adapter's name; say what is known then.
        let name = if i.name.is_empty() {
            "unnamed adapter"
        } else {
            &i.name
        };
        let mut s = format!("{name} ({:?}, {:?})", i.backend, i.device_type);
        if !i.driver.is_empty() {
            s += &format!(", {}", i.driver);
        }
        s
    }

    /// Largest workgroup the kernels use on this device (<= 256).
    #[wasm_bindgen(getter, js_name = maxWorkgroup)]
    pub fn max_workgroup(&self) -> u32 {
        self.ctx.max_workgroup()
    }

    /// Workgroup memory the device grants, bytes.
    #[wasm_bindgen(getter, js_name = workgroupMemory)]
    pub fn workgroup_memory(&self) -> u32 {
        self.ctx.limits.max_compute_workgroup_storage_size
    }

    /// Coarse levels and dispatches FMA would run for `options` (one submit):
    /// `{ levels, dispatches }` (no level where a window runs it on dense attention's banded
    /// kernel).
    #[wasm_bindgen(unchecked_return_type = "Plan")]
    pub fn plan(
        &self,
        #[wasm_bindgen(unchecked_param_type = "FmaOptions")] options: JsValue,
    ) -> Result<JsValue, JsError> {
        let opts = Options::from_js(options)?;
        let method = Method::Fma(opts.config()?);
        let summary = match self.attention(method)?.plan(&opts.problem()?)? {
            Plan::Fma(plan) => PlanSummary {
                levels: plan.levels.count(),
                dispatches: plan.steps().len(),
            },
            // FMA with a sliding window is exact windowed attention and runs on dense
            // attention's banded kernel: no coarse level (docs/variants.md).
            Plan::Dense(plan) => PlanSummary {
                levels: 0,
                dispatches: plan.steps().len(),
            },
            _ => {
                return Err(JsError::new(
                    "internal error: a forward planned as a backward",
                ))
            }
        };
        serde_wasm_bindgen::to_value(&summary).map_err(|e| JsError::new(&e.to_string()))
    }

    /// Fast Multipole Attention of `q`, `k`, `v` ((batch, heads, n, headDim) f32; K, V with
    /// `kvHeads` heads) on the GPU: resolves to O of Q's shape. With `seqlens`, every packed
    /// sequence is its own FMA; with `grid: [H, W]`, 2D FMA of every head's H x W image.
    /// Uploads, one submit, readback.
    pub async fn fma(
        &self,
        q: Vec<f32>,
        k: Vec<f32>,
        v: Vec<f32>,
        #[wasm_bindgen(unchecked_param_type = "FmaOptions")] options: JsValue,
    ) -> Result<Vec<f32>, JsError> {
        let opts = Options::from_js(options)?;
        let fma = self.attention(Method::Fma(opts.config()?))?;
        let out = fma
            .forward_async(&opts.problem()?, Host::new(&q, &k, &v).without_lse())
            .await?;
        Ok(out.o)
    }

    /// Exact dense softmax attention on the GPU (causal when `options.causal`), the baseline:
    /// resolves to O, (batch, heads, n, headDim).
    pub async fn dense(
        &self,
        q: Vec<f32>,
        k: Vec<f32>,
        v: Vec<f32>,
        #[wasm_bindgen(unchecked_param_type = "FmaOptions")] options: JsValue,
    ) -> Result<Vec<f32>, JsError> {
        let opts = Options::from_js(options)?;
        if opts.grid.is_some() {
            // Dense attention is the same on a grid, but a grid that does not fit n (or a
            // causal grid) is refused as FMA refuses it.
            opts.config()?;
        }
        let dense = self.attention(Method::Dense)?;
        let out = dense
            .forward_async(&opts.problem()?, Host::new(&q, &k, &v).without_lse())
            .await?;
        Ok(out.o)
    }
}

#[derive(serde::Serialize)]
struct PlanSummary {
    levels: usize,
    dispatches: usize,
}

impl Gpu {
    /// The library's context (for Rust callers and the tests).
    pub fn context(&self) -> &GpuContext {
        &self.ctx
    }

    /// The prepared attention of `method`, made on first use.
    fn attention(&self, method: Method) -> Result<Rc<Attention>, JsError> {
        let mut kept = self.kept.borrow_mut();
        if let Some((_, a)) = kept.iter().find(|(m, _)| *m == method) {
            return Ok(a.clone());
        }
        let a = Rc::new(Attention::new(&self.ctx, method.clone())?);
        if kept.len() >= KEPT {
            kept.remove(0);
        }
        kept.push((method, a.clone()));
        Ok(a)
    }
}
