//! `Gpu`: the browser's WebGPU device, and FMA and dense attention on it.

use std::cell::RefCell;
use std::rc::Rc;

use multipole_attn::gpu::{ContextOptions, DenseAttention, FmaAttention, GpuContext};
use multipole_attn::FmaConfig;
use wasm_bindgen::prelude::*;

use crate::options::Options;

/// Prepared configurations kept per `Gpu`: each holds its pipelines and per-shape buffers, so a
/// repeated run allocates and compiles nothing.
const KEPT: usize = 8;

/// A WebGPU device with the library's pipelines (JS: `await Gpu.create()`).
#[wasm_bindgen]
pub struct Gpu {
    ctx: GpuContext,
    fma: RefCell<Vec<(FmaConfig, Rc<FmaAttention>)>>,
    dense: RefCell<Vec<(bool, Rc<DenseAttention>)>>,
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
            fma: RefCell::new(Vec::new()),
            dense: RefCell::new(Vec::new()),
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
    /// `{ levels, dispatches }`.
    #[wasm_bindgen(unchecked_return_type = "Plan")]
    pub fn plan(
        &self,
        #[wasm_bindgen(unchecked_param_type = "FmaOptions")] options: JsValue,
    ) -> Result<JsValue, JsError> {
        let opts = Options::from_js(options)?;
        let plan = self.fma_for(&opts)?.plan(opts.shape()?)?;
        let summary = PlanSummary {
            levels: plan.levels.count(),
            dispatches: plan.steps().len(),
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
        let shape = opts.shape()?;
        let fma = self.fma_for(&opts)?;
        let out = match opts.sequences()? {
            Some(seqs) => {
                fma.forward_varlen_async(&q, &k, &v, shape, &seqs, false)
                    .await?
            }
            None => fma.forward_async(&q, &k, &v, shape, false).await?,
        };
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
        let shape = opts.shape()?;
        if opts.grid.is_some() {
            // Dense attention is the same on a grid, but a grid that does not fit n (or a
            // causal grid) is refused as FMA refuses it.
            opts.config()?;
        }
        let dense = self.dense_for(opts.causal)?;
        let out = match opts.sequences()? {
            Some(seqs) => {
                dense
                    .forward_varlen_async(&q, &k, &v, shape, &seqs, false)
                    .await?
            }
            None => dense.forward_async(&q, &k, &v, shape, false).await?,
        };
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

    /// The prepared FMA of `opts`' configuration, made on first use.
    fn fma_for(&self, opts: &Options) -> Result<Rc<FmaAttention>, JsError> {
        let cfg = opts.config()?;
        let mut kept = self.fma.borrow_mut();
        if let Some((_, f)) = kept.iter().find(|(c, _)| *c == cfg) {
            return Ok(f.clone());
        }
        let f = Rc::new(FmaAttention::new(&self.ctx, cfg.clone())?);
        if kept.len() >= KEPT {
            kept.remove(0);
        }
        kept.push((cfg, f.clone()));
        Ok(f)
    }

    fn dense_for(&self, causal: bool) -> Result<Rc<DenseAttention>, JsError> {
        let mut kept = self.dense.borrow_mut();
        if let Some((_, d)) = kept.iter().find(|(c, _)| *c == causal) {
            return Ok(d.clone());
        }
        let d = Rc::new(DenseAttention::new(&self.ctx, causal)?);
        kept.push((causal, d.clone()));
        Ok(d)
    }
}
