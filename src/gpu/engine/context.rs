//! Finding an adapter and making a device with negotiated limits, or wrapping a caller's own.

use std::sync::{Arc, Mutex};

use crate::error::{FmaError, Result};
use crate::gpu::engine::coop::{CoopMode, CoopOffer, CoopShape};
use crate::gpu::engine::pipelines::Kernels;
use crate::gpu::engine::profile::Profiler;

/// How to pick limits when the library creates the device itself.
#[derive(Clone, Copy, Debug, Default)]
pub struct ContextOptions {
    /// Ask only for what a browser grants (256 invocations per workgroup, 16 KiB workgroup
    /// memory, no f16): catches web-only failures on a native adapter.
    pub browser_limits: bool,
    /// Compose the subgroup kernels for subgroups of this many invocations instead of the
    /// adapter's smallest (a power of two from 4 to 128; needs [`wgpu::Features::SUBGROUP`],
    /// so not with `browser_limits`). For a device whose compute subgroups are wider than its
    /// minimum (some report 8 and run 16 or 32), composing for the width it runs lets the
    /// shared paths engage. Wherever a subgroup does not have exactly this many lanes the
    /// kernels take their per-invocation fallback: correct, slower (the tests use this to run
    /// the fallback on an adapter whose subgroups always match). Composed for more than the
    /// adapter's smallest size, the coarse dK~/dV~ pass runs its plain two-phase path (its
    /// subgroup walk keeps no fallback: `shaders::compose_with`).
    pub subgroup_size: Option<u32>,
    /// Tensor cores through cooperative matrices (native only; issue 29): with
    /// [`CoopMode::IfOffered`] or [`CoopMode::Required`] the device is created with
    /// `Features::EXPERIMENTAL_COOPERATIVE_MATRIX` (and `SHADER_F16`) where the adapter offers
    /// a fitting shape (`gpu::engine::coop::CoopOffer::choose`), and dense attention then runs
    /// `shaders/dense_coop.wgsl` (f16 inputs, f32 accumulators and softmax; errors of ~1e-3
    /// instead of ~1e-7). `Required` on an adapter without one is a typed error saying what it
    /// lacks. Off by default until the variant has passed `doctor` on a real GPU.
    pub cooperative_matrix: CoopMode,
}

/// A wgpu device and queue, the adapter they came from, and the limits the library may use.
/// Cheap to clone (everything inside is reference-counted); safe to share between threads.
#[derive(Clone)]
pub struct GpuContext {
    /// The device.
    pub device: wgpu::Device,
    /// Its queue.
    pub queue: wgpu::Queue,
    /// The adapter's name, backend, device type and driver.
    pub info: wgpu::AdapterInfo,
    /// The limits the device was created with: the only ones the library relies on.
    pub limits: wgpu::Limits,
    /// Set by the device-lost callback; every later call returns [`FmaError::DeviceLost`].
    lost: Arc<Mutex<Option<String>>>,
    /// Bind-group layouts and the pipeline cache of this device.
    pub(crate) kernels: Arc<Kernels>,
    /// The cooperative-matrix shape the dense forward runs on (`None`: the plain kernels).
    coop: Option<CoopShape>,
    /// Tests only: the cooperative-matrix kernel is the scalar emulation
    /// (`coop::compose_dense_coop_emulated`).
    pub(crate) coop_emulated: bool,
    /// The per-pass profiler, shared with every clone (`profile.rs`; off by default).
    pub(crate) profiler: Arc<Profiler>,
}

impl GpuContext {
    /// Finds an adapter (honouring `WGPU_BACKEND`, e.g. `vulkan`, `gl`, `metal`, `dx12`) and
    /// creates a device with every limit the library uses raised to what the adapter grants.
    /// Blocking; on the web use [`GpuContext::new_async`].
    #[cfg(not(target_arch = "wasm32"))]
    pub fn new() -> Result<Self> {
        pollster::block_on(Self::new_async(ContextOptions::default()))
    }

    /// Like [`GpuContext::new`], with options (blocking).
    #[cfg(not(target_arch = "wasm32"))]
    pub fn with_options(options: ContextOptions) -> Result<Self> {
        pollster::block_on(Self::new_async(options))
    }

    /// Finds an adapter and creates a device (async: works in the browser too). An adapter
    /// that cannot run the library's compute passes ([`compute_support`]: a GL 3.3 context,
    /// say) is never chosen when another can: natively the others are tried in the order
    /// discrete, integrated, virtual, CPU, other.
    pub async fn new_async(options: ContextOptions) -> Result<Self> {
        let instance =
            wgpu::Instance::new(wgpu::InstanceDescriptor::new_without_display_handle_from_env());
        let adapter = instance
            .request_adapter(&wgpu::RequestAdapterOptions {
                power_preference: wgpu::PowerPreference::HighPerformance,
                ..Default::default()
            })
            .await
            .map_err(no_adapter)?;
        #[cfg(not(target_arch = "wasm32"))]
        let adapter = match adapter_support(&adapter) {
            Ok(()) => adapter,
            Err(why) => capable_adapter(&instance).await.ok_or_else(|| {
                FmaError::NoAdapter(format!(
                    ": the adapter found, {}, cannot run compute passes ({why}), and no other \
                     can; install a Vulkan, Metal or DX12 driver",
                    adapter.get_info().name
                ))
            })?,
        };
        Self::from_adapter(&adapter, options).await
    }

    /// Creates a device on `adapter`, negotiating limits (see [`negotiate_limits`]).
    pub async fn from_adapter(adapter: &wgpu::Adapter, options: ContextOptions) -> Result<Self> {
        let info = adapter.get_info();
        if let Some(size) = options.subgroup_size {
            check_subgroup_size(size, adapter.features(), options)?;
        }
        let limits = negotiate_limits(&adapter.limits(), options);
        let coop = coop_shape(adapter, options)?;
        let mut required_features = negotiate_features(adapter.features(), options);
        let mut experimental_features = wgpu::ExperimentalFeatures::disabled();
        if coop.is_some() {
            required_features |= crate::gpu::engine::coop::features();
            // SAFETY: wgpu 30 gates cooperative matrices as experimental (bugs in its
            // implementation may be undefined behaviour); asked for only by an explicit
            // `ContextOptions::cooperative_matrix`, documented as experimental there.
            experimental_features = unsafe { wgpu::ExperimentalFeatures::enabled() };
        }
        let (device, queue) = adapter
            .request_device(&wgpu::DeviceDescriptor {
                label: Some("multipole-attn"),
                required_features,
                required_limits: limits.clone(),
                experimental_features,
                ..Default::default()
            })
            .await
            .map_err(|e| FmaError::RequestDevice {
                adapter: info.name.clone(),
                reason: e.to_string(),
            })?;
        let mut ctx = Self::from_device(info, device, queue);
        if let Some(size) = options.subgroup_size {
            let mut kernels = Kernels::new(&ctx.device, Some(size));
            // Subgroups may have fewer lanes than composed for: the passes that need at least
            // SG lanes take their other path (`shaders::compose_with`).
            kernels.subgroup_exact = size <= ctx.info.subgroup_min_size;
            ctx.kernels = Arc::new(kernels);
        }
        ctx.coop = coop;
        Ok(ctx)
    }

    /// This context with dense attention on the cooperative-matrix kernel emulated in scalar
    /// WGSL (`coop::compose_dense_coop_emulated`; matrices of `size` = 8 or 16, workgroups of
    /// 8): the kernel's logic checked on an adapter without cooperative matrices. Tests only:
    /// the emulation computes every matrix in every invocation.
    #[doc(hidden)]
    pub fn emulating_cooperative_matrix(mut self, size: u32) -> Self {
        self.coop = Some(CoopShape { size, subgroup: 8 });
        self.coop_emulated = true;
        self
    }

    /// The cooperative-matrix shape dense attention runs on, when
    /// [`ContextOptions::cooperative_matrix`] asked for one and the adapter offers it (`None`
    /// on a caller's own device: wgpu lists the shapes on the adapter only).
    pub fn cooperative_matrix(&self) -> Option<CoopShape> {
        self.coop
    }

    /// This context with pipelines that count the rows each invocation reads
    /// (`shaders::compose_counting`; pipelines built before are forgotten): for the tests that
    /// check `plan::depth` against what the shaders walk. Not for production use: every
    /// counted read is an atomic.
    #[doc(hidden)]
    pub fn counting_rows(mut self) -> Self {
        let (subgroup, exact) = (self.kernels.subgroup, self.kernels.subgroup_exact);
        self.kernels = Arc::new(Kernels::counting(&self.device, subgroup, exact));
        self
    }

    /// A counting context's (max, total) rows of each dispatch of the records since the last
    /// call, by the dispatch's index in its record (the later record wins where several
    /// overlap), and resets them; empty for a context that does not count.
    #[doc(hidden)]
    #[cfg(not(target_arch = "wasm32"))]
    pub fn take_row_counts(&self) -> Result<Vec<[u32; 2]>> {
        use crate::gpu::engine::pipelines::{COUNTER_SLOTS, COUNTER_STRIDE};
        let Some(c) = &self.kernels.counter else {
            return Ok(Vec::new());
        };
        let bytes = COUNTER_SLOTS * COUNTER_STRIDE;
        let staging = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("row counters readback"),
            size: bytes,
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        let mut enc = self
            .device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor { label: None });
        enc.copy_buffer_to_buffer(&c.buffer, 0, &staging, 0, bytes);
        enc.clear_buffer(&c.buffer, 0, None);
        self.queue.submit([enc.finish()]);
        let words = pollster::block_on(crate::gpu::engine::buffers::read_f32(
            &self.device,
            &staging,
            bytes,
        ))?;
        let per = (COUNTER_STRIDE / 4) as usize;
        Ok(words
            .chunks(per)
            .map(|w| [w[0].to_bits(), w[1].to_bits()])
            .collect())
    }

    /// Wraps a caller's own device and queue. The library then uses `device.limits()`, sets
    /// the device-lost callback, and replaces wgpu's panicking handler of errors outside an
    /// error scope by one that logs them (set your own afterwards if you need another).
    pub fn from_device(info: wgpu::AdapterInfo, device: wgpu::Device, queue: wgpu::Queue) -> Self {
        let lost = Arc::new(Mutex::new(None));
        let flag = lost.clone();
        device.set_device_lost_callback(move |reason, msg| {
            if let Ok(mut l) = flag.lock() {
                *l = Some(format!("{reason:?}: {msg}"));
            }
        });
        // wgpu's default for an error outside an error scope is to panic. The library records
        // its work inside scopes; what still escapes them (calls on a device that is being
        // lost) is logged instead, and the call that made it returns a typed error.
        device.on_uncaptured_error(Arc::new(|e| log::error!("wgpu error outside a scope: {e}")));
        let limits = device.limits();
        let kernels = Arc::new(Kernels::new(&device, subgroup_size(&info, &device)));
        Self {
            kernels,
            device,
            queue,
            info,
            limits,
            lost,
            coop: None,
            coop_emulated: false,
            profiler: Arc::new(Profiler::default()),
        }
    }

    /// Starts timing every dispatch the library records on this context and its clones, up
    /// to `dispatches` of them (at most 2048), until [`GpuContext::take_profile`]: a GPU
    /// timestamp before and after each, labelled by pass and level (`gpu::engine::profile`).
    /// For finding which pass of a plan takes the time; not for production use (timestamps
    /// between dispatches may keep a GPU from overlapping them). Needs a device with
    /// `TIMESTAMP_QUERY | TIMESTAMP_QUERY_INSIDE_PASSES` (the library asks for them where
    /// the adapter offers them); a typed error elsewhere.
    pub fn start_profiling(&self, dispatches: u32) -> Result<()> {
        self.profiler.start(&self.device, dispatches)
    }

    /// Stops profiling and returns the time of every dispatch recorded since
    /// [`GpuContext::start_profiling`], in recording order, and how many dispatches were
    /// recorded past its capacity (untimed). Call after the timed work has been submitted.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn take_profile(&self) -> Result<(Vec<crate::gpu::engine::profile::PassTime>, u32)> {
        self.profiler.take(&self.device, &self.queue)
    }

    /// Returns [`FmaError::DeviceLost`] once the device has been lost.
    pub fn check_alive(&self) -> Result<()> {
        // wgpu runs the device-lost callback from a poll: a non-blocking one makes a loss seen
        // now rather than at the next readback (the browser runs callbacks by itself).
        #[cfg(not(target_arch = "wasm32"))]
        let _ = self.device.poll(wgpu::PollType::Poll);
        match self.lost.lock().ok().and_then(|l| l.clone()) {
            Some(msg) => Err(FmaError::DeviceLost(msg)),
            None => Ok(()),
        }
    }

    /// Whether the device can time GPU work with timestamps written between the commands of an
    /// encoder (`CommandEncoder::write_timestamp`; both timestamp features enabled). True on
    /// a device the library created when the adapter offers them; on a caller's device, when
    /// the caller enabled them.
    pub fn encoder_timestamps(&self) -> bool {
        self.device.features().contains(
            wgpu::Features::TIMESTAMP_QUERY | wgpu::Features::TIMESTAMP_QUERY_INSIDE_ENCODERS,
        )
    }

    /// The subgroup size the attention kernels were built for on this device (they share
    /// staged tiles through subgroup broadcasts; see `shaders::compose_for`), or `None` when
    /// the device has no `Features::SUBGROUP` and they use plain workgroup-memory loads.
    pub fn subgroup_kernels(&self) -> Option<u32> {
        self.kernels.subgroup
    }

    /// Largest workgroup the library's kernels may use on this device (at most 256, the
    /// browser's limit, which is also where the kernels' tiles stop paying off).
    pub fn max_workgroup(&self) -> u32 {
        self.limits
            .max_compute_invocations_per_workgroup
            .min(self.limits.max_compute_workgroup_size_x)
            .min(256)
    }
}

/// The cooperative-matrix shape `options` ask for on `adapter`: `None` when not asked or (with
/// [`CoopMode::IfOffered`]) not offered; an error saying what the adapter lacks with
/// [`CoopMode::Required`].
fn coop_shape(adapter: &wgpu::Adapter, options: ContextOptions) -> Result<Option<CoopShape>> {
    if options.cooperative_matrix == CoopMode::Off {
        return Ok(None);
    }
    match CoopOffer::of(adapter).choose() {
        Ok(shape) => Ok(Some(shape)),
        Err(why) if options.cooperative_matrix == CoopMode::Required => Err(
            crate::gpu::engine::coop::required_error(&adapter.get_info().name, why),
        ),
        Err(why) => {
            log::info!("cooperative matrices not used: the adapter {why}");
            Ok(None)
        }
    }
}

/// What to do when no adapter was found, said for the platform the library runs on.
#[cfg(not(target_arch = "wasm32"))]
fn no_adapter(e: wgpu::RequestAdapterError) -> FmaError {
    let backend = std::env::var("WGPU_BACKEND")
        .map(|b| format!(" for WGPU_BACKEND={b}"))
        .unwrap_or_default();
    FmaError::NoAdapter(format!(
        "{backend} ({e}); install a Vulkan, Metal or DX12 driver (on Debian: apt-get install mesa-vulkan-drivers libvulkan1)"
    ))
}

/// What to do when no adapter was found, said for the platform the library runs on.
#[cfg(target_arch = "wasm32")]
fn no_adapter(e: wgpu::RequestAdapterError) -> FmaError {
    // wgpu's own text lists every native backend as "not compiled in": only noise here.
    log::debug!("request_adapter: {e}");
    FmaError::NoAdapter(
        ": this browser exposes no WebGPU adapter; use one with WebGPU enabled (a recent \
         Chrome, Edge or Safari; headless Chromium needs --enable-unsafe-webgpu)"
            .into(),
    )
}

/// The limits the library asks for: WebGPU's defaults (or the downlevel defaults on an adapter
/// below them, such as some GL drivers), with the ones FMA needs raised to what the adapter
/// grants (browser-safe caps when `options.browser_limits`).
pub fn negotiate_limits(adapter: &wgpu::Limits, options: ContextOptions) -> wgpu::Limits {
    let mut l = wgpu::Limits {
        max_storage_buffer_binding_size: adapter.max_storage_buffer_binding_size,
        max_buffer_size: adapter.max_buffer_size,
        max_compute_workgroup_storage_size: adapter.max_compute_workgroup_storage_size,
        max_compute_invocations_per_workgroup: adapter.max_compute_invocations_per_workgroup,
        max_compute_workgroup_size_x: adapter.max_compute_workgroup_size_x,
        max_compute_workgroups_per_dimension: adapter.max_compute_workgroups_per_dimension,
        max_storage_buffers_per_shader_stage: adapter.max_storage_buffers_per_shader_stage,
        ..if wgpu::Limits::default().check_limits(adapter) {
            wgpu::Limits::default()
        } else {
            wgpu::Limits::downlevel_defaults()
        }
    };
    if options.browser_limits {
        let web = wgpu::Limits::default();
        l.max_compute_invocations_per_workgroup = l.max_compute_invocations_per_workgroup.min(256);
        l.max_compute_workgroup_size_x = l.max_compute_workgroup_size_x.min(256);
        l.max_compute_workgroup_storage_size = l
            .max_compute_workgroup_storage_size
            .min(web.max_compute_workgroup_storage_size);
        l.max_storage_buffer_binding_size = l
            .max_storage_buffer_binding_size
            .min(web.max_storage_buffer_binding_size);
    }
    l
}

/// The optional features the library asks for, only those `adapter` offers (none is required):
/// GPU timestamps ([`wgpu::Features::TIMESTAMP_QUERY`], and
/// [`wgpu::Features::TIMESTAMP_QUERY_INSIDE_ENCODERS`] so a caller can time work recorded with
/// [`crate::gpu::Attention::forward`] with [`crate::gpu::Encode`] between `CommandEncoder::write_timestamp` calls), and
/// [`wgpu::Features::SUBGROUP`], with which the attention passes share their staged key tiles
/// through subgroup shuffles (2-3x faster on lavapipe, docs/perf.md). Not subgroups with
/// `options.browser_limits`: browsers' WebGPU does not expose them to wgpu. And
/// [`wgpu::Features::SHADER_F16`] for [`crate::Storage::F16`] (not under `browser_limits`).
pub fn negotiate_features(adapter: wgpu::Features, options: ContextOptions) -> wgpu::Features {
    // Inside passes too: the per-pass profiler (`GpuContext::start_profiling`).
    let mut wanted = wgpu::Features::TIMESTAMP_QUERY
        | wgpu::Features::TIMESTAMP_QUERY_INSIDE_ENCODERS
        | wgpu::Features::TIMESTAMP_QUERY_INSIDE_PASSES;
    if !options.browser_limits {
        wanted |= wgpu::Features::SUBGROUP;
    }
    // f16 storage (issue 29): requested wherever the adapter offers it natively; a browser
    // offers it only through its own adapter (wasm), never under the emulated browser_limits
    // (SwiftShader has none), so those devices stay f32-only.
    if !options.browser_limits || cfg!(target_arch = "wasm32") {
        wanted |= wgpu::Features::SHADER_F16;
    }
    adapter & wanted
}

/// The subgroup size the kernels are composed for: the adapter's smallest, when the device has
/// [`wgpu::Features::SUBGROUP`] and the size is one the kernels handle (a power of two from 4
/// to 128). The kernels check at run time that a subgroup really has that many lanes and fall
/// back to plain loads where not, so a device whose subgroups vary in size stays correct.
fn subgroup_size(info: &wgpu::AdapterInfo, device: &wgpu::Device) -> Option<u32> {
    let size = info.subgroup_min_size;
    (device.features().contains(wgpu::Features::SUBGROUP)
        && size.is_power_of_two()
        && (4..=128).contains(&size))
    .then_some(size)
}

/// Whether the kernels can be composed for subgroups of `size` on a device made from an
/// adapter with `features` and `options` ([`ContextOptions::subgroup_size`]).
fn check_subgroup_size(size: u32, features: wgpu::Features, options: ContextOptions) -> Result<()> {
    if !(size.is_power_of_two() && (4..=128).contains(&size)) {
        return Err(FmaError::InvalidConfig {
            what: "subgroup_size",
            value: size.to_string(),
            allowed: "a power of two from 4 to 128".into(),
        });
    }
    if !negotiate_features(features, options).contains(wgpu::Features::SUBGROUP) {
        return Err(FmaError::InvalidConfig {
            what: "subgroup_size",
            value: size.to_string(),
            allowed: "none: the device has no subgroups (the adapter does not offer \
                      Features::SUBGROUP, or browser_limits is set)"
                .into(),
        });
    }
    Ok(())
}

/// What `multipole-attn info` prints about one adapter.
#[derive(Clone, Debug)]
pub struct AdapterSummary {
    /// Name, backend, device type, driver.
    pub info: wgpu::AdapterInfo,
    /// The adapter's limits.
    pub limits: wgpu::Limits,
    /// The adapter's features.
    pub features: wgpu::Features,
    /// Why the library cannot run on it ([`compute_support`]), if so.
    pub unsupported: Option<String>,
    /// The cooperative-matrix shapes it offers (`Adapter::cooperative_matrix_properties`;
    /// empty for none).
    pub cooperative_matrix: Vec<wgpu::CooperativeMatrixProperties>,
}

impl AdapterSummary {
    /// What it offers the cooperative-matrix kernels ([`CoopOffer::choose`] says whether
    /// they would run and what it lacks if not).
    pub fn coop_offer(&self) -> CoopOffer {
        CoopOffer {
            feature: self
                .features
                .contains(wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX),
            f16: self.features.contains(wgpu::Features::SHADER_F16),
            shapes: self.cooperative_matrix.clone(),
            subgroup: (self.info.subgroup_min_size, self.info.subgroup_max_size),
        }
    }
}

impl std::fmt::Display for AdapterSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} ({:?}, {:?})",
            self.info.name, self.info.backend, self.info.device_type
        )
    }
}

/// What the library needs of an adapter to run anything: compute shaders and the 8 storage
/// bindings per stage of its widest passes (WebGPU's default), and 64 invocations per
/// workgroup. `Err` names what is missing, in one line (`info` and `doctor` print it): a GL
/// 3.3 context, which wgpu lists beside Vulkan on NVIDIA's drivers, has no compute shaders.
pub fn compute_support(
    downlevel: &wgpu::DownlevelCapabilities,
    limits: &wgpu::Limits,
) -> std::result::Result<(), String> {
    let mut missing = Vec::new();
    if !downlevel
        .flags
        .contains(wgpu::DownlevelFlags::COMPUTE_SHADERS)
    {
        missing.push("compute shaders".to_string());
    }
    if limits.max_storage_buffers_per_shader_stage < 8 {
        missing.push(format!(
            "8 storage buffers per shader stage (has {})",
            limits.max_storage_buffers_per_shader_stage
        ));
    }
    if limits.max_compute_invocations_per_workgroup < 64 {
        missing.push(format!(
            "64 invocations per workgroup (has {})",
            limits.max_compute_invocations_per_workgroup
        ));
    }
    if missing.is_empty() {
        Ok(())
    } else {
        Err(format!("lacks {}", missing.join(", ")))
    }
}

/// [`compute_support`] of an adapter.
pub fn adapter_support(adapter: &wgpu::Adapter) -> std::result::Result<(), String> {
    compute_support(&adapter.get_downlevel_capabilities(), &adapter.limits())
}

/// The first adapter of `instance` that can run the library, by device type (discrete,
/// integrated, virtual, CPU, other).
#[cfg(not(target_arch = "wasm32"))]
async fn capable_adapter(instance: &wgpu::Instance) -> Option<wgpu::Adapter> {
    use wgpu::DeviceType::*;
    let rank = |t: wgpu::DeviceType| match t {
        DiscreteGpu => 0,
        IntegratedGpu => 1,
        VirtualGpu => 2,
        Cpu => 3,
        Other => 4,
    };
    let mut found: Vec<wgpu::Adapter> = instance
        .enumerate_adapters(wgpu::Backends::all())
        .await
        .into_iter()
        .filter(|a| adapter_support(a).is_ok())
        .collect();
    found.sort_by_key(|a| rank(a.get_info().device_type));
    found.into_iter().next()
}

/// Every adapter wgpu finds on every backend (ignores `WGPU_BACKEND`).
#[cfg(not(target_arch = "wasm32"))]
pub fn all_adapters() -> Vec<wgpu::Adapter> {
    let instance = wgpu::Instance::new(wgpu::InstanceDescriptor {
        backends: wgpu::Backends::all(),
        ..wgpu::InstanceDescriptor::new_without_display_handle()
    });
    pollster::block_on(instance.enumerate_adapters(wgpu::Backends::all()))
}

/// A report on every adapter wgpu finds on every backend (ignores `WGPU_BACKEND`).
#[cfg(not(target_arch = "wasm32"))]
pub fn list_adapters() -> Vec<AdapterSummary> {
    all_adapters()
        .into_iter()
        .map(|a| AdapterSummary {
            info: a.get_info(),
            limits: a.limits(),
            features: a.features(),
            unsupported: adapter_support(&a).err(),
            cooperative_matrix: a.cooperative_matrix_properties(),
        })
        .collect()
}
