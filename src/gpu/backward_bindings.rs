//! Bind-group layouts of the backward passes: group 0 of each pass, binding by binding as in
//! its WGSL file (a test reflects the WGSL with naga and compares); group 1 of every backward
//! pass is the shared per-dispatch selector (`shaders/shared/dispatch.wgsl`).

use crate::gpu::shaders::Pass;

const UNIFORM: wgpu::BufferBindingType = wgpu::BufferBindingType::Uniform;
const READ: wgpu::BufferBindingType = wgpu::BufferBindingType::Storage { read_only: true };
const WRITE: wgpu::BufferBindingType = wgpu::BufferBindingType::Storage { read_only: false };

/// The backward passes, in the order one backward records them.
pub(crate) const BACKWARD_PASSES: [Pass; 6] = [
    Pass::BackwardDelta,
    Pass::BackwardDq,
    Pass::BackwardDkvCoarse,
    Pass::BackwardDkvFine,
    Pass::DownsampleBackward,
    Pass::WeightsBackward,
];

/// Group-0 binding types of a backward pass, binding i at index i; `None` for other passes.
/// At most 8 storage bindings each (WebGPU's default per-stage limit).
pub(crate) fn group0(pass: Pass) -> Option<&'static [wgpu::BufferBindingType]> {
    Some(match pass {
        // params, o, dout, lse, stats
        Pass::BackwardDelta => &[UNIFORM, READ, READ, READ, WRITE],
        // params, q, k, v, coarse_k, coarse_v, dout, stats, dq
        Pass::BackwardDq => &[UNIFORM, READ, READ, READ, READ, READ, READ, READ, WRITE],
        // params, q, k, v, dout, stats, dk, dv
        Pass::BackwardDkvFine => &[UNIFORM, READ, READ, READ, READ, READ, WRITE, WRITE],
        // params, q, coarse_k, coarse_v, dout, stats, dcoarse_k, dcoarse_v
        Pass::BackwardDkvCoarse => &[UNIFORM, READ, READ, READ, READ, READ, WRITE, WRITE],
        // params, w (keys | values), dcoarse_k, dcoarse_v, dk, dv
        Pass::DownsampleBackward => &[UNIFORM, READ, READ, READ, WRITE, WRITE],
        // params, k, v, dcoarse_k, dcoarse_v, dwk, dwv, dbk, dbv
        Pass::WeightsBackward => &[UNIFORM, READ, READ, READ, READ, WRITE, WRITE, WRITE, WRITE],
        _ => return None,
    })
}

/// The group-0 layouts of every backward pass on `device`.
pub(crate) fn layouts(device: &wgpu::Device) -> Vec<(Pass, wgpu::BindGroupLayout)> {
    BACKWARD_PASSES
        .iter()
        .filter_map(|&pass| {
            let entries: Vec<_> = group0(pass)?
                .iter()
                .enumerate()
                .map(|(i, &ty)| wgpu::BindGroupLayoutEntry {
                    binding: i as u32,
                    visibility: wgpu::ShaderStages::COMPUTE,
                    ty: wgpu::BindingType::Buffer {
                        ty,
                        has_dynamic_offset: false,
                        min_binding_size: None,
                    },
                    count: None,
                })
                .collect();
            let layout = device.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
                label: Some(pass.name()),
                entries: &entries,
            });
            Some((pass, layout))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::shaders::{compose, Specialization};

    /// Reflects the WGSL: every global buffer's (group, binding, space, access).
    fn reflect(pass: Pass) -> Vec<(u32, u32, wgpu::BufferBindingType)> {
        let src = compose(
            pass,
            Specialization {
                wg: 64,
                bk: 8,
                d4: 4,
            },
        );
        let module = naga::front::wgsl::parse_str(&src).expect("shader parses");
        let mut out: Vec<_> = module
            .global_variables
            .iter()
            .filter_map(|(_, g)| {
                let b = g.binding.as_ref()?;
                let ty = match g.space {
                    naga::AddressSpace::Uniform => UNIFORM,
                    naga::AddressSpace::Storage { access } => wgpu::BufferBindingType::Storage {
                        read_only: !access.contains(naga::StorageAccess::STORE),
                    },
                    _ => return None,
                };
                Some((b.group, b.binding, ty))
            })
            .collect();
        out.sort_by_key(|&(g, b, _)| (g, b));
        out
    }

    #[test]
    fn layouts_match_the_wgsl_bindings() {
        for pass in BACKWARD_PASSES {
            let table = group0(pass).expect("backward pass has a layout");
            let storage = table.iter().filter(|t| **t != UNIFORM).count();
            assert!(
                storage <= 8,
                "{} has {storage} storage bindings",
                pass.name()
            );
            let mut want: Vec<_> = table
                .iter()
                .enumerate()
                .map(|(i, &t)| (0u32, i as u32, t))
                .collect();
            want.push((1, 0, UNIFORM));
            assert_eq!(reflect(pass), want, "{}", pass.name());
        }
    }
}
