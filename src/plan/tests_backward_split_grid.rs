//! The split backward of one 2D head (issue 27; `backward_split.rs` on a grid, algorithm.md
//! §9), planned without a GPU: the split forward's chunks of whole rows of fine cells, each
//! chunk's dQ and near-field dK/dV over exactly its cells (together the head's), D over its
//! bound rows, the downsampling's backward over its tokens; `plan --backward`'s listing; and
//! what a 2D head over a binding still cannot split, as typed errors.

use crate::config::{Downsample, FmaConfig, Queries};
use crate::error::FmaError;
use crate::geometry::Grid;
use crate::plan::{fma_depths, BackwardSplitPlan, FmaPlan, KernelLimits, Pass};
use crate::problem::Problem;
use crate::shape::Shape;
use crate::weights::LearnedWeights;

/// (H, W, d, r, p, binding): grids whose heads exceed the binding, wide and tall, odd sides,
/// partial cells at the bottom and right edges.
fn cases() -> Vec<(usize, usize, usize, usize, usize, u64)> {
    vec![
        (7, 13, 4, 2, 1, 1280),
        (13, 7, 8, 2, 1, 2048),
        (17, 29, 8, 4, 2, 12 << 10),
        (45, 70, 4, 4, 1, 16 << 10),
        (20, 24, 8, 4, 2, 12 << 10),
    ]
}

#[test]
fn a_grid_head_splits_its_backward_in_rows_of_cells() {
    let mut heads_over = 0;
    for (h, w, d, r, p, binding) in cases() {
        let (n, grid) = (h * w, Grid::new(h, w));
        let label = format!("{grid} d={d} r={r} p={p} binding {binding}");
        let limits = KernelLimits::with_binding(binding);
        let cfg = FmaConfig::new(r, p).grid(Some(grid));
        // The unsplit plan of the head is refused: it is over the binding.
        assert!(
            FmaPlan::new(Shape::new(1, 1, n, d), &cfg, &limits).is_err(),
            "{label}"
        );
        let plan = BackwardSplitPlan::new(n, d, &cfg, &limits).expect(&label);
        let chunks = &plan.split.chunks;
        assert!(chunks.len() > 1, "{label}: one chunk");
        // The LSE and D are bound per chunk: within the binding even where the head's are not
        // (45 x 70 at d = 4: 25 200 bytes of a 16 KiB binding).
        assert!(plan.head.stats_bytes <= binding, "{label}");
        let chunk_rows = chunks.iter().map(|c| c.rows).max().unwrap();
        assert_eq!(plan.head.stats_bytes, chunk_rows as u64 * 8, "{label}");
        assert_eq!(chunks.len(), plan.chunks.len(), "{label}");
        let (unit, cell_cols) = (r * w, w.div_ceil(r));
        let tpb = plan.head.forward.tiles_per_block as usize;
        let d4 = d.div_ceil(4);
        let mut next = 0;
        let mut tiles = 0;
        for (c, b) in chunks.iter().zip(&plan.chunks) {
            assert_eq!(c.lo, next, "{label}");
            assert_eq!(
                c.lo % unit,
                0,
                "{label}: a chunk starts inside a row of cells"
            );
            assert!((c.rows * d * 4) as u64 <= binding, "{label}");
            // The chunk's fine cells (whole rows of them), one tile each, as the forward's.
            let cells = (c.hi.div_ceil(w).div_ceil(r) - c.lo / w / r) * cell_cols;
            assert_eq!(plan.split.blocks(c), cells, "{label}");
            assert_eq!(b.dq.workgroups as usize, cells * tpb, "{label}");
            assert_eq!(b.dkv_fine.workgroups, b.dq.workgroups, "{label}");
            assert_eq!(b.dq.workgroups, c.attention.workgroups, "{label}");
            // D over the bound rows (the halo's queries read the chunk's keys).
            let wg = b.delta.spec.wg as usize;
            assert_eq!(b.delta.workgroups as usize, c.rows.div_ceil(wg), "{label}");
            // dK~, dV~ into the chunk's own tokens.
            let unpool = b.downsample_backward.expect("Average pooling's backward");
            let wg = unpool.spec.wg as usize;
            assert_eq!(
                unpool.workgroups as usize,
                ((c.hi - c.lo) * d4).div_ceil(wg),
                "{label}"
            );
            for s in [b.delta, b.dq, b.dkv_fine, unpool] {
                assert!(s.grid.iter().all(|&g| g <= 65535), "{label}: {s:?}");
            }
            tiles += b.dq.workgroups;
            next = c.hi;
        }
        assert_eq!(next, n, "{label}");
        heads_over += usize::from(n as u64 * 8 > binding);
        // Every fine cell's dQ and near-field dK/dV once: the chunks' tiles are the head's.
        assert_eq!(tiles, plan.head.dq.workgroups, "{label}");
        assert_eq!(tiles, plan.head.dkv_fine.workgroups, "{label}");
        let passes = plan.passes();
        let count = |x: Pass| passes.iter().filter(|&&y| y == x).count();
        assert_eq!(count(Pass::BackwardDq), chunks.len(), "{label}");
        let groups: usize = plan.dkv_groups.iter().map(Vec::len).sum();
        assert!(groups >= plan.head.dkv_coarse.len(), "{label}");
        assert_eq!(
            count(Pass::BackwardDkvCoarse),
            chunks.len() * groups,
            "{label}"
        );
    }
    assert!(
        heads_over > 0,
        "no case whose head's LSE and D exceed the binding"
    );
}

#[test]
fn the_plan_listing_shows_a_split_grid_head_per_chunk() {
    // What `multipole-attn plan --grid 45,70 --backward` prints under a small binding: the
    // chunks' dispatches, not the binding error; GQA heads run the same list.
    let limits = KernelLimits::with_binding(16 << 10);
    let cfg = FmaConfig::new(4, 1).grid(Some(Grid::new(45, 70)));
    let problem = Problem::new(Shape::new(1, 2, 3150, 4).with_kv_heads(1));
    let all = fma_depths(&problem, &cfg, &limits, true).unwrap();
    let chunks = BackwardSplitPlan::new(3150, 4, &cfg, &limits)
        .unwrap()
        .chunks
        .len();
    assert!(chunks > 1);
    let count = |x: Pass| all.iter().filter(|d| d.dispatch.pass == x).count();
    for pass in [
        Pass::FineAttention,
        Pass::BackwardDelta,
        Pass::BackwardDq,
        Pass::BackwardDkvFine,
        Pass::DownsampleBackward,
    ] {
        assert_eq!(count(pass), chunks, "{pass:?}");
    }
}

#[test]
fn what_a_split_grid_backward_does_not_run_is_a_typed_error() {
    let grid = Some(Grid::new(45, 70));
    let limits = KernelLimits::with_binding(16 << 10);
    let refused =
        |cfg: &FmaConfig, d: usize, word: &str| match BackwardSplitPlan::new(3150, d, cfg, &limits)
        {
            Err(FmaError::LimitExceeded { what, advice, .. }) => {
                assert!(what.contains(word), "{what}");
                assert!(advice.contains("2D grid"), "{advice}");
            }
            other => panic!("expected LimitExceeded on {word}, got {other:?}"),
        };
    // Coarse queries (the 2D forward splits them; their backward does not yet split).
    let coarse = FmaConfig::new(4, 2).grid(grid).queries(Queries::Coarse);
    refused(&coarse, 4, "coarse queries");
    // Learned pooling: its weights outgrow a binding before a head does.
    let lw = LearnedWeights::box_init_grid_for(4, 4, 1, Grid::new(45, 70));
    let learned = FmaConfig::new(4, 1)
        .grid(grid)
        .downsample(Downsample::Learned(lw));
    refused(&learned, 4, "Learned");
    // A grid of one row of cells (1 x N) cannot be cut in rows of cells: the forward's error.
    let one_row = FmaConfig::new(16, 1).grid(Some(Grid::new(1, 3150)));
    let e = BackwardSplitPlan::new(3150, 4, &one_row, &limits).unwrap_err();
    assert!(
        matches!(&e, FmaError::LimitExceeded { what, .. } if what.contains("row of fine cells")),
        "{e}"
    );
    // A single column (N x 1): the reader chunks' partial sums of the coarse dK~/dV~, planned
    // for full cells' 27 s_l^2 readers (`max_readers`), outgrow the binding before the tokens
    // do, as in an unsplit backward: a typed error that says so.
    let column = FmaConfig::new(4, 1).grid(Some(Grid::new(97, 1)));
    let limits_column = KernelLimits::with_binding(4 << 10);
    let e = BackwardSplitPlan::new(97, 8, &column, &limits_column).unwrap_err();
    assert!(
        matches!(&e, FmaError::LimitExceeded { what, .. } if what.contains("partial sums")),
        "{e}"
    );
    // Coarse rows over the binding (no 2D split_coarse): the forward's error.
    let small = FmaConfig::new(2, 2).grid(grid);
    let e = BackwardSplitPlan::new(3150, 8, &small, &limits).unwrap_err();
    assert!(
        matches!(&e, FmaError::LimitExceeded { what, .. } if what.contains("coarse")),
        "{e}"
    );
}
