//! Bind-group layouts (explicit, built once per device) and compute pipelines built once per
//! (pass, specialisation) and looked up by key.

use std::collections::HashMap;
use std::sync::Mutex;

use crate::error::{FmaError, Result};
use crate::gpu::shaders::{compose_for, Pass, Specialization};

fn entry(binding: u32, ty: wgpu::BufferBindingType, dynamic: bool) -> wgpu::BindGroupLayoutEntry {
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

const UNIFORM: wgpu::BufferBindingType = wgpu::BufferBindingType::Uniform;
const READ: wgpu::BufferBindingType = wgpu::BufferBindingType::Storage { read_only: true };
const WRITE: wgpu::BufferBindingType = wgpu::BufferBindingType::Storage { read_only: false };

/// The bind-group layouts of every pass (binding numbers as in the WGSL files).
pub(crate) struct Layouts {
    /// fine_attention: params, q, k, v, coarse_k, coarse_v, out, lse.
    pub fine: wgpu::BindGroupLayout,
    /// dense_attention: params, q, k, v, out, lse (bindings 0-3, 6-7).
    pub dense: wgpu::BindGroupLayout,
    /// downsample group 0: params, k, v, q, w, b, coarse_k, coarse_v, coarse_q.
    pub downsample: wgpu::BindGroupLayout,
    /// coarse_attention: params, coarse_q, coarse_k, coarse_v, partial o~, partial lse~
    /// (bindings 0-1, 4-7).
    pub coarse: wgpu::BindGroupLayout,
    /// upsample_merge: params, partial o~, partial lse~, out, lse (bindings 0-2, 6-7).
    pub merge: wgpu::BindGroupLayout,
    /// group 1 of the per-level passes (downsample, coarse attention, merge, every backward
    /// pass): the level selector at a dynamic offset.
    pub level_select: wgpu::BindGroupLayout,
    /// group 0 of each backward pass (`backward_bindings.rs`).
    pub backward: Vec<(Pass, wgpu::BindGroupLayout)>,
}

impl Layouts {
    /// Group 0 of a backward pass.
    pub fn backward(&self, pass: Pass) -> Option<&wgpu::BindGroupLayout> {
        self.backward
            .iter()
            .find(|(p, _)| *p == pass)
            .map(|(_, l)| l)
    }
}

impl Layouts {
    fn new(device: &wgpu::Device) -> Self {
        let make = |label, entries: &[wgpu::BindGroupLayoutEntry]| {
            device.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
                label: Some(label),
                entries,
            })
        };
        let fine: Vec<_> = [UNIFORM, READ, READ, READ, READ, READ, WRITE, WRITE]
            .iter()
            .enumerate()
            .map(|(i, t)| entry(i as u32, *t, false))
            .collect();
        let dense: Vec<_> = [
            (0, UNIFORM),
            (1, READ),
            (2, READ),
            (3, READ),
            (6, WRITE),
            (7, WRITE),
        ]
        .iter()
        .map(|&(i, t)| entry(i, t, false))
        .collect();
        let down: Vec<_> = [UNIFORM, READ, READ, READ, READ, READ, WRITE, WRITE, WRITE]
            .iter()
            .enumerate()
            .map(|(i, t)| entry(i as u32, *t, false))
            .collect();
        let sparse = |bindings: &[(u32, wgpu::BufferBindingType)]| -> Vec<_> {
            bindings.iter().map(|&(i, t)| entry(i, t, false)).collect()
        };
        let coarse = sparse(&[
            (0, UNIFORM),
            (1, READ),
            (4, READ),
            (5, READ),
            (6, WRITE),
            (7, WRITE),
        ]);
        let merge = sparse(&[(0, UNIFORM), (1, READ), (2, READ), (6, WRITE), (7, WRITE)]);
        Self {
            fine: make("fine_attention", &fine),
            dense: make("dense_attention", &dense),
            downsample: make("downsample", &down),
            coarse: make("coarse_attention", &coarse),
            merge: make("upsample_merge", &merge),
            level_select: make("level_select", &[entry(0, UNIFORM, true)]),
            backward: crate::gpu::backward_bindings::layouts(device),
        }
    }
}

/// Layouts plus a pipeline cache for one device.
pub(crate) struct Kernels {
    pub layouts: Layouts,
    /// Subgroup size the attention passes are composed for (`shaders::compose_for`); `None`
    /// without subgroup operations. Fixed per device, so it is not part of the cache key.
    pub subgroup: Option<u32>,
    pipelines: Mutex<HashMap<(Pass, Specialization), wgpu::ComputePipeline>>,
}

impl Kernels {
    pub fn new(device: &wgpu::Device, subgroup: Option<u32>) -> Self {
        Self {
            layouts: Layouts::new(device),
            subgroup,
            pipelines: Mutex::new(HashMap::new()),
        }
    }

    /// The pipeline of `pass` specialised by `spec`, built on first use. Creation runs inside
    /// a validation error scope, so a shader the driver rejects is an error, not a panic.
    pub async fn pipeline(
        &self,
        device: &wgpu::Device,
        pass: Pass,
        spec: Specialization,
    ) -> Result<wgpu::ComputePipeline> {
        let key = (pass, spec);
        if let Some(p) = self.pipelines.lock().map_err(poisoned)?.get(&key) {
            return Ok(p.clone());
        }
        let groups: Vec<Option<&wgpu::BindGroupLayout>> = match pass {
            Pass::FineAttention => vec![Some(&self.layouts.fine)],
            Pass::DenseAttention => vec![Some(&self.layouts.dense)],
            Pass::Downsample => vec![
                Some(&self.layouts.downsample),
                Some(&self.layouts.level_select),
            ],
            Pass::CoarseAttention => {
                vec![Some(&self.layouts.coarse), Some(&self.layouts.level_select)]
            }
            Pass::UpsampleMerge => {
                vec![Some(&self.layouts.merge), Some(&self.layouts.level_select)]
            }
            backward => vec![
                Some(
                    self.layouts
                        .backward(backward)
                        .ok_or_else(|| FmaError::Gpu {
                            stage: format!("building the {} pipeline", pass.name()),
                            message: "no bind-group layout for this pass".into(),
                        })?,
                ),
                Some(&self.layouts.level_select),
            ],
        };
        let scope = device.push_error_scope(wgpu::ErrorFilter::Validation);
        let source = compose_for(pass, spec, self.subgroup);
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

pub(crate) fn poisoned<T>(_: std::sync::PoisonError<T>) -> FmaError {
    FmaError::Gpu {
        stage: "pipeline cache".into(),
        message: "a thread panicked while holding the cache lock".into(),
    }
}
