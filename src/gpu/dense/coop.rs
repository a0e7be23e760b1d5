//! Dense attention's forward on cooperative matrices (`shaders/dense_coop.wgsl`; issue 29):
//! chosen for a plan only on a context that negotiated a shape
//! ([`crate::gpu::ContextOptions::cooperative_matrix`]) and only for what the kernel covers
//! (a batch of equal sequences, no softmax variant, a head dimension whose tiles fit the
//! workgroup memory); everything else runs the plain kernel. On a GPU one dispatch over all
//! keys; the scalar emulation (tests, on llvmpipe) runs the keys in chunks of
//! `engine::coop::emulated_keys_per_dispatch`, dispatches in order, each resuming the partial
//! (O, LSE) of the one before, because llvmpipe stops an invocation's loops after 65535
//! iterations and returns wrong values without an error (perf.md, change 35). Under f16
//! storage the kernel's Q, K, V, O bindings are f16 (`engine::coop::compose_dense_coop_for`).

use std::collections::HashMap;
use std::sync::Mutex;

use crate::error::{FmaError, Result};
use crate::gpu::engine::buffers::uniform;
use crate::gpu::engine::context::GpuContext;
use crate::gpu::engine::coop::{
    compose_dense_coop_emulated_for, compose_dense_coop_for, emulated_keys_per_dispatch,
    emulation_spec, CoopSpec,
};
use crate::gpu::engine::params::{to_uniform_bytes, Params};
use crate::gpu::engine::passes::Role;
use crate::gpu::engine::pipelines::poisoned;
use crate::gpu::engine::record::Resources;
use crate::gpu::engine::tensors::GpuTensors;
use crate::plan::{fold, DensePlan, Pass};
use crate::storage::Storage;

/// The pipelines of one [`super::DenseAttention`] by tile sizes (one per head dimension used)
/// and the storage of its tensors.
#[derive(Default)]
pub(super) struct CoopPipelines(Mutex<HashMap<(CoopSpec, Storage), wgpu::ComputePipeline>>);

/// What one forward on cooperative matrices records: its pipeline, one parameter block per
/// key chunk (in order) and the grid.
pub(super) struct CoopRun {
    pipeline: wgpu::ComputePipeline,
    params: Vec<wgpu::Buffer>,
    grid: [u32; 3],
}

impl CoopPipelines {
    /// The run of `plan` on cooperative matrices, or `None` where the plain kernel runs it
    /// (no shape on `ctx`, a variable-length batch, softmax variants: `plain` false).
    /// `base` is the plain kernel's parameter block of the plan, whose storage
    /// (`plan.attention.spec.storage`) the kernel's tensors take.
    pub async fn run(
        &self,
        ctx: &GpuContext,
        plan: &DensePlan,
        plain: bool,
        base: Params,
    ) -> Result<Option<CoopRun>> {
        let Some(shape) = ctx.cooperative_matrix() else {
            return Ok(None);
        };
        if !plain || plan.sequences.is_some() {
            return Ok(None);
        }
        let s = plan.shape;
        let spec = if ctx.coop_emulated {
            emulation_spec(shape, s.head_dim)
        } else {
            CoopSpec::choose(
                shape,
                s.head_dim,
                ctx.limits.max_compute_workgroup_storage_size,
            )?
        };
        let tiles = (s.seq as u32).div_ceil(spec.bq);
        let total =
            (s.batch_heads() as u32)
                .checked_mul(tiles)
                .ok_or_else(|| FmaError::LimitExceeded {
                    what: "one dispatch".into(),
                    requested: s.batch_heads() as u64 * tiles as u64,
                    max: u32::MAX as u64,
                    unit: "workgroups",
                    advice: "process fewer heads per call, or shorter sequences".into(),
                })?;
        let grid = fold(total, ctx.limits.max_compute_workgroups_per_dimension)?;
        // Keys per dispatch: all on a GPU; under the emulation what llvmpipe's loop limit
        // allows (a multiple of BK, so every chunk but the last ends on a key tile's end).
        let per_dispatch = match ctx.coop_emulated {
            true => Some(emulated_keys_per_dispatch(spec, s.head_dim as u32)?),
            false => None,
        };
        let mut params = Vec::new();
        for (key_lo, key_hi) in key_chunks(s.seq_kv as u32, per_dispatch) {
            let block = Params {
                tiles_per_block: tiles,
                total_workgroups: total,
                workgroups_x: grid[0],
                key_lo,
                key_hi,
                ..base
            };
            let bytes = to_uniform_bytes(&block)?;
            params.push(uniform(
                &ctx.device,
                &ctx.queue,
                "dense coop params",
                &bytes,
            ));
        }
        Ok(Some(CoopRun {
            pipeline: self
                .pipeline(ctx, spec, plan.attention.spec.storage)
                .await?,
            params,
            grid,
        }))
    }

    /// The pipeline of `spec` for tensors of `storage`, built on first use inside a validation
    /// error scope.
    async fn pipeline(
        &self,
        ctx: &GpuContext,
        spec: CoopSpec,
        storage: Storage,
    ) -> Result<wgpu::ComputePipeline> {
        if let Some(p) = self.0.lock().map_err(poisoned)?.get(&(spec, storage)) {
            return Ok(p.clone());
        }
        let device = &ctx.device;
        let scope = device.push_error_scope(wgpu::ErrorFilter::Validation);
        let module = device.create_shader_module(wgpu::ShaderModuleDescriptor {
            label: Some("dense coop"),
            source: wgpu::ShaderSource::Wgsl(
                match ctx.coop_emulated {
                    true => compose_dense_coop_emulated_for(spec, storage),
                    false => compose_dense_coop_for(spec, storage),
                }
                .into(),
            ),
        });
        // The plain dense pass's group 0: the same bindings (the table at 10 unused).
        let layout = device.create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
            label: Some("dense coop"),
            bind_group_layouts: &[Some(ctx.kernels.group0(Pass::DenseAttention)?)],
            immediate_size: 0,
        });
        let pipeline = device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
            label: Some("dense coop"),
            layout: Some(&layout),
            module: &module,
            entry_point: Some("main"),
            compilation_options: Default::default(),
            cache: None,
        });
        if let Some(err) = scope.pop().await {
            return Err(FmaError::Gpu {
                stage: format!("building the dense cooperative-matrix pipeline ({spec:?})"),
                message: err.to_string(),
            });
        }
        self.0
            .lock()
            .map_err(poisoned)?
            .insert((spec, storage), pipeline.clone());
        Ok(pipeline)
    }
}

/// The key ranges `[key_lo, key_hi)` of the dispatches over `n_kv` keys, in order: one over
/// all keys (`per_dispatch` `None`: a GPU, whose kernel then never resumes a partial), or
/// chunks of `per_dispatch` keys (the emulation), the last one shorter. At least one range,
/// `(0, 0)` for no keys, so every row is written (O = 0, LSE = -inf).
fn key_chunks(n_kv: u32, per_dispatch: Option<u32>) -> Vec<(u32, u32)> {
    let chunk = per_dispatch.unwrap_or(n_kv).max(1);
    let mut out = vec![(0, chunk.min(n_kv))];
    while let Some(&(_, hi)) = out.last().filter(|r| r.1 < n_kv) {
        out.push((hi, hi.saturating_add(chunk).min(n_kv)));
    }
    out
}

impl CoopRun {
    /// Records the forward into a compute pass of `enc` (Q, K, V, O of `t`, the LSE in `lse`).
    pub fn record(
        &self,
        ctx: &GpuContext,
        enc: &mut wgpu::CommandEncoder,
        t: &GpuTensors<'_>,
        lse: &wgpu::Buffer,
    ) -> Result<()> {
        let groups = self
            .params
            .iter()
            .map(|p| {
                Resources::default()
                    .with(Role::Params, p)
                    .tensors(t, lse)
                    .bind_group(ctx, Pass::DenseAttention)
            })
            .collect::<Result<Vec<_>>>()?;
        let mut cpass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
            label: Some("dense forward (cooperative matrices)"),
            timestamp_writes: None,
        });
        cpass.set_pipeline(&self.pipeline);
        let timed = ctx.profiler.begin(&mut cpass, "dense_coop", None);
        // Key chunks in order: each dispatch resumes the (O, LSE) the one before wrote.
        for group in &groups {
            cpass.set_bind_group(0, group, &[]);
            cpass.dispatch_workgroups(self.grid[0], self.grid[1], self.grid[2]);
        }
        ctx.profiler.end(&mut cpass, timed);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::key_chunks;

    /// A GPU's run is one dispatch over all keys from key 0 (the kernel's resume and
    /// `finished` paths are then off: the text it ran before key chunks, in effect); the
    /// emulation's chunks tile the keys in order, each at most `per_dispatch` long.
    #[test]
    fn key_chunks_cover_the_keys_in_order() {
        for n_kv in [0u32, 1, 7, 97, 1025, u32::MAX] {
            assert_eq!(key_chunks(n_kv, None), vec![(0, n_kv)]);
        }
        assert_eq!(key_chunks(1025, Some(712)), vec![(0, 712), (712, 1025)]);
        assert_eq!(key_chunks(0, Some(16)), vec![(0, 0)]);
        for n_kv in [1u32, 15, 16, 17, 330, 1025, 4096] {
            for per in [8u32, 16, 152, 544, 712, 5000] {
                let chunks = key_chunks(n_kv, Some(per));
                assert_eq!(chunks.len() as u32, n_kv.div_ceil(per), "{n_kv} {per}");
                let mut next = 0;
                for &(lo, hi) in &chunks {
                    assert!(
                        lo == next && hi > lo && hi - lo <= per,
                        "{n_kv} {per}: {chunks:?}"
                    );
                    next = hi;
                }
                assert_eq!(next, n_kv);
            }
        }
        // Near u32::MAX the last chunk ends at n_kv without overflow.
        let big = key_chunks(u32::MAX, Some(1 << 31));
        assert_eq!(big, vec![(0, 1 << 31), (1 << 31, u32::MAX)]);
    }
}
