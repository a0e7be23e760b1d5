//! Which dense forward kernel a plan runs, and the tile sizes of the GPU-shaped one
//! (`shaders/dense_tiled.wgsl`, FlashAttention-2's shape): picked from the adapter's limits
//! (invocations per workgroup, workgroup memory) when the plan is made, so a pipeline is built
//! for the sizes that fit the device it runs on.

use super::dispatch::attention_spec;
use super::limits::KernelLimits;
use super::pass::{Pass, SoftmaxFlags, Specialization};
use crate::error::Result;
use crate::storage::Storage;

/// The shape of the dense forward kernel.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum DenseKernel {
    /// One invocation per query row, key tiles shared by a workgroup of 64 rows
    /// (`shaders/dense_attention.wgsl`): what wins on llvmpipe (lavapipe, Mesa's GL), where
    /// total work decides and few long invocations are cheap. The default of a plan.
    #[default]
    Rows,
    /// FlashAttention-2's shape for SIMT GPUs (`shaders/dense_tiled.wgsl`): a workgroup per
    /// block of query rows, each invocation a register micro-tile of [`TILED_ROWS`] rows x
    /// keys, the row maxima combined across [`TILED_LANES`] invocations. Where its tiles do not
    /// fit the adapter's workgroup memory for the head dimension ([`tiled_spec`] is `None`:
    /// d = 256 on 48 KiB, d > 64 on a browser's 16 KiB), a plan runs [`DenseKernel::Rows`].
    Tiled,
}

impl DenseKernel {
    /// The kernel for an adapter of type `device_type`: [`DenseKernel::Rows`] on a CPU adapter
    /// (lavapipe, llvmpipe), [`DenseKernel::Tiled`] on every other (GPUs; a browser reports
    /// its adapter as `Other` or a GPU type).
    pub fn for_device(device_type: wgpu::DeviceType) -> Self {
        match device_type {
            wgpu::DeviceType::Cpu => Self::Rows,
            _ => Self::Tiled,
        }
    }
}

/// Query rows per invocation of the tiled kernel (TQ): each key vec4 read from workgroup memory
/// feeds this many rows' dot products.
pub const TILED_ROWS: u32 = 4;
/// Invocations sharing a row group (LANES): a row's keys of a tile and its output columns are
/// split over them; their row maxima and sums meet in workgroup memory, in lane order. 16 keeps a
/// row group inside one subgroup of 32 (NVIDIA) or 64 (AMD), and at d = 64 gives each lane one
/// vec4 column of O.
pub const TILED_LANES: u32 = 16;

/// Query blocks the tiled kernel tries, largest first (the workgroup is `bq / TILED_ROWS *
/// TILED_LANES` invocations: 256, 128, 64).
const BLOCKS: [u32; 3] = [64, 32, 16];
/// Key tiles it tries per block, largest first (multiples of [`TILED_LANES`]).
const KEY_TILES: [u32; 3] = [64, 32, 16];

/// Invocations of a tiled workgroup of `bq` query rows.
pub fn tiled_threads(bq: u32) -> u32 {
    bq.div_ceil(TILED_ROWS) * TILED_LANES
}

/// Bytes of workgroup memory the tiled kernel declares for `bq` query rows, `bk` keys per tile
/// and rows of `d4` vec4s, as `shaders/dense_tiled.wgsl` sizes its arrays: Q and K rows at a
/// stride of d4 + 1 vec4s, V rows of d4 vec4s (bk rounded up to 4), P rows of ceil(bk / 4) + 1
/// vec4s, a partial maximum per (row, lane) and two flags.
pub fn tile_bytes(bq: u32, bk: u32, d4: u32) -> u64 {
    let rows = bq.div_ceil(TILED_ROWS) as u64 * TILED_ROWS as u64;
    let (bk, d4) = (bk as u64, d4 as u64);
    let bk4 = bk.div_ceil(4);
    let vec4s = rows * (d4 + 1) + bk * (d4 + 1) + bk4 * 4 * d4 + rows * (bk4 + 1);
    16 * vec4s + 4 * rows * TILED_LANES as u64 + 8
}

/// The tiled kernel's specialisation for `head_dim` under `limits` (`wg` = the query block,
/// `bk` = keys per tile): the largest block whose workgroup fits the invocation limit, with the
/// largest key tile whose memory fits, or `None` where no block of 16 rows and 16 keys fits.
/// Larger blocks first: a block's K/V tile is reused by its every row (bytes read from memory
/// per FLOP fall as 1 / block), and a larger key tile only adds reuse of the staged queries.
pub fn tiled_spec(head_dim: usize, limits: &KernelLimits) -> Option<Specialization> {
    let d4 = head_dim.div_ceil(4) as u32;
    for bq in BLOCKS {
        if tiled_threads(bq) > limits.max_workgroup {
            continue;
        }
        for bk in KEY_TILES {
            if tile_bytes(bq, bk, d4) <= limits.workgroup_storage as u64 {
                return Some(Specialization {
                    wg: bq,
                    bk,
                    d4,
                    grid: false,
                    softmax: SoftmaxFlags::PLAIN,
                    storage: Storage::F32,
                });
            }
        }
    }
    None
}

/// The pass and specialisation of the dense forward for `kernel`: [`DenseKernel::Tiled`] where
/// its tiles fit (else the rows kernel), [`DenseKernel::Rows`] with 64 rows per workgroup (or
/// the adapter's limit) and the key tile of [`attention_spec`]. Checks the head dimension.
pub fn dense_kernel_spec(
    kernel: DenseKernel,
    head_dim: usize,
    limits: &KernelLimits,
) -> Result<(Pass, Specialization)> {
    let rows = attention_spec(head_dim, 64u32.min(limits.max_workgroup), limits)?;
    if kernel == DenseKernel::Tiled {
        if let Some(spec) = tiled_spec(head_dim, limits) {
            return Ok((Pass::DenseTiled, spec));
        }
    }
    Ok((Pass::DenseAttention, rows))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiles_fit_the_adapter_and_prefer_large_blocks() {
        let gpu = KernelLimits::discrete_gpu();
        for d in [1, 3, 16, 32, 64, 100, 128, 132, 192, 256] {
            for limits in [
                gpu,
                KernelLimits::lavapipe(),
                KernelLimits::webgpu_default(),
            ] {
                if let Some(s) = tiled_spec(d, &limits) {
                    assert!(tile_bytes(s.wg, s.bk, s.d4) <= limits.workgroup_storage as u64);
                    assert!(tiled_threads(s.wg) <= limits.max_workgroup);
                    assert_eq!(s.wg % TILED_ROWS, 0);
                    assert_eq!(s.bk % TILED_LANES, 0);
                }
            }
        }
        // The H200's 48 KiB: blocks of 64 rows (256 invocations) to d = 64, 32 at d = 128.
        let s = tiled_spec(64, &gpu).unwrap();
        assert_eq!((s.wg, s.bk, tiled_threads(s.wg)), (64, 32, 256));
        let s = tiled_spec(128, &gpu).unwrap();
        assert_eq!((s.wg, s.bk), (32, 16));
        // d = 256 does not fit 48 KiB: the rows kernel runs it.
        assert!(tiled_spec(256, &gpu).is_none());
        let (pass, spec) = dense_kernel_spec(DenseKernel::Tiled, 256, &gpu).unwrap();
        assert_eq!((pass, spec.wg), (Pass::DenseAttention, 64));
        // A browser's 16 KiB: 16 rows at d = 64, the rows kernel at d = 128.
        assert_eq!(
            tiled_spec(64, &KernelLimits::webgpu_default()).unwrap().wg,
            16
        );
        assert!(tiled_spec(128, &KernelLimits::webgpu_default()).is_none());
        // lavapipe's 32 KiB at d = 64: 32 rows, 32 keys.
        let s = tiled_spec(64, &KernelLimits::lavapipe()).unwrap();
        assert_eq!((s.wg, s.bk), (32, 32));
    }

    #[test]
    fn plans_count_tiles_of_the_tiled_block() {
        use crate::plan::{DensePlan, DenseSplitPlan};
        use crate::sequences::Sequences;
        use crate::shape::Shape;
        let gpu = KernelLimits::discrete_gpu();
        let shape = Shape::new(2, 3, 1000, 128);
        let plan = DensePlan::with_kernel(shape, &gpu, DenseKernel::Tiled).unwrap();
        let a = plan.attention;
        assert_eq!((a.pass, a.spec.wg, a.spec.bk), (Pass::DenseTiled, 32, 16));
        assert_eq!(plan.tiles, 1000u32.div_ceil(32));
        assert_eq!(a.workgroups, 6 * plan.tiles);
        // The rows kernel's plan is what DensePlan::new gave before the tiled kernel.
        let rows = DensePlan::with_kernel(shape, &gpu, DenseKernel::Rows).unwrap();
        assert_eq!(
            rows.attention,
            DensePlan::new(shape, &gpu).unwrap().attention
        );
        assert_eq!(rows.attention.pass, Pass::DenseAttention);
        // A variable-length batch: each sequence's tiles of the tiled block.
        let seqs = Sequences::packed(vec![1, 33, 64]).unwrap();
        let v = DensePlan::for_sequences_with(&seqs, (2, 1, 64), &gpu, DenseKernel::Tiled).unwrap();
        assert_eq!(v.attention.pass, Pass::DenseTiled);
        assert_eq!(v.sequences.as_ref().unwrap().tiles, 1 + 1 + 1);
        assert_eq!(v.attention.workgroups, 2 * 3);
        // A split head: chunks of whole tiles of the block and the key tile.
        let small = gpu.capped(64 * 1024);
        let split = DenseSplitPlan::with_kernel(2000, 64, true, &small, (None, DenseKernel::Tiled))
            .unwrap();
        assert_eq!(split.head.attention.pass, Pass::DenseTiled);
        assert!(split.chunks.len() > 1);
        for &(lo, _) in &split.chunks {
            assert_eq!(lo % 64, 0);
        }
        assert!(split
            .pairs
            .iter()
            .all(|p| p.dispatch.pass == Pass::DenseTiled));
    }

    #[test]
    fn rows_is_the_default_and_cpu_adapters_keep_it() {
        assert_eq!(DenseKernel::default(), DenseKernel::Rows);
        assert_eq!(
            DenseKernel::for_device(wgpu::DeviceType::Cpu),
            DenseKernel::Rows
        );
        assert_eq!(
            DenseKernel::for_device(wgpu::DeviceType::DiscreteGpu),
            DenseKernel::Tiled
        );
        let limits = KernelLimits::lavapipe();
        let (pass, _) = dense_kernel_spec(DenseKernel::Rows, 64, &limits).unwrap();
        assert_eq!(pass, Pass::DenseAttention);
        // Head dimensions out of range: the typed error of either kernel.
        assert!(dense_kernel_spec(DenseKernel::Tiled, 0, &limits).is_err());
        assert!(dense_kernel_spec(DenseKernel::Tiled, 257, &limits).is_err());
    }
}
