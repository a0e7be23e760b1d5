//! Which kernel FMA's fused fine-query pass runs, and the tile sizes of the GPU-shaped one
//! (`shaders/fine_attention_tiled.wgsl`, FlashAttention-2's shape): picked from the adapter's
//! limits (invocations per workgroup, workgroup memory) and the block size when the plan is
//! made, so a pipeline is built for the sizes that fit the device and the blocks it runs.

use super::dense_tiled::{tile_bytes as dense_tile_bytes, tiled_threads, TILED_LANES, TILED_ROWS};
use super::dispatch::attention_spec;
use super::limits::KernelLimits;
use super::pass::{Pass, SoftmaxFlags, Specialization};
use crate::error::Result;
use crate::storage::Storage;

/// The shape of FMA's fused fine-query pass (the forward's `fine_attention`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum FmaKernel {
    /// One invocation per query row, key tiles shared by a workgroup of up to one block of
    /// queries (`shaders/fine_attention.wgsl`): what wins on llvmpipe (lavapipe, Mesa's GL),
    /// where total work decides and few long invocations are cheap. The default of a plan.
    #[default]
    Rows,
    /// FlashAttention-2's shape for SIMT GPUs (`shaders/fine_attention_tiled.wgsl`): a
    /// workgroup per tile of a fine block's queries, each invocation a register micro-tile of
    /// [`TILED_ROWS`] rows x keys, the row maxima combined across [`TILED_LANES`] invocations.
    /// Where its tiles do not fit the adapter's workgroup memory for the head dimension
    /// ([`fine_tiled_spec`] is `None`: d = 256 on 48 KiB, d > 64 on a browser's 16 KiB), a
    /// plan runs [`FmaKernel::Rows`].
    Tiled,
}

impl FmaKernel {
    /// The kernel for an adapter of type `device_type`: [`FmaKernel::Rows`] on a CPU adapter
    /// (lavapipe, llvmpipe), [`FmaKernel::Tiled`] on every other (GPUs; a browser reports its
    /// adapter as `Other` or a GPU type).
    pub fn for_device(device_type: wgpu::DeviceType) -> Self {
        match device_type {
            wgpu::DeviceType::Cpu => Self::Rows,
            _ => Self::Tiled,
        }
    }
}

/// Query tiles the tiled pass tries, largest first (the workgroup is `bq / TILED_ROWS *
/// TILED_LANES` invocations: 256 .. 16), no larger than the block needs.
const BLOCKS: [u32; 5] = [64, 32, 16, 8, 4];
/// Key tiles it tries, largest first (multiples of [`TILED_LANES`]), no longer than a near
/// run needs.
const KEY_TILES: [u32; 3] = [64, 32, 16];

/// Bytes of workgroup memory the tiled pass declares for `bq` query rows, `bk` keys per tile
/// and rows of `d4` vec4s: dense_tiled's tiles ([`crate::plan::tile_bytes`]: Q, K, V, P, the
/// lanes' partial maxima, two flags) and per staged key its bias and its coarse row's offset.
pub fn fine_tile_bytes(bq: u32, bk: u32, d4: u32) -> u64 {
    dense_tile_bytes(bq, bk, d4) + 8 * bk as u64
}

/// The tiled pass's specialisation for `head_dim` under `limits`, for query blocks of
/// `block_queries` queries (1D: m; 2D: r^2) whose near field comes in runs of about `run_keys`
/// consecutive keys (1D: m, a third of the bidirectional near field; 2D: 3 r, a row of the 3 x 3
/// cells): `wg` = the query tile, `bk` = keys per tile. The largest tile of at most the block
/// (rounded up to a power of two) whose workgroup fits the invocation limit, with the largest
/// key tile of at most the run (likewise, at least 16) whose memory fits; `None` where no tile
/// of 16 rows (or the block's fewer) and 16 keys fits. Larger query tiles first: a K/V tile is reused by every row of
/// the query tile; a tile past the block's queries would only idle.
pub fn fine_tiled_spec(
    head_dim: usize,
    block_queries: usize,
    run_keys: usize,
    limits: &KernelLimits,
) -> Option<Specialization> {
    let d4 = head_dim.div_ceil(4) as u32;
    let rows_cap = (block_queries.max(1) as u32)
        .next_multiple_of(TILED_ROWS)
        .next_power_of_two();
    let keys_cap = (run_keys.max(1) as u32)
        .next_multiple_of(TILED_LANES)
        .next_power_of_two();
    // Tiles under 16 rows only for blocks that small: elsewhere the rows kernel's workgroup of
    // a whole block reuses its keys more.
    let fewest = rows_cap.min(16);
    for bq in BLOCKS {
        if bq > rows_cap || bq < fewest || tiled_threads(bq) > limits.max_workgroup {
            continue;
        }
        for bk in KEY_TILES {
            if bk > keys_cap && bk > TILED_LANES {
                continue;
            }
            if fine_tile_bytes(bq, bk, d4) <= limits.workgroup_storage as u64 {
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

/// The pass and specialisation of the fused fine-query pass for `kernel`: [`FmaKernel::Tiled`]
/// where its tiles fit (else the rows kernel), [`FmaKernel::Rows`] with a workgroup of one
/// block of `block_queries` queries (or the adapter's limit) and the key tile of
/// [`attention_spec`]. Checks the head dimension. `run_keys`: see [`fine_tiled_spec`].
pub fn fine_kernel_spec(
    kernel: FmaKernel,
    head_dim: usize,
    block_queries: usize,
    run_keys: usize,
    limits: &KernelLimits,
) -> Result<(Pass, Specialization)> {
    let wg = (block_queries as u32).min(limits.max_workgroup);
    let rows = attention_spec(head_dim, wg, limits)?;
    if kernel == FmaKernel::Tiled {
        if let Some(spec) = fine_tiled_spec(head_dim, block_queries, run_keys, limits) {
            return Ok((Pass::FineTiled, spec));
        }
    }
    Ok((Pass::FineAttention, rows))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{FmaConfig, Queries};
    use crate::geometry::Grid;
    use crate::plan::{FmaPlan, SplitPlan};
    use crate::shape::Shape;

    #[test]
    fn tiles_fit_the_adapter_and_the_block() {
        let gpu = KernelLimits::discrete_gpu();
        for d in [1, 3, 16, 32, 64, 100, 128, 132, 192, 256] {
            for m in [1, 3, 8, 16, 24, 32, 64, 100, 128, 512] {
                for limits in [
                    gpu,
                    KernelLimits::lavapipe(),
                    KernelLimits::webgpu_default(),
                ] {
                    if let Some(s) = fine_tiled_spec(d, m, m, &limits) {
                        assert!(
                            fine_tile_bytes(s.wg, s.bk, s.d4) <= limits.workgroup_storage as u64
                        );
                        assert!(tiled_threads(s.wg) <= limits.max_workgroup);
                        assert_eq!(s.wg % TILED_ROWS, 0);
                        assert_eq!(s.bk % TILED_LANES, 0);
                        // No tile wider than the block needs (its rows rounded up to 4, then
                        // to a power of two).
                        assert!(s.wg < 2 * m.max(4) as u32, "d {d} m {m}: {s:?}");
                    }
                }
            }
        }
        // The H200's 48 KiB at m = 64: 64 x 32 to d = 64 (dense's), 32 x 16 at d = 128.
        let s = fine_tiled_spec(64, 64, 64, &gpu).unwrap();
        assert_eq!((s.wg, s.bk, tiled_threads(s.wg)), (64, 32, 256));
        let s = fine_tiled_spec(128, 128, 128, &gpu).unwrap();
        assert_eq!((s.wg, s.bk), (32, 16));
        // Blocks of 16 queries: one tile of 16 rows (64 invocations), keys in tiles of 16.
        let s = fine_tiled_spec(64, 16, 16, &gpu).unwrap();
        assert_eq!((s.wg, s.bk), (16, 16));
        // d = 256 does not fit 48 KiB: the rows kernel runs it.
        assert!(fine_tiled_spec(256, 64, 64, &gpu).is_none());
        let (pass, spec) = fine_kernel_spec(FmaKernel::Tiled, 256, 64, 64, &gpu).unwrap();
        assert_eq!((pass, spec.wg), (Pass::FineAttention, 64));
        // lavapipe's 32 KiB at d = 64, m = 64: 32 rows, 32 keys.
        let s = fine_tiled_spec(64, 64, 64, &KernelLimits::lavapipe()).unwrap();
        assert_eq!((s.wg, s.bk), (32, 32));
        // A browser's 16 KiB: the rows kernel at d = 128.
        assert!(fine_tiled_spec(128, 64, 64, &KernelLimits::webgpu_default()).is_none());
    }

    #[test]
    fn rows_is_the_default_and_its_plans_are_unchanged() {
        assert_eq!(FmaKernel::default(), FmaKernel::Rows);
        assert_eq!(
            FmaKernel::for_device(wgpu::DeviceType::Cpu),
            FmaKernel::Rows
        );
        assert_eq!(
            FmaKernel::for_device(wgpu::DeviceType::IntegratedGpu),
            FmaKernel::Tiled
        );
        let limits = KernelLimits::lavapipe();
        for (shape, cfg) in [
            (Shape::new(1, 4, 4096, 64), FmaConfig::new(64, 2)),
            (
                Shape::new(2, 2, 1025, 40),
                FmaConfig::new(16, 2).causal(true),
            ),
            (
                Shape::new(1, 3, 45 * 70, 16),
                FmaConfig::new(8, 2).grid(Some(Grid::new(45, 70))),
            ),
        ] {
            let rows = FmaPlan::with_kernel(shape, &cfg, &limits, FmaKernel::Rows).unwrap();
            let new = FmaPlan::new(shape, &cfg, &limits).unwrap();
            assert_eq!(rows.steps(), new.steps());
            assert_eq!(rows.tiles_per_block, new.tiles_per_block);
            assert_eq!(rows.attention.pass, Pass::FineAttention);
        }
        // Head dimensions out of range: the typed error of either kernel.
        assert!(fine_kernel_spec(FmaKernel::Tiled, 0, 64, 64, &limits).is_err());
        assert!(fine_kernel_spec(FmaKernel::Tiled, 257, 64, 64, &limits).is_err());
    }

    #[test]
    fn plans_count_tiles_of_the_tiled_pass() {
        let gpu = KernelLimits::discrete_gpu();
        // m = 128 at d = 64: tiles of 64 queries, two per block; the other steps as the rows
        // plan's.
        let shape = Shape::new(2, 3, 1000, 64);
        let cfg = FmaConfig::new(128, 2);
        let plan = FmaPlan::with_kernel(shape, &cfg, &gpu, FmaKernel::Tiled).unwrap();
        let rows = FmaPlan::new(shape, &cfg, &gpu).unwrap();
        let a = plan.attention;
        assert_eq!((a.pass, a.spec.wg, a.spec.bk), (Pass::FineTiled, 64, 32));
        assert_eq!(plan.tiles_per_block, 2);
        assert_eq!(a.workgroups, 6 * plan.query_blocks as u32 * 2);
        assert_eq!(plan.downsample, rows.downsample);
        // The softmax flags and the grid reach its specialisation.
        let grid = Grid::new(40, 40);
        let g = FmaPlan::with_kernel(
            Shape::new(1, 1, 1600, 16),
            &FmaConfig::new(8, 2)
                .grid(Some(grid))
                .queries(Queries::Coarse),
            &gpu,
            FmaKernel::Tiled,
        )
        .unwrap();
        assert_eq!(g.attention.pass, Pass::FineTiled);
        assert!(g.attention.spec.grid);
        assert_eq!((g.attention.spec.wg, g.attention.spec.bk), (64, 32));
        // A variable-length batch: each sequence's blocks times the tiles per block.
        let seqs = crate::sequences::Sequences::packed(vec![1, 200, 64]).unwrap();
        let v =
            FmaPlan::for_sequences_with(&seqs, (2, 1, 64), &cfg, &gpu, FmaKernel::Tiled).unwrap();
        assert_eq!(v.attention.pass, Pass::FineTiled);
        // Blocks of 128 (the longest sequence's), two tiles each: 1 + 2 + 1 blocks.
        assert_eq!(v.sequences.as_ref().unwrap().tiles, 2 + 4 + 2);
        // A split head: its chunks run the tiled pass too.
        let small = gpu.capped(32 << 10);
        let split =
            SplitPlan::with_kernel(2000, 16, &FmaConfig::new(32, 2), &small, FmaKernel::Tiled)
                .unwrap();
        assert!(split.chunks.len() > 1);
        assert!(split
            .chunks
            .iter()
            .all(|c| c.attention.pass == Pass::FineTiled));
    }
}
