//! One compute dispatch of a plan, the folding of its workgroups under the per-dimension
//! limit, and the specialisation of the attention passes (key tile, padded head dimension).

use super::limits::KernelLimits;
use super::pass::{Pass, SoftmaxFlags, Specialization};
use crate::error::{FmaError, Result};
use crate::storage::Storage;

/// Largest head dimension the attention kernels support (a query row and its accumulator live
/// in registers: 2 * 256 floats per invocation is already a lot).
pub const MAX_HEAD_DIM: usize = 256;
/// Most keys staged per tile: 32 measured 13% faster than 63 for FMA on lavapipe (docs/perf.md):
/// 32 divides the near field of m = 64 (192 keys) and keeps the per-invocation score array small.
pub const MAX_KEY_TILE: u32 = 32;
/// Fewest keys per tile worth running (below this, workgroup memory is too small for d).
pub const MIN_KEY_TILE: u32 = 4;
/// Invocations per workgroup of the downsample pass.
pub const DOWNSAMPLE_WG: u32 = 64;
/// Invocations per workgroup of the coarse-attention pass (one coarse query each).
pub const COARSE_WG: u32 = 64;
/// Invocations per workgroup of the upsample-merge pass (one token each).
pub const MERGE_WG: u32 = 64;

/// One compute dispatch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Dispatch {
    /// Which pass.
    pub pass: Pass,
    /// Coarse level index (l - 1) for per-level passes.
    pub level: Option<u32>,
    /// Workgroups that do work (the shader skips the padding of the folded grid).
    pub workgroups: u32,
    /// The folded grid `[x, y, 1]`, each at most the adapter's per-dimension limit.
    pub grid: [u32; 3],
    /// Pipeline specialisation.
    pub spec: Specialization,
    /// Pass-specific selector words (`LevelSelect.arg0`, `arg1` in
    /// `shaders/shared/level_select.wgsl`), 0 for the passes that read none: the coarse
    /// dK~/dV~ pass's reader chunks per row and queries per chunk, its combine rounds' chunks
    /// and stride (`plan::backward`).
    pub args: [u32; 2],
}

/// Folds `total` workgroups into a 2D grid with no dimension above `max_dim`, launching fewer
/// than `y` workgroups past `total` (x = ceil(total / y) for the fewest rows y). Why balanced:
/// filling x to `max_dim` first launched up to twice the work's workgroups just past the limit
/// (65536 as 65535 x 2 = 131070, half of them returning at once: the downsample pass's
/// level 1 at n = 131072 x 8 heads; docs/perf.md, change 22).
pub fn fold(total: u32, max_dim: u32) -> Result<[u32; 3]> {
    let y = total.div_ceil(max_dim.max(1)).max(1);
    let x = total.div_ceil(y).max(1);
    if y > max_dim {
        return Err(FmaError::LimitExceeded {
            what: "one dispatch".into(),
            requested: total as u64,
            max: max_dim as u64 * max_dim as u64,
            unit: "workgroups",
            advice: "process fewer heads per call, or shorter sequences".into(),
        });
    }
    Ok([x, y, 1])
}

/// Checks the head dimension and picks the key tile: as many keys (<= MAX_KEY_TILE = 32) as fit in the
/// adapter's workgroup memory, two vec4-padded rows (K and V) plus one bias per key.
pub fn attention_spec(head_dim: usize, wg: u32, limits: &KernelLimits) -> Result<Specialization> {
    if head_dim == 0 || head_dim > MAX_HEAD_DIM {
        return Err(FmaError::InvalidConfig {
            what: "head_dim",
            value: head_dim.to_string(),
            allowed: format!("1 ..= {MAX_HEAD_DIM}"),
        });
    }
    let d4 = head_dim.div_ceil(4) as u32;
    let bytes_per_key = 2 * d4 * 16 + 4;
    let bk = (limits.workgroup_storage / bytes_per_key).min(MAX_KEY_TILE);
    if bk < MIN_KEY_TILE {
        return Err(FmaError::LimitExceeded {
            what: format!("a tile of {MIN_KEY_TILE} keys of head_dim {head_dim}"),
            requested: (MIN_KEY_TILE * bytes_per_key) as u64,
            max: limits.workgroup_storage as u64,
            unit: "bytes of workgroup memory",
            advice: "use a smaller head_dim on this adapter".into(),
        });
    }
    Ok(Specialization {
        wg,
        bk,
        d4,
        grid: false,
        softmax: SoftmaxFlags::PLAIN,
        storage: Storage::F32,
    })
}

/// Workgroups of a dispatch as u32 (a typed error beyond), folded under the limit.
pub(crate) fn dispatch(
    pass: Pass,
    level: Option<u32>,
    total: u64,
    spec: Specialization,
    limits: &KernelLimits,
) -> Result<Dispatch> {
    let workgroups = u32::try_from(total).map_err(|_| FmaError::LimitExceeded {
        what: format!("the {} dispatch", pass.name()),
        requested: total,
        max: u32::MAX as u64,
        unit: "workgroups",
        advice: "process fewer heads per call, or shorter sequences".into(),
    })?;
    Ok(Dispatch {
        pass,
        level,
        workgroups,
        grid: fold(workgroups, limits.max_workgroups_per_dim)?,
        spec,
        args: [0, 0],
    })
}
