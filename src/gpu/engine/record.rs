//! The one record loop: a plan's steps into a compute pass. Group 0 of each step's pass is
//! bound from the executor's [`Resources`] by the roles in the pass's descriptor, group 1
//! (passes with a level selector) to the step's [`LevelSelect`] slot. No pass is special-cased
//! here: what a pass binds is its descriptor's business, which buffers fill the roles the
//! executor's.

use std::collections::HashMap;

use crate::error::{FmaError, Result};
use crate::gpu::engine::buffers::uniform;
use crate::gpu::engine::context::GpuContext;
use crate::gpu::engine::params::{to_uniform_bytes, LevelSelect};
use crate::gpu::engine::passes::{bindings_for, desc, Role};
use crate::gpu::engine::pipelines::{COUNTER_SLOTS, COUNTER_STRIDE};
use crate::gpu::engine::tensors::{GpuTensors, SavedTensors};
use crate::plan::{Dispatch, Pass, Specialization};

/// The buffers an executor supplies for one record, by role. A pass whose descriptor names a
/// role not supplied is a typed error, not a wrong binding.
#[derive(Default)]
pub(crate) struct Resources<'a> {
    buffers: HashMap<Role, wgpu::BufferBinding<'a>>,
}

impl<'a> Resources<'a> {
    /// `buf` (all of it) fills `role`.
    pub fn with(mut self, role: Role, buf: &'a wgpu::Buffer) -> Self {
        self.buffers.insert(role, buf.as_entire_buffer_binding());
        self
    }

    /// A saved forward's Q, K, V, O and LSE fill their roles (what every backward pass reads).
    pub fn with_saved(self, saved: &'a SavedTensors) -> Self {
        self.with(Role::Q, &saved.q)
            .with(Role::K, &saved.k)
            .with(Role::V, &saved.v)
            .with(Role::Out, &saved.o)
            .with(Role::Lse, &saved.lse)
    }

    /// Bytes `[offset, offset + size)` of `buf` fill `role` (offset a multiple of the
    /// adapter's storage offset alignment, at most 256: 256-byte multiples always are).
    pub fn with_range(mut self, role: Role, buf: &'a wgpu::Buffer, offset: u64, size: u64) -> Self {
        self.buffers.insert(
            role,
            wgpu::BufferBinding {
                buffer: buf,
                offset,
                size: std::num::NonZeroU64::new(size),
            },
        );
        self
    }

    /// Q, K, V, O of `t` and `lse` (the caller's, or a scratch one when it wants none).
    pub fn tensors(self, t: &GpuTensors<'a>, lse: &'a wgpu::Buffer) -> Self {
        self.with(Role::Q, t.q)
            .with(Role::K, t.k)
            .with(Role::V, t.v)
            .with(Role::Out, t.out)
            .with(Role::Lse, lse)
    }

    /// What group 0 of `pass` would be made from: each binding's buffer, offset and size, in
    /// binding order (`None` where no buffer fills the role). Two equal identities give
    /// interchangeable bind groups, so a caller may keep one across records (the decoder's
    /// steps) and make a new one only when a buffer changed.
    pub fn identity(&self, pass: Pass) -> BindingIdentity {
        BindingIdentity(
            desc(pass)
                .bindings
                .iter()
                .map(|b| {
                    self.buffers
                        .get(&b.role)
                        .map(|x| (x.buffer.clone(), x.offset, x.size))
                })
                .collect(),
        )
    }

    /// Group 0 of `pass` with these buffers (its descriptor's bindings: the f32 variant's).
    pub fn bind_group(&self, ctx: &GpuContext, pass: Pass) -> Result<wgpu::BindGroup> {
        self.bind_group_for(ctx, pass, crate::Storage::F32)
    }

    /// Group 0 of `pass`'s variant for `storage` with these buffers
    /// (`passes::bindings_for`: under f16 the dense forward binds its f32 partial O too).
    pub fn bind_group_for(
        &self,
        ctx: &GpuContext,
        pass: Pass,
        storage: crate::Storage,
    ) -> Result<wgpu::BindGroup> {
        let entries = bindings_for(pass, storage)
            .iter()
            .map(|b| {
                let buf = match (self.buffers.get(&b.role), b.role) {
                    (Some(buf), _) => buf.clone(),
                    // A batch of equal sequences: the passes do not read the table.
                    (None, Role::SeqTable) => ctx.kernels.no_sequences.as_entire_buffer_binding(),
                    (None, role) => {
                        return Err(FmaError::Gpu {
                            stage: format!("binding the {} pass", pass.name()),
                            message: format!("no buffer for binding {} ({role:?})", b.binding),
                        })
                    }
                };
                Ok(wgpu::BindGroupEntry {
                    binding: b.binding,
                    resource: wgpu::BindingResource::Buffer(buf),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(ctx.device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: Some(pass.name()),
            layout: ctx.kernels.group0_for(pass, storage)?,
            entries: &entries,
        }))
    }
}

/// The buffers (and byte ranges) a group 0 was made from ([`Resources::identity`]). Holding
/// one keeps its buffers alive, as the bind group made from them does.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct BindingIdentity(Vec<Option<(wgpu::Buffer, u64, Option<std::num::NonZeroU64>)>>);

/// One [`LevelSelect`] per step of a list (its level and folded grid), each at its own
/// dynamic offset, made once for that list and kept with the plan's other uniforms.
pub(crate) struct Selects {
    buffer: wgpu::Buffer,
    stride: u32,
    /// Steps it holds a selector for.
    count: usize,
    /// Its bind group, made on first use and kept (a record made again and again from the
    /// same selectors, the decoder's steps, binds the same group).
    group: std::sync::OnceLock<wgpu::BindGroup>,
}

impl Selects {
    /// The selectors of `steps`, in order.
    pub fn new(ctx: &GpuContext, steps: &[Dispatch]) -> Result<Self> {
        // Bytes between consecutive selectors: the adapter's dynamic-offset alignment.
        let stride = ctx.limits.min_uniform_buffer_offset_alignment.max(16);
        let s = stride as usize;
        let mut bytes = vec![0u8; s * steps.len().max(1)];
        for (i, d) in steps.iter().enumerate() {
            let one = to_uniform_bytes(&LevelSelect {
                level: d.level.unwrap_or(0),
                workgroups_x: d.grid[0],
                arg0: d.args[0],
                arg1: d.args[1],
            })?;
            bytes[i * s..i * s + one.len()].copy_from_slice(&one);
        }
        Ok(Self {
            buffer: uniform(&ctx.device, &ctx.queue, "level_select", &bytes),
            stride,
            count: steps.len(),
            group: std::sync::OnceLock::new(),
        })
    }

    /// Whether its bind group has been made (by [`Selects::bind_group`]).
    pub fn has_group(&self) -> bool {
        self.group.get().is_some()
    }

    /// Its bind group (made once).
    fn bind_group(&self, ctx: &GpuContext) -> &wgpu::BindGroup {
        self.group.get_or_init(|| self.make_group(ctx))
    }

    fn make_group(&self, ctx: &GpuContext) -> wgpu::BindGroup {
        ctx.device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: Some("level_select"),
            layout: &ctx.kernels.level_select,
            entries: &[wgpu::BindGroupEntry {
                binding: 0,
                resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                    buffer: &self.buffer,
                    offset: 0,
                    size: std::num::NonZeroU64::new(16),
                }),
            }],
        })
    }
}

/// The pipelines of a set of steps, by (pass, specialisation).
pub(crate) struct Pipes(HashMap<(Pass, Specialization), wgpu::ComputePipeline>);

impl Pipes {
    /// Builds (or finds in the device's cache) the pipeline of every step.
    pub async fn new<'a>(
        ctx: &GpuContext,
        steps: impl IntoIterator<Item = &'a Dispatch>,
    ) -> Result<Self> {
        let mut map = HashMap::new();
        for d in steps {
            let key = (d.pass, d.spec);
            if let std::collections::hash_map::Entry::Vacant(slot) = map.entry(key) {
                slot.insert(ctx.kernels.pipeline(&ctx.device, d.pass, d.spec).await?);
            }
        }
        Ok(Self(map))
    }

    fn get(&self, d: &Dispatch) -> Result<&wgpu::ComputePipeline> {
        self.0.get(&(d.pass, d.spec)).ok_or_else(|| FmaError::Gpu {
            stage: format!("recording the {} pass", d.pass.name()),
            message: "no pipeline was built for this step".into(),
        })
    }
}

/// Records `steps` in order into `cpass`. `selects` must have been made from exactly these
/// steps (step k uses selector k); `None` when no step's pass has a level selector. Group 0 is
/// made once per pass and storage of the list (every step of a pass binds the same buffers).
pub(crate) fn record_steps(
    ctx: &GpuContext,
    cpass: &mut wgpu::ComputePass<'_>,
    steps: &[Dispatch],
    pipes: &Pipes,
    selects: Option<&Selects>,
    res: &Resources<'_>,
) -> Result<()> {
    let select = selector(ctx, steps, selects)?;
    let mut groups: HashMap<(Pass, crate::Storage), wgpu::BindGroup> = HashMap::new();
    for (k, step) in steps.iter().enumerate() {
        let group = match groups.entry((step.pass, step.spec.storage)) {
            std::collections::hash_map::Entry::Occupied(g) => g.into_mut(),
            std::collections::hash_map::Entry::Vacant(slot) => {
                slot.insert(res.bind_group_for(ctx, step.pass, step.spec.storage)?)
            }
        };
        dispatch_one(ctx, cpass, (steps, k), pipes, group, select)?;
    }
    Ok(())
}

/// Records step `k` of `steps` alone with `group` as its group 0 (made by the caller from
/// [`Resources::bind_group`], and possibly kept across records: the decoder's steps, whose
/// history pages differ per step). `selects` as in [`record_steps`]; its bind group is made
/// once and kept.
pub(crate) fn record_step(
    ctx: &GpuContext,
    cpass: &mut wgpu::ComputePass<'_>,
    steps: &[Dispatch],
    k: usize,
    pipes: &Pipes,
    selects: Option<&Selects>,
    group: &wgpu::BindGroup,
) -> Result<()> {
    let select = selector(ctx, steps, selects)?;
    dispatch_one(ctx, cpass, (steps, k), pipes, group, select)
}

/// The level-selector group of `steps` and its stride, when any step's pass has one.
fn selector<'s>(
    ctx: &GpuContext,
    steps: &[Dispatch],
    selects: Option<&'s Selects>,
) -> Result<Option<(&'s wgpu::BindGroup, u32)>> {
    let needs_select = steps.iter().any(|s| desc(s.pass).level_select);
    match (needs_select, selects) {
        (false, _) => Ok(None),
        (true, Some(s)) if s.count >= steps.len() => Ok(Some((s.bind_group(ctx), s.stride))),
        (true, _) => Err(FmaError::Gpu {
            stage: "recording a plan".into(),
            message: "no level selector for every step of a per-level pass".into(),
        }),
    }
}

fn dispatch_one(
    ctx: &GpuContext,
    cpass: &mut wgpu::ComputePass<'_>,
    (steps, k): (&[Dispatch], usize),
    pipes: &Pipes,
    group: &wgpu::BindGroup,
    select: Option<(&wgpu::BindGroup, u32)>,
) -> Result<()> {
    let step = &steps[k];
    cpass.set_pipeline(pipes.get(step)?);
    cpass.set_bind_group(0, group, &[]);
    if let (true, Some((group, stride))) = (desc(step.pass).level_select, select) {
        cpass.set_bind_group(1, group, &[k as u32 * stride]);
    }
    // A counting device (tests): step k's row counter.
    if let Some(c) = &ctx.kernels.counter {
        if k as u64 >= COUNTER_SLOTS {
            return Err(FmaError::Gpu {
                stage: "counting rows".into(),
                message: format!("more than {COUNTER_SLOTS} dispatches in one record"),
            });
        }
        cpass.set_bind_group(2, &c.group, &[(k as u64 * COUNTER_STRIDE) as u32]);
    }
    // The per-pass profiler, when installed (`profile.rs`): timestamps around the dispatch.
    let timed = ctx.profiler.begin(cpass, step.pass.name(), step.level);
    cpass.dispatch_workgroups(step.grid[0], step.grid[1], step.grid[2]);
    ctx.profiler.end(cpass, timed);
    Ok(())
}
