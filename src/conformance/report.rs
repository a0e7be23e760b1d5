//! The result of the conformance suite as one document, the same natively
//! (`multipole-attn doctor --json`) and in the browser (the page's "Test this GPU"), so that
//! results from many machines and browsers can be collected and compared.

use serde::Serialize;

use super::{run_suite_with_clock, suite, CaseResult, ATOL, RTOL};
use crate::gpu::GpuContext;

/// Every adapter's result, with the suite's size and bound.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    /// The library's version (`CARGO_PKG_VERSION`).
    pub version: String,
    /// Cases per adapter.
    pub cases: usize,
    /// The bound |gpu - reference| <= atol + rtol |reference|.
    pub atol: f64,
    /// Relative part of the bound.
    pub rtol: f64,
    /// One entry per adapter, in the order they ran.
    pub adapters: Vec<AdapterReport>,
}

/// One adapter's result.
#[derive(Clone, Debug, Serialize)]
pub struct AdapterReport {
    /// The adapter's name.
    pub adapter: String,
    /// Its backend (`Vulkan`, `Gl`, `Metal`, `Dx12`, `BrowserWebGpu`).
    pub backend: String,
    /// `DiscreteGpu`, `IntegratedGpu`, `Cpu`, ...
    pub device_type: String,
    /// The driver's name and version, as far as the backend tells.
    pub driver: String,
    /// Which attention kernels ran, and so were checked: `subgroup <size>` or `plain`
    /// (`-` when no device could be made).
    pub kernels: String,
    /// Cases within the bound.
    pub passed: usize,
    /// Cases outside it, or whose run failed (every case when no device could be made).
    pub failed: usize,
    /// The largest error over all cases (`null` in JSON when a run failed or gave NaN).
    pub worst_error: f64,
    /// Wall-clock seconds for the adapter, device creation and shader compilation included.
    pub seconds: f64,
    /// Why no device could be made on the adapter, if so.
    pub error: Option<String>,
    /// Why the library cannot run on the adapter at all (`gpu::compute_support`: no compute
    /// shaders, too few storage bindings), if so: the adapter was not tested, and counts as
    /// neither passed nor failed.
    pub unsupported: Option<String>,
    /// Every case, in the suite's order (empty when no device could be made).
    pub results: Vec<CaseResult>,
}

impl Report {
    /// The report of these adapters' runs.
    pub fn new(adapters: Vec<AdapterReport>) -> Self {
        Self {
            version: env!("CARGO_PKG_VERSION").into(),
            cases: suite().len(),
            atol: ATOL,
            rtol: RTOL,
            adapters,
        }
    }

    /// Whether every adapter that can run compute passes passed every case.
    pub fn passed(&self) -> bool {
        self.adapters
            .iter()
            .all(|a| a.failed == 0 && a.error.is_none())
    }

    /// The report as pretty-printed JSON (non-finite errors become `null`).
    pub fn to_json(&self) -> String {
        // Serializing plain structs of strings and numbers into a String cannot fail.
        serde_json::to_string_pretty(self).unwrap_or_default()
    }
}

impl AdapterReport {
    /// An adapter without results yet: its identity from `info`.
    fn identify(info: &wgpu::AdapterInfo) -> Self {
        Self {
            adapter: info.name.clone(),
            backend: format!("{:?}", info.backend),
            device_type: format!("{:?}", info.device_type),
            driver: format!("{} {}", info.driver, info.driver_info)
                .trim()
                .to_string(),
            kernels: "-".into(),
            passed: 0,
            failed: 0,
            worst_error: 0.0,
            seconds: 0.0,
            error: None,
            unsupported: None,
            results: Vec::new(),
        }
    }

    /// The adapter `info` that cannot run compute passes (`why`): not tested, no case counted.
    pub fn unsupported(info: &wgpu::AdapterInfo, why: String) -> Self {
        Self {
            unsupported: Some(why),
            ..Self::identify(info)
        }
    }

    /// The adapter `info` on which no device could be made (`error` says why): every case
    /// counts as failed.
    pub fn no_device(info: &wgpu::AdapterInfo, error: String, seconds: f64) -> Self {
        Self {
            failed: suite().len(),
            worst_error: f64::INFINITY,
            seconds,
            error: Some(error),
            ..Self::identify(info)
        }
    }

    /// Runs the suite on `ctx`; `now` is a clock in seconds (the browser has no
    /// `std::time::Instant`) and `progress(done, total, result)` is called after every case.
    pub async fn run(
        ctx: &GpuContext,
        now: &dyn Fn() -> f64,
        mut progress: impl FnMut(usize, usize, &CaseResult),
    ) -> Self {
        let start = now();
        let total = suite().len();
        let mut done = 0;
        let results = run_suite_with_clock(ctx, now, |r| {
            done += 1;
            progress(done, total, r);
        })
        .await;
        let failed = results.iter().filter(|r| !r.passed).count();
        Self {
            kernels: kernels_name(ctx),
            passed: results.len() - failed,
            failed,
            worst_error: results.iter().map(|r| r.max_err).fold(0.0, f64::max),
            seconds: now() - start,
            results,
            ..Self::identify(&ctx.info)
        }
    }
}

/// Which attention kernels `ctx` runs: `subgroup <size>` or `plain`, and `, dense on
/// cooperative matrices MxNxK` where it has them.
pub fn kernels_name(ctx: &GpuContext) -> String {
    let base = match ctx.subgroup_kernels() {
        Some(sg) => format!("subgroup {sg}"),
        None => "plain".into(),
    };
    match ctx.cooperative_matrix() {
        Some(c) => format!("{base}, dense on cooperative matrices {0}x{0}x{0}", c.size),
        None => base,
    }
}
