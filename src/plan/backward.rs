//! The scheduler of the backward pass (algorithm.md §8): (shape, config, adapter limits) -> the
//! dispatches of one FMA backward, fine or coarse queries (§6), 1D or on a 2D grid (§9: the same
//! passes, composed with the grid's index maps). Pure arithmetic, unit-tested without a GPU;
//! `gpu/fma/backward.rs` executes it. Recording order (one submit):
//!
//! 1. the forward's downsample dispatches (coarse K~, V~, and Q~ with coarse queries,
//!    recomputed, not stored),
//! 2. `delta`: D = rowsum(dO * O) next to the LSE,
//! 3. `dq`: dQ, the forward's workgroups over the same gather lists (coarse queries: the near
//!    field only),
//! 4. coarse queries only: `coarse_stats`, per level in order, what each coarse-query row's
//!    tokens send back to it (G, R, H; level l from level l-1), then `coarse_dq`, per level,
//!    dQ~ over the row's far list,
//! 5. `dkv_coarse`: per level, dK~ and dV~ gathered over the windows whose far list holds them
//!    (coarse queries: over those windows' coarse-query rows), in chunks of
//!    [`DKV_COARSE_CHUNK`] readers, each level followed by the rounds of `dkv_combine` that add
//!    its chunks' partial sums (none for a level of one chunk),
//! 6. `dkv_fine`: dK, dV of the near field, gathered over the query blocks that read each block,
//! 7. `downsample_backward`: adds the coarse gradients to dK, dV (coarse queries: and dQ~ to
//!    dQ) through the downsampling,
//! 8. `weights_backward`: per level, dW and db of keys and values (Learned mode only), and
//!    `weights_backward_q` those of the queries (Learned mode with coarse queries).

use super::limits::BINDING_BYTES;
use crate::config::{Downsample, FmaConfig, Queries};
use crate::error::{FmaError, Result};
use crate::gradients::LevelGradients;
use crate::plan::{dispatch, Dispatch, FmaPlan, KernelLimits, MAX_KEY_TILE, MIN_KEY_TILE};
use crate::plan::{Pass, SoftmaxFlags, Specialization};
use crate::shape::Shape;
use crate::storage::Storage;

/// Invocations per workgroup of the element-wise backward passes (delta, downsample and
/// weight gradients) and of the coarse dK~/dV~ pass.
pub const BACKWARD_WG: u32 = 64;

/// Coarse rows one workgroup of the coarse dK~/dV~ pass handles: enough that each of its
/// `wg` invocations owns one (row, vec4 of channels) output. Mirror of `PR` in
/// `shaders/backward_dkv_coarse.wgsl`.
pub fn coarse_rows_per_workgroup(wg: u32, d4: u32) -> u32 {
    (wg / d4).max(1)
}

/// Queries of a coarse row's readers one workgroup of the coarse dK~/dV~ pass walks: a reader
/// chunk. 256 = 8 tiles of 32; the near field of m = 64 is 192 queries.
pub const DKV_COARSE_CHUNK: u32 = 256;

/// Windows (over all K/V heads) one invocation of `weights_backward` sums for its weight
/// element: 64 windows, 4 rows each (dK~, K, dV~, V).
pub const WEIGHT_CHUNK_WINDOWS: u32 = 64;

/// Chunks of `windows` (a level's, over all K/V heads) for `weights_backward`.
pub fn weight_chunks(windows: u64) -> u64 {
    windows.div_ceil(WEIGHT_CHUNK_WINDOWS as u64).max(1)
}

/// Partial sums one invocation of a combine round adds (`shaders/backward_dkv_combine.wgsl`).
pub const COMBINE_FAN_IN: u64 = 16;

/// The most queries that read one coarse row of a level of group size `window` (per query
/// head): 1D, the tokens of its 3 reader windows (causal: 2), each of `window`; 2D, of its 27
/// reader cells of `window`^2; with coarse queries those groups' p coarse rows each.
pub fn max_readers(grid: bool, causal: bool, coarse_q: bool, window: usize, p: usize) -> u64 {
    let groups = match (grid, causal) {
        (true, _) => 27,
        (false, true) => 2,
        (false, false) => 3,
    };
    let size = if coarse_q {
        p
    } else {
        kernel_taps(grid, window)
    };
    (groups * size) as u64
}

/// Reader chunks of a coarse row read by `readers` queries (all query heads of a K/V head).
pub fn reader_chunks(readers: u64) -> u64 {
    readers.div_ceil(DKV_COARSE_CHUNK as u64).max(1)
}

/// The combine rounds of `chunks` partial sums per row: (stride, groups) of each, where round
/// r adds partials g F^(r+1) + i F^r (i < F = COMBINE_FAN_IN) into g F^(r+1), the last one
/// into the row itself. None for one chunk.
pub fn combine_rounds(chunks: u64) -> Vec<(u64, u64)> {
    let mut rounds = Vec::new();
    let mut stride = 1;
    while stride < chunks {
        rounds.push((stride, chunks.div_ceil(stride * COMBINE_FAN_IN)));
        stride *= COMBINE_FAN_IN;
    }
    rounds
}

/// Windows of a level whose reader chunks' partial sums (`per_window` rows each: p rows times
/// their reader chunks, of `d` floats) fit one binding after dK~'s first `partials_at`
/// elements: a split head's group of rows (`plan::DkvRowGroup`); 0 when not one window fits.
pub(super) fn partial_group_windows(
    partials_at: u64,
    per_window: u64,
    d: u64,
    limits: &KernelLimits,
) -> u64 {
    (limits.binding_bytes() / 4).saturating_sub(partials_at) / (per_window * d).max(1)
}

/// The coarse dK~/dV~ dispatch (`pass`) of `windows` windows of level index `level`, `k`
/// reader chunks per row and `p` rows per window, and the combine rounds of their rows'
/// partial sums (none for one chunk). `specs`: the two passes' specialisations.
pub(super) fn dkv_level_steps(
    pass: Pass,
    level: usize,
    windows: u64,
    (k, p): (u64, u64),
    (coarse_spec, combine_spec): (Specialization, Specialization),
    limits: &KernelLimits,
) -> Result<(Dispatch, Vec<Dispatch>)> {
    let chunks = p.div_ceil(coarse_rows_per_workgroup(coarse_spec.wg, coarse_spec.d4) as u64);
    let level_index = Some(level as u32);
    let mut step = dispatch(pass, level_index, windows * chunks * k, coarse_spec, limits)?;
    step.args = [k as u32, DKV_COARSE_CHUNK];
    let rows = windows * p;
    let rounds = combine_rounds(k)
        .into_iter()
        .map(|(stride, groups)| {
            let units = rows * groups * combine_spec.d4 as u64;
            let mut c = dispatch(
                Pass::BackwardDkvCombine,
                level_index,
                units.div_ceil(combine_spec.wg as u64),
                combine_spec,
                limits,
            )?;
            c.args = [k as u32, stride as u32];
            Ok(c)
        })
        .collect::<Result<Vec<_>>>()?;
    Ok((step, rounds))
}

/// Queries per tile of a dK/dV pass: as many (<= MAX_KEY_TILE = 32) as fit in workgroup memory next to
/// `fixed` bytes, at `per_query` bytes each.
fn query_tile(head_dim: usize, fixed: u32, per_query: u32, limits: &KernelLimits) -> Result<u32> {
    let bq = (limits.workgroup_storage.saturating_sub(fixed) / per_query).min(MAX_KEY_TILE);
    if bq < MIN_KEY_TILE {
        return Err(FmaError::LimitExceeded {
            what: format!("a backward tile of {MIN_KEY_TILE} queries of head_dim {head_dim}"),
            requested: (fixed + MIN_KEY_TILE * per_query) as u64,
            max: limits.workgroup_storage as u64,
            unit: "bytes of workgroup memory",
            advice: "use a smaller head_dim on this adapter".into(),
        });
    }
    Ok(bq)
}

/// Taps of a level's learned kernel: its window w_l (2D: s_l^2, the level's `window` being the
/// cell side).
fn kernel_taps(grid: bool, window: usize) -> usize {
    if grid {
        window * window
    } else {
        window
    }
}

/// The plan of one FMA backward.
#[derive(Clone, Debug)]
pub struct BackwardPlan {
    /// The forward's plan: its downsample dispatches are replayed, its geometry reused.
    pub forward: FmaPlan,
    /// D = rowsum(dO * O), one invocation per row.
    pub delta: Dispatch,
    /// dQ: one workgroup per query tile of a fine block, as the forward.
    pub dq: Dispatch,
    /// Coarse queries: (G, R, H) of every coarse-query row, one dispatch per level in level
    /// order (empty with fine queries).
    pub coarse_stats: Vec<Dispatch>,
    /// Coarse queries: dQ~, one dispatch per level (empty with fine queries).
    pub coarse_dq: Vec<Dispatch>,
    /// dK~, dV~: one dispatch per coarse level, a workgroup per (window, rows, reader chunk).
    pub dkv_coarse: Vec<Dispatch>,
    /// Per coarse level, the rounds that add its reader chunks' partial sums into dK~, dV~
    /// (empty for a level of one chunk, which writes them directly).
    pub dkv_combine: Vec<Vec<Dispatch>>,
    /// The f32 element of dK~ and dV~ where the partial sums of the reader chunks start.
    pub partials_at: usize,
    /// Elements of those partial sums (each of dK~ and dV~; the largest level's).
    pub partial_elements: usize,
    /// dK, dV of the near field: one workgroup per key tile of a fine block.
    pub dkv_fine: Dispatch,
    /// dK, dV through the downsampling (absent when there is no coarse level).
    pub downsample_backward: Option<Dispatch>,
    /// dW, db of keys and values: one dispatch per coarse level (Learned mode only), a
    /// workgroup per (elements, chunk of the level's windows).
    pub weights_backward: Vec<Dispatch>,
    /// Per level of `weights_backward`, the rounds that add its chunks' partial sums (empty for
    /// a level of one chunk).
    pub weights_combine: Vec<Vec<Dispatch>>,
    /// dWQ, dbQ: one dispatch per coarse level (Learned mode with coarse queries only), a
    /// workgroup per (elements, chunk of the level's windows).
    pub weights_backward_q: Vec<Dispatch>,
    /// Per level of `weights_backward_q`, the rounds that add its chunks' partial sums.
    pub weights_q_combine: Vec<Vec<Dispatch>>,
    /// The f32 element of dQ~ where the query weights' partial sums start.
    pub q_partials_at: usize,
    /// Elements of those partial sums (the largest level's).
    pub q_partial_elements: usize,
    /// Bytes of the (batch*heads, seq, 2) buffer of LSE and D.
    pub stats_bytes: u64,
    /// Elements of each of the concatenated weight-gradient buffers (dWK, dWV) over the
    /// levels the sequence uses; 0 in Average mode.
    pub weight_elements: usize,
    /// Elements of each of the concatenated bias-gradient buffers (dbK, dbV).
    pub bias_elements: usize,
    /// A padded variable-length batch: zeros the gradients' padding rows (last).
    pub pad: Option<Dispatch>,
    /// A variable-length batch: the f32 element of the stats and of dK~ where the executor
    /// writes a copy of the sequence table (after both buffers' own contents), read by the
    /// passes with no binding to spare (`params.table_at`); 0 otherwise.
    pub table_at: usize,
}

/// What the backward's gather passes run over: a batch of equal sequences' tiles and windows,
/// or a variable-length batch's (its sequence table's totals), over all K/V heads.
#[derive(Clone, Debug)]
pub(super) struct Work {
    /// Key tiles of the near-field dK/dV pass.
    pub fine_tiles: u64,
    /// Windows of each coarse level.
    pub level_windows: Vec<u64>,
    /// Elements of K (the real tokens') the downsampling's backward adds into.
    pub kv_elements: u64,
    /// Rows of the LSE and D bound at once: the shape's (a split head: its largest chunk's).
    pub stats_rows: u64,
    /// A split head of fine queries: the coarse dK~/dV~ pass runs each level in groups of
    /// windows whose reader chunks' partial sums fit one binding (`plan::DkvRowGroup`), so
    /// only the largest group's are sized and checked; false: every level's whole.
    pub group_partials: bool,
}

impl BackwardPlan {
    /// Plans the backward of FMA for `shape` and `cfg` under `limits`; every limit is checked
    /// here, before anything is recorded.
    pub fn new(shape: Shape, cfg: &FmaConfig, limits: &KernelLimits) -> Result<Self> {
        // 2D (algorithm.md §9): the same passes through the grid's index maps (FmaPlan plans
        // its levels and refuses what 2D does not run).
        let forward = FmaPlan::new(shape, cfg, limits)?;
        let kv_bh = shape.kv_batch_heads() as u64;
        let work = Work {
            fine_tiles: kv_bh * forward.query_blocks as u64 * forward.tiles_per_block as u64,
            level_windows: forward
                .levels
                .levels
                .iter()
                .map(|lv| kv_bh * lv.windows as u64)
                .collect(),
            kv_elements: shape.kv_elements() as u64,
            stats_rows: shape.rows() as u64,
            group_partials: false,
        };
        Self::build(forward, cfg, limits, work)
    }

    /// The backward passes over `forward`'s work: its shape's rows, its tiles and windows as
    /// `work` counts them (a batch of equal sequences or a variable-length batch).
    pub(super) fn build(
        forward: FmaPlan,
        cfg: &FmaConfig,
        limits: &KernelLimits,
        work: Work,
    ) -> Result<Self> {
        let coarse_q = cfg.queries == Queries::Coarse;
        let shape = forward.shape;
        // Query heads per K/V head: the coarse-query passes run over query heads.
        let group = shape.group() as u64;
        let grid = forward.grid.is_some();
        let (d, p) = (shape.head_dim, forward.levels.p);
        let stats_bytes = work.stats_rows * 8;
        if stats_bytes > limits.max_binding.min(limits.max_buffer) {
            return Err(FmaError::LimitExceeded {
                what: "the LSE and D of every row of the backward".into(),
                requested: stats_bytes,
                max: limits.max_binding.min(limits.max_buffer),
                unit: BINDING_BYTES,
                advice: "differentiate fewer heads per backward call".into(),
            });
        }
        let wg = BACKWARD_WG.min(limits.max_workgroup);
        // delta reads no index map of the geometry; the other element-wise passes do.
        let delta_spec = Specialization {
            wg,
            bk: 1,
            d4: 1,
            grid: false,
            softmax: SoftmaxFlags::PLAIN,
            storage: Storage::F32,
        };
        let elementwise = Specialization { grid, ..delta_spec };
        let d4 = d.div_ceil(4) as u32;

        let delta = dispatch(
            Pass::BackwardDelta,
            None,
            (shape.rows() as u64).div_ceil(wg as u64),
            delta_spec,
            limits,
        )?;
        // dQ stages the same key tiles as the forward: same workgroups, same specialisation.
        let att = forward.attention;
        let dq = Dispatch {
            pass: Pass::BackwardDq,
            ..att
        };
        // dK/dV of the near field: the forward's tiles with keys and queries swapped; a query
        // row costs q and dO (two vec4-padded rows) plus LSE and D.
        let fine_spec = Specialization {
            bk: query_tile(d, 0, 2 * d4 * 16 + 8, limits)?,
            ..att.spec
        };
        // One workgroup per tile of a K/V head's keys (grouped-query attention: the K/V heads,
        // each summing its group of query heads).
        let dkv_fine = dispatch(
            Pass::BackwardDkvFine,
            None,
            work.fine_tiles,
            fine_spec,
            limits,
        )?;
        // Coarse dK~/dV~: PR rows (k~, v~ and a bias each) fixed, then per query its row
        // pair, its token (the queries are gathered) plus P and dS for each of the PR rows.
        let pr = coarse_rows_per_workgroup(wg, d4);
        let coarse_spec = Specialization {
            wg,
            bk: query_tile(d, pr * (2 * d4 * 16 + 4), 2 * d4 * 16 + 12 + 8 * pr, limits)?,
            d4,
            grid,
            // The softcap reaches the coarse keys' gradients (the window has no coarse level,
            // the sinks no key).
            softmax: att.spec.softmax,
            storage: Storage::F32,
        };
        let combine_spec = Specialization { d4, ..elementwise };
        // The partial sums follow dK~'s and dV~'s own rows (and a variable-length batch's table
        // copy in dK~: `for_sequences` moves them past it).
        let partials_at = forward.workspace.coarse_kv_bytes.div_ceil(4);
        // Each coarse row's readers (3 w_l queries at level l in 1D: O(n) at the top level) in
        // chunks of DKV_COARSE_CHUNK, one workgroup each, so no workgroup's walk grows with n;
        // a level of more than one chunk writes partial sums, added by a tree of combine rounds.
        let mut dkv_coarse = Vec::new();
        let mut dkv_combine = Vec::new();
        let mut partial_rows = 0u64;
        for (i, &windows) in work.level_windows.iter().enumerate() {
            let pass = if coarse_q {
                Pass::BackwardDkvCoarseQ
            } else {
                Pass::BackwardDkvCoarse
            };
            let window = forward.levels.levels[i].window;
            let readers = max_readers(grid, cfg.causal, coarse_q, window, p) * group;
            let k = reader_chunks(readers);
            let specs = (coarse_spec, combine_spec);
            let (step, rounds) = dkv_level_steps(pass, i, windows, (k, p as u64), specs, limits)?;
            dkv_coarse.push(step);
            if k > 1 {
                // A split head of fine queries runs the level in groups of windows whose
                // partial sums fit one binding (`plan::DkvRowGroup`); everyone else whole.
                let mut held = windows;
                if work.group_partials && !coarse_q {
                    let fit = partial_group_windows(partials_at, k * p as u64, d as u64, limits);
                    held = held.min(fit.max(1));
                }
                partial_rows = partial_rows.max(held * p as u64 * k);
            }
            dkv_combine.push(rounds);
        }
        let mut partial_elements = partial_rows * d as u64;
        // Coarse queries: per level, (G, R, H) of each query head's coarse rows (d + 1 units
        // per row), then dQ~ (one invocation per row, D4-wide private rows).
        let (mut coarse_stats, mut coarse_dq) = (Vec::new(), Vec::new());
        if coarse_q {
            let p = p as u64;
            for (i, &windows) in work.level_windows.iter().enumerate() {
                let rows = windows * group * p;
                let level = Some(i as u32);
                coarse_stats.push(dispatch(
                    Pass::BackwardCoarseStats,
                    level,
                    (rows * (d as u64 + 1)).div_ceil(wg as u64),
                    elementwise,
                    limits,
                )?);
                coarse_dq.push(dispatch(
                    Pass::BackwardCoarseDq,
                    level,
                    rows.div_ceil(wg as u64),
                    Specialization { d4, ..elementwise },
                    limits,
                )?);
            }
        }
        // The workgroups of K and V's tokens, then (coarse queries) those of Q's; an invocation
        // per token and vec4 of channels.
        let kv_units = work.kv_elements / d as u64 * d4 as u64;
        let q_wgs = if coarse_q {
            (kv_units * group).div_ceil(wg as u64)
        } else {
            0
        };
        let downsample_backward = if forward.levels.count() > 0 {
            Some(dispatch(
                Pass::DownsampleBackward,
                None,
                kv_units.div_ceil(wg as u64) + q_wgs,
                Specialization { d4, ..elementwise },
                limits,
            )?)
        } else {
            None
        };
        let learned = matches!(cfg.downsample, Downsample::Learned(_));
        let (mut weights_backward, mut weights_backward_q) = (Vec::new(), Vec::new());
        let (mut weights_combine, mut weights_q_combine) = (Vec::new(), Vec::new());
        // The query weights' partial sums follow dQ~'s rows.
        let q_partials_at = forward.workspace.coarse_bytes.div_ceil(4);
        let mut q_partial_elements = 0u64;
        let (mut weight_elements, mut bias_elements) = (0usize, 0usize);
        if learned {
            for (i, lv) in forward.levels.levels.iter().enumerate() {
                let taps = kernel_taps(grid, lv.window);
                let threads = (d * p * (taps + 1)) as u64;
                let passes: &[Pass] = if coarse_q {
                    &[Pass::WeightsBackward, Pass::WeightsBackwardQ]
                } else {
                    &[Pass::WeightsBackward]
                };
                for &pass in passes {
                    // The level's windows over every K/V head (query heads for the query
                    // weights) in chunks: n / w_l per head, O(n) at level 1; a level of more
                    // than one chunk is added by a tree of combine rounds.
                    let (windows, combine) = match pass {
                        Pass::WeightsBackward => {
                            (work.level_windows[i], Pass::WeightsBackwardCombine)
                        }
                        _ => (work.level_windows[i] * group, Pass::WeightsBackwardQCombine),
                    };
                    let chunks = weight_chunks(windows);
                    let mut step = dispatch(
                        pass,
                        Some(i as u32),
                        threads.div_ceil(wg as u64) * chunks,
                        elementwise,
                        limits,
                    )?;
                    step.args = [chunks as u32, WEIGHT_CHUNK_WINDOWS];
                    let rounds = combine_rounds(chunks)
                        .into_iter()
                        .map(|(stride, groups)| {
                            let mut c = dispatch(
                                combine,
                                Some(i as u32),
                                (threads * groups).div_ceil(wg as u64),
                                elementwise,
                                limits,
                            )?;
                            c.args = [chunks as u32, stride as u32];
                            Ok(c)
                        })
                        .collect::<Result<Vec<_>>>()?;
                    // K and V: a (K, V) pair per element and chunk after dV~'s rows; Q: one
                    // per element and chunk after dQ~'s.
                    if pass == Pass::WeightsBackward {
                        if chunks > 1 {
                            partial_elements = partial_elements.max(threads * chunks * 2);
                        }
                        weights_backward.push(step);
                        weights_combine.push(rounds);
                    } else {
                        if chunks > 1 {
                            q_partial_elements = q_partial_elements.max(threads * chunks);
                        }
                        weights_backward_q.push(step);
                        weights_q_combine.push(rounds);
                    }
                }
                weight_elements += d * p * taps;
                bias_elements += d * p;
            }
        }
        // K~ and V~ recomputed hold the downsample pass's partial sums from the same element.
        limits.check_binding(
            "the backward's dK~ or dV~ with its partial sums",
            (partials_at + partial_elements.max(forward.workspace.pool_partials_kv)) * 4,
            "differentiate fewer heads per backward call",
        )?;
        if q_partial_elements > 0 {
            limits.check_binding(
                "the backward's dQ~ with its partial sums",
                (q_partials_at + q_partial_elements) * 4,
                "differentiate fewer heads per backward call",
            )?;
        }
        Ok(Self {
            forward,
            delta,
            dq,
            coarse_stats,
            coarse_dq,
            dkv_coarse,
            dkv_combine,
            partials_at: partials_at as usize,
            partial_elements: partial_elements as usize,
            dkv_fine,
            downsample_backward,
            weights_backward,
            weights_combine,
            weights_backward_q,
            weights_q_combine,
            q_partials_at: q_partials_at as usize,
            q_partial_elements: q_partial_elements as usize,
            stats_bytes,
            weight_elements,
            bias_elements,
            pad: None,
            table_at: 0,
        })
    }

    /// Splits a backward's concatenated weight gradients (the layout of
    /// `gpu::WeightGradTensors`: level after level, each used level's (head_dim, p, taps)
    /// weights, `weight_elements` in all, and its (head_dim, p) biases, `bias_elements`) into one
    /// [`LevelGradients`] per level this plan uses. `w` = [dWK, dWV, dWQ], `b` = [dbK, dbV, dbQ].
    pub fn split_weight_gradients(
        &self,
        [wk, wv, wq]: [&[f32]; 3],
        [bk, bv, bq]: [&[f32]; 3],
    ) -> Vec<LevelGradients<f32>> {
        let (d, p) = (self.forward.shape.head_dim, self.forward.levels.p);
        let grid = self.forward.grid.is_some();
        let (mut wo, mut bo) = (0, 0);
        self.forward
            .levels
            .levels
            .iter()
            .map(|lv| {
                let (wl, bl) = (d * p * kernel_taps(grid, lv.window), d * p);
                let (w, b) = (wo..wo + wl, bo..bo + bl);
                (wo, bo) = (w.end, b.end);
                LevelGradients {
                    wk: wk[w.clone()].to_vec(),
                    bk: bk[b.clone()].to_vec(),
                    wv: wv[w.clone()].to_vec(),
                    bv: bv[b.clone()].to_vec(),
                    wq: wq[w].to_vec(),
                    bq: bq[b].to_vec(),
                }
            })
            .collect()
    }

    /// The plan with every pass composed for `storage` (issue 29): Q, K, V, O, dO and the
    /// gradients as that type (the coarse rows and their gradients stay f32); dispatches and
    /// sizes do not change.
    pub fn with_storage(mut self, storage: Storage) -> Self {
        self.forward = self.forward.with_storage(storage);
        let all = [&mut self.delta, &mut self.dq, &mut self.dkv_fine]
            .into_iter()
            .chain(self.coarse_stats.iter_mut())
            .chain(self.coarse_dq.iter_mut())
            .chain(self.dkv_coarse.iter_mut())
            .chain(self.dkv_combine.iter_mut().flatten())
            .chain(self.downsample_backward.iter_mut())
            .chain(self.weights_backward.iter_mut())
            .chain(self.weights_combine.iter_mut().flatten())
            .chain(self.weights_backward_q.iter_mut())
            .chain(self.weights_q_combine.iter_mut().flatten())
            .chain(self.pad.iter_mut());
        for d in all {
            d.spec.storage = storage;
        }
        self
    }

    /// Every dispatch in recording order, the forward's downsample dispatches first.
    pub fn dispatches(&self) -> Vec<Dispatch> {
        let mut all = self.forward.pool_steps();
        all.push(self.delta);
        all.push(self.dq);
        all.extend(&self.coarse_stats);
        all.extend(&self.coarse_dq);
        for (step, rounds) in self.dkv_coarse.iter().zip(&self.dkv_combine) {
            all.push(*step);
            all.extend(rounds);
        }
        all.push(self.dkv_fine);
        all.extend(self.downsample_backward);
        for (step, rounds) in self.weights_backward.iter().zip(&self.weights_combine) {
            all.push(*step);
            all.extend(rounds);
        }
        for (step, rounds) in self.weights_backward_q.iter().zip(&self.weights_q_combine) {
            all.push(*step);
            all.extend(rounds);
        }
        all.extend(self.pad);
        all
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::weights::LearnedWeights;

    fn fits(s: Specialization, bytes: u32, limits: &KernelLimits) {
        assert!(
            bytes <= limits.workgroup_storage,
            "{s:?}: {bytes} bytes of workgroup memory"
        );
    }

    #[test]
    fn coarse_queries_add_their_passes_level_by_level() {
        // 4 query heads on 2 K/V heads, n = 100, m = 16, p = 2: levels of windows 16, 32
        // (ceil(100 / 16) = 7 and 4 windows), Learned mode.
        let (n, d) = (100, 16);
        let w = LearnedWeights::box_init_for(d, 16, 2, n);
        let cfg = FmaConfig::new(16, 2)
            .queries(Queries::Coarse)
            .downsample(Downsample::Learned(w));
        let shape = Shape::new(1, 4, n, d).with_kv_heads(2);
        let limits = KernelLimits::webgpu_default();
        let plan = BackwardPlan::new(shape, &cfg, &limits).unwrap();
        let fine = BackwardPlan::new(shape, &cfg.clone().queries(Queries::Fine), &limits).unwrap();
        let levels = plan.forward.levels.count();
        assert_eq!(levels, 2);
        assert_eq!(plan.coarse_stats.len(), levels);
        assert_eq!(plan.coarse_dq.len(), levels);
        assert_eq!(plan.weights_backward_q.len(), levels);
        assert!(fine.coarse_stats.is_empty() && fine.weights_backward_q.is_empty());
        let wg = plan.delta.spec.wg as u64;
        for (i, windows) in [7u64, 4].into_iter().enumerate() {
            // 4 query heads x windows x p rows; G's d channels and one (R, H) unit per row.
            let rows = 4 * windows * 2;
            assert_eq!(
                plan.coarse_stats[i].workgroups as u64,
                (rows * 17).div_ceil(wg)
            );
            assert_eq!(plan.coarse_dq[i].workgroups as u64, rows.div_ceil(wg));
            assert_eq!(plan.dkv_coarse[i].pass, Pass::BackwardDkvCoarseQ);
            assert_eq!(fine.dkv_coarse[i].pass, Pass::BackwardDkvCoarse);
        }
        // The downsampling's backward adds Q's 4 heads after K's and V's 2 (an invocation per
        // token and vec4 of channels: d / 4 per token).
        let kv = (2 * n * d / 4) as u64;
        assert_eq!(
            plan.downsample_backward.unwrap().workgroups as u64,
            kv.div_ceil(wg) + (2 * kv).div_ceil(wg)
        );
        // Recording order: the stats of every level before any dQ~ (level l pools level l-1's),
        // dQ~ before the downsampling's backward and the query weights' gradients read it.
        let order: Vec<Pass> = plan.dispatches().iter().map(|s| s.pass).collect();
        let first = |p: Pass| order.iter().position(|&x| x == p).unwrap();
        let last = |p: Pass| order.iter().rposition(|&x| x == p).unwrap();
        assert!(last(Pass::BackwardDq) < first(Pass::BackwardCoarseStats));
        assert!(last(Pass::BackwardCoarseStats) < first(Pass::BackwardCoarseDq));
        assert!(last(Pass::BackwardCoarseDq) < first(Pass::DownsampleBackward));
        assert!(last(Pass::BackwardCoarseDq) < first(Pass::WeightsBackwardQ));
        let levels_in_order: Vec<Option<u32>> = plan.coarse_stats.iter().map(|s| s.level).collect();
        assert_eq!(levels_in_order, vec![Some(0), Some(1)]);
    }

    #[test]
    fn combine_rounds_add_every_chunk_once_in_order() {
        assert!(combine_rounds(1).is_empty());
        assert_eq!(combine_rounds(2), vec![(1, 1)]);
        assert_eq!(combine_rounds(16), vec![(1, 1)]);
        assert_eq!(combine_rounds(17), vec![(1, 2), (16, 1)]);
        assert_eq!(
            combine_rounds(6144),
            vec![(1, 384), (16, 24), (256, 2), (4096, 1)]
        );
        // Replays the rounds as backward_dkv_combine.wgsl runs them: partial k holds the list
        // of chunks summed into it; the last round's group 0 is the row.
        for chunks in 1..700u64 {
            let mut parts: Vec<Vec<u64>> = (0..chunks).map(|k| vec![k]).collect();
            let rounds = combine_rounds(chunks);
            for (r, &(stride, groups)) in rounds.iter().enumerate() {
                let span = stride * COMBINE_FAN_IN;
                assert_eq!(groups, chunks.div_ceil(span));
                assert_eq!(r + 1 == rounds.len(), span >= chunks);
                for g in 0..groups {
                    let first = g * span;
                    let mut sum = Vec::new();
                    for i in 0..COMBINE_FAN_IN {
                        let k = first + i * stride;
                        if k < chunks {
                            sum.extend(std::mem::take(&mut parts[k as usize]));
                        }
                    }
                    parts[first as usize] = sum;
                }
            }
            assert_eq!(parts[0], (0..chunks).collect::<Vec<_>>(), "{chunks} chunks");
        }
    }

    #[test]
    fn a_reader_chunk_stays_below_the_loop_limit() {
        // The subgroup walk: an iteration per query plus one per row, RB = 4 rows per group,
        // at most PR = 64 rows (WG = 64, d <= 4): below WALK_ITERATIONS = 40000.
        let (pr, rb) = (64u32, 4u32);
        assert!(DKV_COARSE_CHUNK * (pr + pr.div_ceil(rb)) <= 40000);
        // The chunks cover every reader: 1D bidirectional 3 w_l, causal 2 w_l, 2D 27 s_l^2.
        assert_eq!(max_readers(false, false, false, 1024, 2), 3072);
        assert_eq!(max_readers(false, true, false, 1024, 2), 2048);
        assert_eq!(max_readers(true, false, false, 16, 2), 27 * 256);
        assert_eq!(max_readers(false, false, true, 1024, 4), 12);
        assert_eq!(reader_chunks(3072), 12);
        assert_eq!(reader_chunks(1), 1);
    }

    #[test]
    fn dispatch_counts_per_level_and_mode() {
        let shape = Shape::new(1, 4, 4096, 64);
        let w = LearnedWeights::box_init_for(64, 64, 2, 4096);
        let cfg = FmaConfig::new(64, 2).downsample(Downsample::Learned(w));
        let plan = BackwardPlan::new(shape, &cfg, &KernelLimits::lavapipe()).unwrap();
        assert_eq!(plan.dkv_coarse.len(), 5);
        assert_eq!(plan.weights_backward.len(), 5);
        assert_eq!(plan.dq.workgroups, plan.forward.attention.workgroups);
        assert_eq!(plan.dkv_fine.workgroups, 4 * 64);
        assert_eq!(plan.delta.workgroups, 4 * 4096 / 64);
        // d = 64: 16 vec4s, 4 coarse rows per workgroup, p = 2 rows per window: 1 chunk of
        // rows; the readers (3 w_l queries) in chunks of 256: 1, 2, 3, 6, 12 at windows 64 ..
        // 1024, and the levels of more than one a combine round (at most 16 chunks each).
        let chunks = [1, 2, 3, 6, 12];
        for (i, dsp) in plan.dkv_coarse.iter().enumerate() {
            let lv = plan.forward.levels.levels[i];
            assert_eq!(dsp.args, [chunks[i], DKV_COARSE_CHUNK]);
            assert_eq!(dsp.workgroups as usize, 4 * lv.windows * chunks[i] as usize);
            let rounds = &plan.dkv_combine[i];
            assert_eq!(rounds.len(), usize::from(chunks[i] > 1));
            for r in rounds {
                assert_eq!(r.args, [chunks[i], 1]);
                // An invocation per (row, vec4): 4 heads x windows x p = 2 rows x 16 vec4s.
                assert_eq!(
                    r.workgroups as usize,
                    (4 * lv.windows * 2 * 16).div_ceil(64)
                );
            }
        }
        // Partial sums: the largest level's rows times chunks, after dK~'s rows.
        let most = (0..5)
            .filter(|&i| chunks[i] > 1)
            .map(|i| 4 * plan.forward.levels.levels[i].windows * 2 * chunks[i] as usize * 64)
            .max()
            .unwrap();
        // Learned: each weight element's sum over the level's 4 heads x windows (256, 128,
        // 64, 32, 16) in chunks of 64 windows, its (K, V) partials after dV~'s rows.
        let weight_chunks = [4u64, 2, 1, 1, 1];
        for (i, step) in plan.weights_backward.iter().enumerate() {
            assert_eq!(step.args, [weight_chunks[i] as u32, WEIGHT_CHUNK_WINDOWS]);
            assert_eq!(
                plan.weights_combine[i].len(),
                usize::from(weight_chunks[i] > 1)
            );
        }
        let threads = |w: u64| 64 * 2 * (w + 1);
        let weights_most = (threads(64) * 4 * 2).max(threads(128) * 2 * 2) as usize;
        assert_eq!(plan.partial_elements, most.max(weights_most));
        assert_eq!(
            plan.partials_at as u64 * 4,
            plan.forward.workspace.coarse_kv_bytes
        );
        // 5 downsample + 2 downsample combine (Learned taps 512 and 1024 in chunks of 256) +
        // delta + dq + 5 coarse + 4 combine + fine + downsample_backward + 5 weights + 2 combine.
        assert_eq!(plan.dispatches().len(), 27);
        assert_eq!(plan.weight_elements, 64 * 2 * (64 + 128 + 256 + 512 + 1024));
        let avg =
            BackwardPlan::new(shape, &FmaConfig::new(64, 2), &KernelLimits::lavapipe()).unwrap();
        assert!(avg.weights_backward.is_empty());
        assert_eq!(avg.weight_elements, 0);
        let flat = BackwardPlan::new(
            Shape::new(1, 1, 7, 16),
            &FmaConfig::new(4, 2),
            &KernelLimits::lavapipe(),
        )
        .unwrap();
        assert!(flat.downsample_backward.is_none() && flat.dkv_coarse.is_empty());
    }

    #[test]
    fn a_grid_plans_its_cells_and_square_kernels() {
        // 45 x 70 tokens, cells 8 x 8 (FmaPlan's test): 54 fine cells, levels of 54, 15 and 6
        // cells of sides 8, 16, 32.
        let grid = crate::geometry::Grid::new(45, 70);
        let w = LearnedWeights::box_init_grid_for(16, 8, 2, grid);
        let cfg = FmaConfig::new(8, 2)
            .grid(Some(grid))
            .downsample(Downsample::Learned(w));
        let shape = Shape::new(1, 3, 45 * 70, 16).with_kv_heads(1);
        let plan = BackwardPlan::new(shape, &cfg, &KernelLimits::lavapipe()).unwrap();
        assert_eq!(plan.dq.workgroups, 3 * 54);
        assert_eq!(plan.dkv_fine.workgroups, 54);
        // Per cell its readers (up to 27 cells of s_l^2 tokens, 3 query heads) in chunks of 256.
        let cells: Vec<u32> = plan.dkv_coarse.iter().map(|d| d.workgroups).collect();
        let chunks = |s: u32| (27 * s * s * 3).div_ceil(256);
        assert_eq!(cells, vec![54 * chunks(8), 15 * chunks(16), 6 * chunks(32)]);
        // Kernels of s_l^2 taps: (d, p, s_l, s_l) per level.
        assert_eq!(plan.weight_elements, 16 * 2 * (64 + 256 + 1024));
        assert_eq!(plan.bias_elements, 16 * 2 * 3);
        // Every pass that reads an index map is composed with the grid's; delta reads none.
        for d in plan.dispatches() {
            assert_eq!(d.spec.grid, d.pass != Pass::BackwardDelta, "{d:?}");
        }
        // A grid whose tensors exceed one binding: a typed error (2D heads are never split).
        let small = KernelLimits {
            max_binding: 16 << 10,
            ..KernelLimits::lavapipe()
        };
        let e = BackwardPlan::new(shape, &cfg, &small).unwrap_err();
        assert!(matches!(e, FmaError::LimitExceeded { .. }), "{e}");
        // Coarse queries in 2D: the same per-level passes, composed with the grid.
        let coarse = FmaConfig::new(8, 2)
            .grid(Some(grid))
            .queries(Queries::Coarse);
        let plan = BackwardPlan::new(shape, &coarse, &KernelLimits::lavapipe()).unwrap();
        assert_eq!(plan.coarse_stats.len(), plan.forward.levels.count());
        assert!(plan
            .coarse_stats
            .iter()
            .chain(&plan.coarse_dq)
            .chain(&plan.dkv_coarse)
            .all(|s| s.spec.grid && s.level.is_some()));
    }

    #[test]
    fn tiles_fit_workgroup_memory_and_the_grid_limit() {
        let mut web = KernelLimits::lavapipe();
        web.workgroup_storage = 16384;
        for limits in [KernelLimits::lavapipe(), web] {
            for d in [1usize, 3, 16, 40, 64, 128, 256] {
                let plan =
                    BackwardPlan::new(Shape::new(1, 1, 1000, d), &FmaConfig::new(16, 2), &limits)
                        .unwrap();
                let d4 = d.div_ceil(4) as u32;
                let f = plan.dkv_fine.spec;
                fits(f, f.bk * (2 * d4 * 16 + 8), &limits);
                let c = plan.dkv_coarse[0].spec;
                let pr = coarse_rows_per_workgroup(c.wg, c.d4);
                fits(
                    c,
                    pr * (2 * d4 * 16 + 4) + c.bk * (2 * d4 * 16 + 12 + 8 * pr),
                    &limits,
                );
                assert!(pr * c.d4 <= c.wg.max(c.d4));
            }
        }
        let plan = BackwardPlan::new(
            Shape::new(7, 10000, 16, 16),
            &FmaConfig::new(16, 2),
            &KernelLimits::lavapipe(),
        )
        .unwrap();
        for dsp in plan.dispatches() {
            assert!(dsp.grid[0] <= 65535 && dsp.grid[1] <= 65535, "{dsp:?}");
            assert!(dsp.grid[0] as u64 * dsp.grid[1] as u64 >= dsp.workgroups as u64);
        }
        assert!(plan.delta.workgroups > 65535 || plan.dkv_fine.workgroups > 65535);
    }

    #[test]
    fn too_little_workgroup_memory_is_a_typed_error() {
        let mut tiny = KernelLimits::lavapipe();
        tiny.workgroup_storage = 4096;
        let e = BackwardPlan::new(Shape::new(1, 1, 100, 256), &FmaConfig::new(16, 2), &tiny)
            .unwrap_err();
        assert!(matches!(e, FmaError::LimitExceeded { .. }), "{e}");
    }
}
