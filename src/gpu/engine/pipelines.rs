//! Bind-group layouts (explicit, derived from the pass descriptors, built once per device) and
//! compute pipelines built once per (pass, specialisation) and looked up by key.

use std::collections::HashMap;
use std::sync::Mutex;

use crate::error::{FmaError, Result};
use crate::gpu::engine::passes::{bindings_for, desc, f16_only_bindings, Access, Binding};
use crate::gpu::engine::shaders::{compose_counting, compose_with};
use crate::gpu::engine::storage_types::f16_bindings;
use crate::plan::{Pass, Specialization};
use crate::storage::Storage;

fn entry(binding: u32, access: Access, dynamic: bool) -> wgpu::BindGroupLayoutEntry {
    let ty = match access {
        Access::Uniform => wgpu::BufferBindingType::Uniform,
        Access::Read => wgpu::BufferBindingType::Storage { read_only: true },
        Access::ReadWrite => wgpu::BufferBindingType::Storage { read_only: false },
    };
    wgpu::BindGroupLayoutEntry {
        binding,
        visibility: wgpu::ShaderStages::COMPUTE,
        ty: wgpu::BindingType::Buffer {
            ty,
            has_dynamic_offset: dynamic,
            min_binding_size: None,
        },
        count: None,
    }
}

/// Dispatches a record may have while rows are counted, and the bytes between their counters
/// (a storage offset alignment every adapter accepts).
pub(crate) const COUNTER_SLOTS: u64 = 1024;
pub(crate) const COUNTER_STRIDE: u64 = 256;

/// The per-dispatch row counters of a counting device (`GpuContext::counting_rows`, tests):
/// group 2 of every pipeline, dispatch k's (max, total) at byte k * COUNTER_STRIDE.
pub(crate) struct RowCounter {
    /// Read back by `GpuContext::take_row_counts`, native only.
    #[cfg_attr(target_arch = "wasm32", allow(dead_code))]
    pub buffer: wgpu::Buffer,
    pub layout: wgpu::BindGroupLayout,
    pub group: wgpu::BindGroup,
}

impl RowCounter {
    fn new(device: &wgpu::Device) -> Self {
        let buffer = device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("row counters"),
            size: COUNTER_SLOTS * COUNTER_STRIDE,
            usage: wgpu::BufferUsages::STORAGE
                | wgpu::BufferUsages::COPY_SRC
                | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        let layout = device.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
            label: Some("row counters"),
            entries: &[entry(0, Access::ReadWrite, true)],
        });
        let group = device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: Some("row counters"),
            layout: &layout,
            entries: &[wgpu::BindGroupEntry {
                binding: 0,
                resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                    buffer: &buffer,
                    offset: 0,
                    size: std::num::NonZeroU64::new(8),
                }),
            }],
        });
        Self {
            buffer,
            layout,
            group,
        }
    }
}

/// Layouts plus a pipeline cache for one device.
pub(crate) struct Kernels {
    /// Group 0 of every pass, from its descriptor.
    group0: HashMap<Pass, wgpu::BindGroupLayout>,
    /// Group 0 of the f16 variant of the passes that bind more under f16 storage
    /// (`passes::f16_only_bindings`: the dense forward's f32 partial O, the dense backward's
    /// f32 partial gradients), those whose storage buffers the device allows.
    group0_f16: HashMap<Pass, wgpu::BindGroupLayout>,
    /// The device's storage buffers per shader stage (the f16 dense dK/dV pass binds 10).
    max_storage_buffers: u32,
    /// Group 1 of the passes with a level selector, at a dynamic offset.
    pub level_select: wgpu::BindGroupLayout,
    /// Subgroup size the attention passes are composed for (`shaders::compose_for`); `None`
    /// without subgroup operations. Fixed per device, so it is not part of the cache key.
    pub subgroup: Option<u32>,
    /// Whether every subgroup of the device has at least `subgroup` invocations (false only
    /// when `ContextOptions::subgroup_size` composes for more than the adapter's smallest
    /// size): `shaders::compose_with` says which passes depend on it.
    pub subgroup_exact: bool,
    pipelines: Mutex<HashMap<(Pass, Specialization), wgpu::ComputePipeline>>,
    /// The sequence table bound when a dispatch has none (a batch of equal sequences, which
    /// the passes recognise by `params.seqs = 0` and never read it): 16 zero bytes.
    pub no_sequences: wgpu::Buffer,
    /// The f32 partial O bound when a dense f16 forward has one key chunk (its shader writes
    /// the partial only before a later chunk, `params.key_hi < params.n_kv`): 16 bytes, never
    /// touched.
    pub no_partial: wgpu::Buffer,
    /// A counting device's row counters (tests; `None` otherwise).
    pub counter: Option<RowCounter>,
}

/// The storage buffers (every binding but the uniforms) of `pass`'s variant for `storage`.
pub(crate) fn storage_buffers(pass: Pass, storage: Storage) -> u32 {
    let n = bindings_for(pass, storage)
        .iter()
        .filter(|b| b.access != Access::Uniform)
        .count();
    n as u32
}

impl Kernels {
    pub fn new(device: &wgpu::Device, subgroup: Option<u32>) -> Self {
        let layout = |pass: Pass, bindings: &[Binding]| {
            let entries: Vec<_> = bindings
                .iter()
                .map(|b| entry(b.binding, b.access, false))
                .collect();
            device.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
                label: Some(pass.name()),
                entries: &entries,
            })
        };
        let group0 = Pass::ALL
            .iter()
            .map(|&pass| (pass, layout(pass, desc(pass).bindings)))
            .collect();
        // A layout over the device's storage buffers per stage would be a validation error:
        // such a pass's f16 variant is refused with a typed error when asked for (`group0_for`).
        let max_storage_buffers = device.limits().max_storage_buffers_per_shader_stage;
        let group0_f16 = Pass::ALL
            .iter()
            .filter(|&&pass| !f16_only_bindings(pass).is_empty())
            .filter(|&&pass| storage_buffers(pass, Storage::F16) <= max_storage_buffers)
            .map(|&pass| (pass, layout(pass, &bindings_for(pass, Storage::F16))))
            .collect();
        let placeholder = |label| {
            device.create_buffer(&wgpu::BufferDescriptor {
                label: Some(label),
                size: 16,
                usage: wgpu::BufferUsages::STORAGE,
                mapped_at_creation: false,
            })
        };
        Self {
            group0,
            group0_f16,
            max_storage_buffers,
            level_select: device.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
                label: Some("level_select"),
                entries: &[entry(0, Access::Uniform, true)],
            }),
            subgroup,
            subgroup_exact: true,
            pipelines: Mutex::new(HashMap::new()),
            no_sequences: placeholder("no sequence table"),
            no_partial: placeholder("no partial O"),
            counter: None,
        }
    }

    /// The kernels of a device whose pipelines count the rows each invocation reads
    /// (`shaders::compose_counting`): tests of `plan::depth` only.
    pub fn counting(device: &wgpu::Device, subgroup: Option<u32>, subgroup_exact: bool) -> Self {
        Self {
            counter: Some(RowCounter::new(device)),
            subgroup_exact,
            ..Self::new(device, subgroup)
        }
    }

    /// Group 0 of `pass` (its descriptor's bindings: the f32 variant's, and the f16 one's
    /// where it binds nothing more).
    pub fn group0(&self, pass: Pass) -> Result<&wgpu::BindGroupLayout> {
        self.group0_for(pass, Storage::F32)
    }

    /// Group 0 of `pass`'s variant for `storage` (`passes::bindings_for`).
    pub fn group0_for(&self, pass: Pass, storage: Storage) -> Result<&wgpu::BindGroupLayout> {
        if storage == Storage::F16 && !f16_only_bindings(pass).is_empty() {
            return self
                .group0_f16
                .get(&pass)
                .ok_or_else(|| FmaError::LimitExceeded {
                    what: format!("the f16 variant of the {} pass", pass.name()),
                    requested: storage_buffers(pass, storage).into(),
                    max: self.max_storage_buffers.into(),
                    unit: "storage buffers per shader stage",
                    advice: "use f32 storage (Storage::F32) on this adapter: its f32 partial \
                             sums between dispatches need the extra bindings"
                        .into(),
                });
        }
        // Every pass of Pass::ALL has one; a pass missing from ALL is a bug the tests catch.
        self.group0.get(&pass).ok_or_else(|| FmaError::Gpu {
            stage: format!("binding the {} pass", pass.name()),
            message: "no bind-group layout (the pass is missing from Pass::ALL)".into(),
        })
    }

    /// The pipeline of `pass` specialised by `spec`, built on first use. Creation runs inside
    /// a validation error scope, so a shader the driver rejects is an error, not a panic.
    pub async fn pipeline(
        &self,
        device: &wgpu::Device,
        pass: Pass,
        spec: Specialization,
    ) -> Result<wgpu::ComputePipeline> {
        // A pass that binds no f16 tensor composes the same text in either storage: one
        // pipeline serves both (coarse passes, combines).
        let spec = match spec.storage {
            Storage::F16 if f16_bindings(pass).is_empty() => Specialization {
                storage: Storage::F32,
                ..spec
            },
            _ => spec,
        };
        let key = (pass, spec);
        if let Some(p) = self.pipelines.lock().map_err(poisoned)?.get(&key) {
            return Ok(p.clone());
        }
        let mut groups = vec![Some(self.group0_for(pass, spec.storage)?)];
        if desc(pass).level_select {
            groups.push(Some(&self.level_select));
        }
        if let Some(c) = &self.counter {
            groups.resize(2, None);
            groups.push(Some(&c.layout));
        }
        let scope = device.push_error_scope(wgpu::ErrorFilter::Validation);
        let source = match self.counter {
            Some(_) => compose_counting(pass, spec, self.subgroup, self.subgroup_exact),
            None => compose_with(pass, spec, self.subgroup, self.subgroup_exact),
        };
        let module = device.create_shader_module(wgpu::ShaderModuleDescriptor {
            label: Some(pass.name()),
            source: wgpu::ShaderSource::Wgsl(source.into()),
        });
        let layout = device.create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
            label: Some(pass.name()),
            bind_group_layouts: &groups,
            immediate_size: 0,
        });
        let pipeline = device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
            label: Some(pass.name()),
            layout: Some(&layout),
            module: &module,
            entry_point: Some("main"),
            compilation_options: Default::default(),
            cache: None,
        });
        if let Some(err) = scope.pop().await {
            return Err(FmaError::Gpu {
                stage: format!("building the {} pipeline ({spec:?})", pass.name()),
                message: err.to_string(),
            });
        }
        self.pipelines
            .lock()
            .map_err(poisoned)?
            .insert(key, pipeline.clone());
        Ok(pipeline)
    }
}

/// The error of a cache whose lock a panicking thread left poisoned.
pub(crate) fn poisoned<T>(_: std::sync::PoisonError<T>) -> FmaError {
    FmaError::Gpu {
        stage: "pipeline cache".into(),
        message: "a thread panicked while holding the cache lock".into(),
    }
}
