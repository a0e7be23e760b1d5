//! The decoder's plan (algorithm.md §10): the cache's layout and each step's dispatches.
//! Pure arithmetic, tested without a GPU.
//!
//! Per (batch*kv_head) row the cache holds (grouped-query attention: the K/V heads only; the
//! attention passes run over the `heads / kv_heads` query rows of each cache row)
//! - a near-field **ring** of R = min(2m - 1 + C_max, max_len) keys and values, token t in slot
//!   t mod R: a step of C <= C_max tokens starting at s reads tokens from (floor(s/m) - 1) m,
//!   at least s - 2m + 1, up to s + C - 1: at most 2m - 1 + C tokens, all still in the ring;
//! - **coarse slots**: per level, `slots` windows, window a in slot a mod slots. A step's queries
//!   read windows down to a_first - 3 (causal far lists: a - 2, a - 3) and the pooling writes up
//!   to a_last, so slots = a_last - a_first + 4 at most: 4 + (m + C_max - 2) / m;
//! - optionally the **history**: every key and value, in pages of T tokens (a power of two)
//!   whose every page fits one storage binding, filled by buffer copies.
//!
//! With a sliding window (L, 0) (docs/variants.md) a query at i sees keys i - L ..= i only,
//! exact windowed attention in either mode (FMA's window is its near field with no coarse
//! level): the ring holds R = min(L + C_max, max_len) tokens (a step starting at s reads
//! s - L ..= s + C - 1), there is no coarse level and no history, so nothing is sized by the
//! context: the cache's memory stays flat as sequences grow.
//!
//! Rows are processed in **groups** whose ring, coarse slots and dense partials each fit one
//! storage binding (bound as ranges of one buffer: per-row strides are 256-byte multiples).
//! A row's work does not depend on its group, so any grouping gives the same bits.
//!
//! **Dispatches of a record** (one group; [`DecodeLayout::fma_steps`],
//! [`DecodeLayout::dense_steps`]): the cache upkeep (ring, coarse slots, the lengths advanced
//! into the other half of a (2, batch) buffer) is one pass, `decode_ingest`; an FMA step
//! with Average pooling and at most m + 1 tokens is one pass in all, `decode_step` (the
//! attention beside the upkeep: no query of such a step reads a coarse window the step
//! writes); otherwise `decode_ingest` then `decode_attention`. Dense steps: `decode_ingest`,
//! `decode_dense` per history page, `decode_merge`.
//!
//! **The dense decode's split** ([`DenseSplit`], flash-decoding): a query's keys are cut into
//! segments of S keys, one workgroup each, S a power of two chosen per record from the longest
//! sequence so that one-token steps of every query row fill about `DenseSplit::workgroups`
//! workgroups, never below `DenseSplit::min_segment` keys or beyond a page
//! ([`DecodeLayout::dense_cut`]); the merge adds the partials in segment order, so a record's
//! result depends on (its lengths, C, the layout) only, never on timing.

use super::dispatch::{dispatch, Dispatch};
use super::limits::KernelLimits;
use super::pass::{Pass, SoftmaxFlags, Specialization};
use crate::config::{DecodeConfig, Downsample};
use crate::error::{FmaError, Result};
use crate::levels::{effective_block, num_levels, window};
use crate::plan::MAX_HEAD_DIM;
use crate::storage::Storage;
use crate::variants::Window;

/// The upkeep's roles (`shaders/decode_ingest.wgsl`), as the `bk` of its specialisation: every
/// unit (the one-dispatch upkeep, and what every other decode pass is composed with), the
/// ring's and the lengths', the coarse slots'.
pub const UPKEEP_ALL: u32 = 1;
/// The ring's units, then the lengths' ([`UPKEEP_ALL`]): both a load and a store or two per
/// unit, so sharing a pipeline costs neither anything under llvmpipe's lane masks, and the
/// lengths need no dispatch of their own.
pub const UPKEEP_RING_LENS: u32 = 2;
/// The coarse slots' units alone ([`UPKEEP_ALL`]).
pub const UPKEEP_SLOTS: u32 = 3;
/// The `bk` of `decode_dense`'s specialisation with its segments interleaved
/// ([`DecodeTuning::interleave_segments`]); with [`UPKEEP_ALL`], in workgroup order.
pub const SEGMENTS_INTERLEAVED: u32 = 5;

/// Invocations per workgroup of the decoding passes: a tile of keys per workgroup, and at least
/// one invocation per vec4 of a row in the value phase (`shared/decode_softmax.wgsl`; d <= 256
/// gives at most 64 vec4s).
pub const DECODE_WG: u32 = 64;
/// Per-row strides are rounded up to this many f32 (256 bytes), an offset every adapter
/// accepts for a storage binding.
pub const ROW_ALIGN: usize = 64;
/// How the dense decode splits each query's keys into segments (flash-decoding), by adapter
/// kind. wgpu reports no compute-unit count, so the GPU figure is an assumption sized for the
/// largest card the project targets: an H200 has 132 SMs (`../shared/design/gpu.md`), and
/// 1024 workgroups of 64 invocations put ~8 on each (512 of its 2048 resident invocations),
/// enough loads in flight to stream K and V at bandwidth; a smaller GPU runs them in more
/// waves at no loss. A segment reads at least `min_segment` keys (256 keys: 64 KiB of f32 K
/// and V at d = 64), so a workgroup's fixed cost (the query, the partial's write, its share of
/// the merge) stays small against its reads. At batch 1, one head, 2^20 tokens: segments of
/// 1024 keys, 1024 of them (the floor: >= 264, two per SM).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DenseSplit {
    /// Workgroups one dense dispatch should have for a step of one token per query row, over
    /// every query row of the batch (batch * heads).
    pub workgroups: usize,
    /// Fewest keys per segment (a power of two).
    pub min_segment: usize,
}

impl DenseSplit {
    /// A GPU's: ~1024 workgroups of at least 256 keys.
    pub const GPU: Self = Self {
        workgroups: 1024,
        min_segment: 256,
    };
    /// A CPU adapter's (lavapipe, llvmpipe: a few cores, each workgroup a loop): about 256
    /// segments per query of at least 1024 keys, the sizes the decoder had before it was sized
    /// by adapter (docs/perf.md, issue 14).
    pub const CPU: Self = Self {
        workgroups: 256,
        min_segment: 1024,
    };

    /// The split for an adapter of type `device_type`: [`DenseSplit::CPU`] on a CPU adapter,
    /// [`DenseSplit::GPU`] on any other.
    pub fn for_device(device_type: wgpu::DeviceType) -> Self {
        match device_type {
            wgpu::DeviceType::Cpu => Self::CPU,
            _ => Self::GPU,
        }
    }
}

impl Default for DenseSplit {
    fn default() -> Self {
        Self::GPU
    }
}

/// How the decoder records its steps on an adapter kind: the dense decode's split, and whether
/// an FMA step that can run as one pass ([`DecodeLayout::can_fuse`]) does.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DecodeTuning {
    /// The dense decode's segments.
    pub dense: DenseSplit,
    /// One-pass FMA steps (`decode_step`). On a GPU a step of one token is a few microseconds
    /// of work, so each dependent dispatch (its launch and the drain before the next) is a
    /// large share of it: one pass, not two. On a CPU adapter the one pass was measured 6-12x
    /// slower than the two (docs/perf.md, change 30): llvmpipe most likely runs every
    /// workgroup of a pass that has barriers (the attention's) in its slower barrier-capable
    /// form, the upkeep's many small workgroups included; there the upkeep and the attention
    /// run as two passes.
    pub one_pass: bool,
    /// The upkeep as one dispatch per role (the ring and the lengths, the coarse slots), each a
    /// pipeline composed for its role alone (`UPKEEP_*` in `decode_ingest.wgsl`), instead of
    /// one dispatch of every unit. llvmpipe runs both sides of a branch under a lane mask
    /// unless its condition is a constant, so one pipeline for the three roles made every
    /// invocation pay for all three (docs/perf.md, change 36: one-token FMA steps were
    /// 1.04-1.21x the pre-decode-fast steps on lavapipe, 0.91-0.97x now); a GPU skips the
    /// roles a warp does not take, and one dispatch is one launch fewer.
    pub upkeep_apart: bool,
    /// The dense decode's workgroups take the segments of a page in bit-reversed order
    /// (`decode_dense.wgsl`) rather than in order. A record dispatches its segments up to a
    /// power of two ([`DenseCut::covered`]), so up to half of them are past the longest
    /// sequence and return at once; llvmpipe hands each of its threads a contiguous run of
    /// a dispatch's workgroups, so in order one thread got nearly every working segment
    /// (batch 1, 33 of 64: 32 on one of two threads), bit-reversed each run holds as many
    /// (17 and 16). The merge adds the partials in segment order either way: the same bits.
    /// A GPU's scheduler spreads workgroups by itself.
    pub interleave_segments: bool,
}

impl DecodeTuning {
    /// A GPU's: [`DenseSplit::GPU`], one-pass steps.
    pub const GPU: Self = Self {
        dense: DenseSplit::GPU,
        one_pass: true,
        upkeep_apart: false,
        interleave_segments: false,
    };
    /// A CPU adapter's: [`DenseSplit::CPU`], two-pass steps, the upkeep a dispatch per role,
    /// the dense segments interleaved.
    pub const CPU: Self = Self {
        dense: DenseSplit::CPU,
        one_pass: false,
        upkeep_apart: true,
        interleave_segments: true,
    };

    /// The tuning for an adapter of type `device_type`: [`DecodeTuning::CPU`] on a CPU
    /// adapter, [`DecodeTuning::GPU`] on any other.
    pub fn for_device(device_type: wgpu::DeviceType) -> Self {
        match device_type {
            wgpu::DeviceType::Cpu => Self::CPU,
            _ => Self::GPU,
        }
    }
}

/// What one dense record runs over ([`DecodeLayout::dense_cut`]): its history pages, its
/// segment length and how many segments per query it dispatches.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct DenseCut {
    /// History pages the longest sequence reaches.
    pub pages: usize,
    /// Keys per segment S (a power of two dividing the page).
    pub segment: usize,
    /// Segments per (query row, token) the record's dense dispatches cover: the longest
    /// sequence's, rounded up to a power of two (at most the pages' own), so that a record's
    /// dispatches change only when the length doubles; those past a row's length return at
    /// once.
    pub covered: usize,
}

/// The cache's layout for one [`DecodeConfig`] on one adapter.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DecodeLayout {
    /// Sequences.
    pub batch: usize,
    /// Query heads per sequence.
    pub heads: usize,
    /// K/V heads per sequence (cache rows per sequence).
    pub kv_heads: usize,
    /// Head dimension d.
    pub head_dim: usize,
    /// Block size m.
    pub block: usize,
    /// Rank p.
    pub rank: usize,
    /// Most tokens per sequence.
    pub max_len: usize,
    /// Most tokens per step.
    pub max_chunk: usize,
    /// Near-field ring slots R per row.
    pub ring: usize,
    /// Elements per row in the ring buffer: [K | V] (R, d), padded to 256 bytes (64 f32 or
    /// 128 f16 elements: the ring is stored as [`DecodeLayout::storage`]).
    pub ring_stride: usize,
    /// Coarse levels kept: L(max_len).
    pub levels: usize,
    /// Window slots per level.
    pub slots: usize,
    /// f32 per row in the coarse buffer: [K~ | V~] (levels, slots, p, d), padded.
    pub coarse_stride: usize,
    /// Cache rows (K/V heads) per dispatch group.
    pub group: usize,
    /// History page length T in tokens (0 without history).
    pub page_tokens: usize,
    /// Fewest keys per segment of the dense decode (a power of two dividing T; records use
    /// [`DecodeLayout::dense_cut`]'s, from this up to T).
    pub min_segment: usize,
    /// Segments wanted per query row and token ([`DenseSplit::workgroups`] over the batch's
    /// query rows, at least 1).
    pub split_per_row: usize,
    /// Partial slots per (query row, token) of the dense decode: the most segments any record
    /// has.
    pub segments: usize,
    /// f32 per query row in the partials buffer: (max_chunk, segments, d + 2), padded (0
    /// without history); a group's partials hold its rows' `heads / kv_heads` query rows each.
    pub partial_stride: usize,
    /// Whether the coarse rows are pooled with learned weights (then an FMA step's attention
    /// runs in a pass of its own: `decode_step` has no binding left for the weights).
    pub learned: bool,
    /// Whether FMA steps that can run as one pass do ([`DecodeTuning::one_pass`]).
    pub one_pass: bool,
    /// Whether the upkeep runs a dispatch per role ([`DecodeTuning::upkeep_apart`]).
    pub upkeep_apart: bool,
    /// Whether the dense decode's workgroups take their segments bit-reversed
    /// ([`DecodeTuning::interleave_segments`]).
    pub interleave_segments: bool,
    /// The sliding window (keys i - L ..= i), if any: then `ring` = min(L + max_chunk,
    /// max_len), `levels` = 0 and no history.
    pub window: Option<Window>,
    /// Which softmax variants the attention passes are specialised for.
    pub softmax: SoftmaxFlags,
    /// The element type of the ring, the history pages and a step's Q, K, V, O
    /// ([`DecodeConfig::storage`]); the coarse slots and the partials are f32 always.
    pub storage: Storage,
}

fn padded(x: usize) -> usize {
    x.div_ceil(ROW_ALIGN) * ROW_ALIGN
}

impl DecodeLayout {
    /// The layout of `cfg` under `limits` tuned for a GPU ([`DecodeTuning::GPU`]); a typed
    /// error when one row's state cannot fit one binding.
    pub fn new(cfg: &DecodeConfig, limits: &KernelLimits) -> Result<Self> {
        Self::with_tuning(cfg, limits, DecodeTuning::GPU)
    }

    /// The layout of `cfg` under `limits` tuned as `tuning` says (the decoder's:
    /// [`DecodeTuning::for_device`] of its adapter).
    pub fn with_tuning(
        cfg: &DecodeConfig,
        limits: &KernelLimits,
        tuning: DecodeTuning,
    ) -> Result<Self> {
        let split = tuning.dense;
        cfg.validate()?;
        // m >= max_len: one fine block, no level (levels::effective_block), so sizes stay
        // bounded by the length for any m.
        let (m, p) = effective_block(cfg.max_len, cfg.fma.block, cfg.fma.rank);
        let d = cfg.head_dim;
        if d > MAX_HEAD_DIM {
            return Err(FmaError::InvalidConfig {
                what: "head_dim",
                value: d.to_string(),
                allowed: format!("1 ..= {MAX_HEAD_DIM}"),
            });
        }
        let window = cfg.variants.window;
        // A window: the last L tokens and the step's own, nothing coarse (the coarse buffer
        // is a one-row placeholder binding), nothing kept beyond (no history).
        let (ring, levels, slots, coarse_stride, history) = match window {
            Some(w) => (
                // Saturating: a window longer than any sequence is the whole sequence.
                w.left.saturating_add(cfg.max_chunk).min(cfg.max_len),
                0,
                1,
                ROW_ALIGN,
                false,
            ),
            None => {
                let levels = num_levels(cfg.max_len, m);
                let slots = 4 + (m + cfg.max_chunk - 2) / m;
                let coarse = padded(2 * levels.max(1) * slots * p * d);
                (
                    (2 * m - 1 + cfg.max_chunk).min(cfg.max_len),
                    levels,
                    slots,
                    coarse,
                    cfg.history,
                )
            }
        };
        // 256 bytes per row whatever the element (ranges of the ring are bound per group).
        let ring_stride = match cfg.storage {
            Storage::F32 => padded(2 * ring * d),
            Storage::F16 => (2 * ring * d).div_ceil(2 * ROW_ALIGN) * (2 * ROW_ALIGN),
        };
        // Sizes in f32 from here on (f16 rows are counted as f32: they then fit with room).
        let cap = (limits.binding_bytes() / 4) as usize;
        let rows = cfg.batch * cfg.kv_heads;
        let qgroup = cfg.group();
        let fixed = ring_stride.max(coarse_stride);
        if fixed > cap {
            let what = if fixed == ring_stride && window.is_some() {
                "the window's ring of one head (L + max_chunk tokens)"
            } else if fixed == ring_stride {
                "the near-field ring of one head (2m - 1 + max_chunk tokens)"
            } else {
                "the coarse slots of one head"
            };
            return Err(too_big(what, fixed, cap));
        }
        let mut group = (cap / fixed).min(rows);
        let (mut page_tokens, mut min_segment, mut segments, mut partial_stride) = (0, 0, 0, 0);
        // Segments wanted per query row: the split's workgroups over a one-token step's rows.
        let split_per_row = (split.workgroups / (cfg.batch * cfg.heads)).max(1);
        if history {
            if d > cap {
                return Err(too_big("one history token of one head", d, cap));
            }
            loop {
                // The largest power-of-two page whose group of rows fits one binding; a
                // segment never straddles two pages.
                let per_row = (cap / (group * d))
                    .min(cfg.max_len.next_power_of_two())
                    .max(1);
                page_tokens = 1usize << per_row.ilog2();
                min_segment = split.min_segment.next_power_of_two().min(page_tokens);
                // A record's count, ceil(len / S), is at most the wanted count (S >= len /
                // wanted), the pages' (S = T) and len / min_segment (S >= min_segment).
                let pages = cfg.max_len.div_ceil(page_tokens);
                segments = split_per_row
                    .max(pages)
                    .min(cfg.max_len.div_ceil(min_segment));
                partial_stride = padded(cfg.max_chunk * segments * (d + 2));
                if partial_stride * qgroup > cap {
                    return Err(too_big(
                        "the dense decode's partials of one head (max_chunk x segments x (d + 2))",
                        partial_stride * qgroup,
                        cap,
                    ));
                }
                if partial_stride * qgroup * group <= cap {
                    break;
                }
                group = cap / (partial_stride * qgroup);
            }
        }
        let layout = Self {
            batch: cfg.batch,
            heads: cfg.heads,
            kv_heads: cfg.kv_heads,
            head_dim: d,
            block: m,
            rank: p,
            max_len: cfg.max_len,
            max_chunk: cfg.max_chunk,
            ring,
            ring_stride,
            levels,
            slots,
            coarse_stride,
            group,
            page_tokens,
            min_segment,
            split_per_row,
            segments,
            partial_stride,
            learned: matches!(cfg.fma.downsample, Downsample::Learned(_)),
            one_pass: tuning.one_pass,
            upkeep_apart: tuning.upkeep_apart,
            interleave_segments: tuning.interleave_segments,
            window,
            softmax: SoftmaxFlags::of(&cfg.variants),
            storage: cfg.storage,
        };
        Ok(layout)
    }

    /// Cache rows (batch * kv_heads).
    pub fn rows(&self) -> usize {
        self.batch * self.kv_heads
    }

    /// Query heads per cache row (grouped-query attention; 1 for multi-head).
    pub fn qgroup(&self) -> usize {
        self.heads / self.kv_heads
    }

    /// The dispatch groups: row ranges.
    pub fn groups(&self) -> Vec<std::ops::Range<usize>> {
        (0..self.rows())
            .step_by(self.group)
            .map(|lo| lo..(lo + self.group).min(self.rows()))
            .collect()
    }

    /// History pages needed for sequences of up to `len` tokens.
    pub fn pages_for(&self, len: usize) -> usize {
        if self.page_tokens == 0 {
            0
        } else {
            len.div_ceil(self.page_tokens)
        }
    }

    /// Bytes the FMA part of the cache takes (ring and coarse slots, every row): independent
    /// of the sequences' lengths.
    pub fn fma_bytes(&self) -> u64 {
        self.rows() as u64 * (self.ring_bytes() + self.coarse_stride as u64 * 4)
    }

    /// Bytes of one row's ring (`ring_stride` elements of [`DecodeLayout::storage`]): a
    /// multiple of 256.
    pub fn ring_bytes(&self) -> u64 {
        self.ring_stride as u64 * self.storage.bytes()
    }

    /// Bytes the history takes at `len` tokens per sequence (whole pages).
    pub fn history_bytes(&self, len: usize) -> u64 {
        let groups = self.groups();
        let per_page: usize = groups
            .iter()
            .map(|g| g.len() * self.page_tokens * self.head_dim)
            .sum();
        (2 * self.pages_for(len) * per_page) as u64 * self.storage.bytes()
    }

    /// The specialisation of every decoding pass: the softmax variants are pipeline
    /// constants (`plan::SoftmaxFlags`), so a decoder without them runs the plain kernels.
    fn spec(&self) -> Specialization {
        Specialization {
            wg: DECODE_WG,
            bk: UPKEEP_ALL,
            d4: self.head_dim.div_ceil(4) as u32,
            grid: false,
            softmax: self.softmax,
            storage: self.storage,
        }
    }

    /// Units of one group's cache upkeep (`shaders/shared/decode_cache.wgsl`): the ring's
    /// (rows, chunk, d), the coarse slots' (rows, 2, levels, slots, p, d) and `lens_count`
    /// lengths written.
    fn upkeep_units(&self, rows: usize, chunk: usize, lens_count: usize) -> u64 {
        let d = self.head_dim as u64;
        let (rows, chunk) = (rows as u64, chunk as u64);
        rows * chunk * d
            + rows * 2 * (self.levels * self.slots * self.rank) as u64 * d
            + lens_count as u64
    }

    /// Whether an FMA step of `chunk` tokens can run as one pass (`decode_step`): with no
    /// coarse level, or with Average pooling and at most m + 1 tokens. Then no query of the
    /// step reads a coarse window the step writes: a query at i reads windows up to
    /// floor(i / w) - 2 at a level of window w >= m, and floor((s + C - 1) / w) - floor(s / w)
    /// <= 1 for every start s exactly when C - 1 <= w.
    pub fn can_fuse(&self, chunk: usize) -> bool {
        self.levels == 0 || (!self.learned && chunk <= self.block + 1)
    }

    /// Whether an FMA step of `chunk` tokens runs as one pass: it can, and the tuning says so.
    pub fn fused(&self, chunk: usize) -> bool {
        self.one_pass && self.can_fuse(chunk)
    }

    /// The dispatches of one group that append `chunk` tokens to its rows (the ring, the coarse
    /// slots, `lens_count` lengths advanced: the batch in a record's last group, else 0) and
    /// (with `attend`) attend its queries by FMA: one pass where [`DecodeLayout::fused`],
    /// else the upkeep then the attention.
    pub fn fma_steps(
        &self,
        rows: usize,
        chunk: usize,
        attend: bool,
        lens_count: usize,
        limits: &KernelLimits,
    ) -> Result<Vec<Dispatch>> {
        let (spec, wg) = (self.spec(), DECODE_WG as u64);
        let upkeep = self.upkeep_units(rows, chunk, lens_count).div_ceil(wg);
        // One workgroup per query row and token: each cache row's query heads.
        let queries = (rows * self.qgroup()) as u64 * chunk as u64;
        if attend && self.fused(chunk) {
            return Ok(vec![dispatch(
                Pass::DecodeStep,
                None,
                queries + upkeep,
                spec,
                limits,
            )?]);
        }
        let mut steps = if self.upkeep_apart {
            self.upkeep_roles(rows, chunk, lens_count, limits)?
        } else {
            vec![dispatch(
                Pass::DecodeIngest,
                None,
                upkeep.max(1),
                spec,
                limits,
            )?]
        };
        if attend {
            steps.push(dispatch(
                Pass::DecodeAttention,
                None,
                queries,
                spec,
                limits,
            )?);
        }
        Ok(steps)
    }

    /// The upkeep as a `decode_ingest` dispatch per role with units ([`DecodeTuning::upkeep_apart`]):
    /// the ring's (rows, chunk, d) then the `lens_count` lengths, the coarse slots' (rows, 2,
    /// levels, slots, p, d); each pipeline is composed for its role (the specialisation's `bk`,
    /// which no decode pass uses for key tiles: [`UPKEEP_ALL`] is the one-dispatch upkeep).
    /// They touch disjoint memory, so their order does not matter.
    fn upkeep_roles(
        &self,
        rows: usize,
        chunk: usize,
        lens_count: usize,
        limits: &KernelLimits,
    ) -> Result<Vec<Dispatch>> {
        let d = self.head_dim as u64;
        let (rows, chunk) = (rows as u64, chunk as u64);
        let roles = [
            (UPKEEP_RING_LENS, rows * chunk * d + lens_count as u64),
            (
                UPKEEP_SLOTS,
                rows * 2 * (self.levels * self.slots * self.rank) as u64 * d,
            ),
        ];
        roles
            .into_iter()
            .filter(|&(_, units)| units > 0)
            .map(|(role, units)| {
                let spec = Specialization {
                    bk: role,
                    ..self.spec()
                };
                dispatch(
                    Pass::DecodeIngest,
                    None,
                    units.div_ceil(DECODE_WG as u64),
                    spec,
                    limits,
                )
            })
            .collect()
    }

    /// The dense decode's cut of a record whose longest sequence reaches `longest` tokens:
    /// S = the smallest power of two with at most [`DecodeLayout::split_per_row`] segments
    /// over `longest`, within [min_segment, page_tokens]. Its count, ceil(longest / S), is at
    /// most [`DecodeLayout::segments`] (the partial slots).
    pub fn dense_cut(&self, longest: usize) -> DenseCut {
        if self.page_tokens == 0 {
            return DenseCut::default();
        }
        let longest = longest.max(1);
        let segment = longest
            .div_ceil(self.split_per_row)
            .next_power_of_two()
            .clamp(self.min_segment, self.page_tokens);
        let pages = self.pages_for(longest);
        let per_page = self.page_tokens / segment;
        DenseCut {
            pages,
            segment,
            covered: longest
                .div_ceil(segment)
                .next_power_of_two()
                .min(pages * per_page),
        }
    }

    /// The dense decode of one group over `cut`: a partial pass per page (its level selector
    /// names the page, its `arg0` the page's segments dispatched) and the merge (after the
    /// group's `decode_ingest`, [`DecodeLayout::fma_steps`] without attention).
    pub fn dense_steps(
        &self,
        rows: usize,
        chunk: usize,
        cut: DenseCut,
        limits: &KernelLimits,
    ) -> Result<Vec<Dispatch>> {
        let spec = self.spec();
        let dense = Specialization {
            bk: if self.interleave_segments {
                SEGMENTS_INTERLEAVED
            } else {
                UPKEEP_ALL
            },
            ..spec
        };
        let per_page = self.page_tokens / cut.segment.max(1);
        let queries = (rows * self.qgroup()) as u64 * chunk as u64;
        let mut steps = (0..cut.pages)
            .map(|page| {
                let segs = cut.covered.saturating_sub(page * per_page).min(per_page);
                let mut d = dispatch(
                    Pass::DecodeDense,
                    Some(page as u32),
                    queries * segs as u64,
                    dense,
                    limits,
                )?;
                d.args[0] = segs as u32;
                Ok(d)
            })
            .collect::<Result<Vec<_>>>()?;
        steps.push(dispatch(Pass::DecodeMerge, None, queries, spec, limits)?);
        Ok(steps)
    }

    /// Learned weights needed: every level kept must have them (a sequence of max_len tokens
    /// uses them all).
    pub fn check_weights(&self, downsample: &Downsample) -> Result<()> {
        if let Downsample::Learned(w) = downsample {
            if w.levels.len() < self.levels {
                return Err(FmaError::Weights(format!(
                    "decoding up to {} tokens with m = {} uses {} levels, but the weights have {} (missing level {})",
                    self.max_len,
                    self.block,
                    self.levels,
                    w.levels.len(),
                    w.levels.len() + 1
                )));
            }
        }
        Ok(())
    }

    /// Window size of level index `lvl` (level lvl + 1).
    pub fn window(&self, lvl: usize) -> usize {
        window(self.block, lvl + 1)
    }
}

/// The error of one head's `floats` not fitting one binding of `cap` floats.
fn too_big(what: &str, floats: usize, cap: usize) -> FmaError {
    FmaError::LimitExceeded {
        what: what.into(),
        requested: floats as u64 * 4,
        max: cap as u64 * 4,
        unit: super::limits::BINDING_BYTES,
        advice: "a smaller block size, max_chunk or max_len would fit".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::FmaConfig;

    fn cfg(m: usize, p: usize, max_len: usize, chunk: usize) -> DecodeConfig {
        DecodeConfig::new(FmaConfig::new(m, p), 2, 3, 16, max_len).max_chunk(chunk)
    }

    #[test]
    fn ring_and_slots_hold_what_one_step_reads() {
        for (m, chunk) in [(1, 1), (4, 1), (4, 3), (8, 64), (64, 1), (64, 16)] {
            let l = DecodeLayout::new(
                &cfg(m, 1, 1 << 20, chunk),
                &KernelLimits::with_binding(1 << 27),
            )
            .unwrap();
            // Every start s: the step's oldest near token and its newest token fit the ring,
            // and its windows [a_first - 3, a_last] fit the slots, at every level.
            for s in 0..(4 * m + 3 * chunk) {
                let oldest = (s / m).saturating_sub(1) * m;
                assert!(s + chunk - oldest <= l.ring, "m {m} chunk {chunk} s {s}");
                for lvl in 0..l.levels.min(4) {
                    let w = l.window(lvl);
                    let (a0, a1) = (s / w, (s + chunk - 1) / w);
                    assert!(
                        a1 - a0 + 4 <= l.slots,
                        "m {m} chunk {chunk} s {s} level {lvl}"
                    );
                }
            }
        }
    }

    /// f16 storage: ring rows of 256-byte multiples holding [K | V], history pages of half
    /// the bytes, the coarse slots (f32) unchanged, the same groups and pages.
    #[test]
    fn f16_storage_halves_the_ring_and_the_history() {
        let limits = KernelLimits::with_binding(16 << 10);
        let c = DecodeConfig::new(FmaConfig::new(32, 2), 2, 2, 16, 4096).max_chunk(3);
        let f32 = DecodeLayout::new(&c, &limits).unwrap();
        let f16 = DecodeLayout::new(&c.storage(Storage::F16), &limits).unwrap();
        assert_eq!(f16.ring_bytes() % 256, 0);
        assert!(f16.ring_stride >= 2 * f16.ring * 16);
        assert!(f16.ring_bytes() <= f32.ring_bytes() / 2 + 256);
        assert_eq!(f16.coarse_stride, f32.coarse_stride);
        assert_eq!((f16.group, f16.page_tokens), (f32.group, f32.page_tokens));
        assert_eq!(2 * f16.history_bytes(1000), f32.history_bytes(1000));
    }

    #[test]
    fn groups_pages_and_segments_fit_the_binding() {
        let limits = KernelLimits::with_binding(16 << 10);
        let c = DecodeConfig::new(FmaConfig::new(32, 2), 2, 2, 16, 4096).max_chunk(3);
        let l = DecodeLayout::new(&c, &limits).unwrap();
        let cap = 16 << 10;
        assert!(l.group >= 1 && l.group < 4, "{l:?}");
        assert!(l.group * l.ring_stride * 4 <= cap);
        assert!(l.group * l.coarse_stride * 4 <= cap);
        assert!(l.group * l.partial_stride * l.qgroup() * 4 <= cap);
        assert!(l.group * l.page_tokens * l.head_dim * 4 <= cap);
        assert!(l.page_tokens.is_power_of_two() && l.page_tokens.is_multiple_of(l.min_segment));
        assert!(l.segments <= 4096usize.div_ceil(l.min_segment));
        let covered: usize = l.groups().iter().map(|g| g.len()).sum();
        assert_eq!(covered, 4);
    }

    #[test]
    fn grouped_heads_keep_k_v_heads_only() {
        let limits = KernelLimits::with_binding(1 << 27);
        let mha = DecodeLayout::new(&cfg(16, 2, 4096, 2).history(true), &limits).unwrap();
        let gqa = DecodeLayout::new(&cfg(16, 2, 4096, 2).kv_heads(1), &limits).unwrap();
        assert_eq!((mha.rows(), gqa.rows()), (6, 2));
        assert_eq!(gqa.qgroup(), 3);
        assert_eq!(gqa.fma_bytes() * 3, mha.fma_bytes());
        assert_eq!(gqa.history_bytes(4096) * 3, mha.history_bytes(4096));
        // The attention passes run over every query row: as many workgroups either way (a
        // chunk of m + 2 tokens: the attention in its own pass).
        let steps = |l: &DecodeLayout| l.fma_steps(l.group, 18, true, 2, &limits).unwrap();
        assert_eq!(steps(&mha)[1].pass, Pass::DecodeAttention);
        assert_eq!(steps(&mha)[1].workgroups, steps(&gqa)[1].workgroups);
        let bad = cfg(16, 2, 4096, 2).kv_heads(2);
        assert!(matches!(
            DecodeLayout::new(&bad, &limits),
            Err(FmaError::InvalidConfig {
                what: "kv_heads",
                ..
            })
        ));
    }

    #[test]
    fn a_row_too_wide_for_one_binding_is_a_typed_error() {
        let limits = KernelLimits::with_binding(1 << 10);
        let c = DecodeConfig::new(FmaConfig::new(64, 2), 1, 1, 64, 1 << 16);
        assert!(matches!(
            DecodeLayout::new(&c, &limits),
            Err(FmaError::LimitExceeded { .. })
        ));
    }

    #[test]
    fn the_fma_state_does_not_grow_with_the_length() {
        let limits = KernelLimits::with_binding(1 << 27);
        let small = DecodeLayout::new(&cfg(64, 2, 1 << 12, 1), &limits).unwrap();
        let large = DecodeLayout::new(&cfg(64, 2, 1 << 20, 1), &limits).unwrap();
        // Only the number of levels grows (log n).
        assert_eq!(small.ring, large.ring);
        assert!(large.fma_bytes() < 3 * small.fma_bytes());
    }

    fn windowed(m: usize, left: usize, max_len: usize, chunk: usize) -> DecodeConfig {
        cfg(m, 2, max_len, chunk).variants(crate::Variants {
            window: Some(Window { left, right: 0 }),
            ..Default::default()
        })
    }

    #[test]
    fn a_window_keeps_a_ring_of_l_plus_c_and_nothing_that_grows() {
        let limits = KernelLimits::with_binding(1 << 27);
        let short = DecodeLayout::new(&windowed(16, 100, 1 << 10, 3), &limits).unwrap();
        let long = DecodeLayout::new(&windowed(16, 100, 1 << 18, 3), &limits).unwrap();
        assert_eq!(short.ring, 103);
        assert_eq!(
            (short.levels, short.page_tokens, short.partial_stride),
            (0, 0, 0)
        );
        // Sized by the window, not by the context (history asked for and ignored).
        assert!(windowed(16, 100, 1 << 18, 3).history);
        assert_eq!(short.fma_bytes(), long.fma_bytes());
        assert_eq!(long.history_bytes(1 << 18), 0);
        // No coarse level: nothing to pool, the ring and the attention in one pass.
        let passes: Vec<Pass> = long
            .fma_steps(long.group, 3, true, 2, &limits)
            .unwrap()
            .iter()
            .map(|s| s.pass)
            .collect();
        assert_eq!(passes, [Pass::DecodeStep]);
        assert!(long.softmax.window && !long.softmax.sinks);
        // A window longer than the context: the ring holds the whole sequence.
        let tiny = DecodeLayout::new(&windowed(16, 100, 50, 3), &limits).unwrap();
        assert_eq!(tiny.ring, 50);
        let huge = DecodeLayout::new(&windowed(16, usize::MAX, 50, 3), &limits).unwrap();
        assert_eq!(huge.ring, 50);
    }

    #[test]
    fn fma_refuses_a_window_beyond_its_near_field_as_the_forward_does() {
        let limits = KernelLimits::with_binding(1 << 27);
        assert!(windowed(16, 16, 4096, 1).check_fma_window().is_ok());
        assert!(cfg(16, 2, 4096, 1).check_fma_window().is_ok());
        // m >= max_len: one block holds every key.
        assert!(windowed(64, 60, 64, 1).check_fma_window().is_ok());
        assert!(matches!(
            windowed(16, 17, 4096, 1).check_fma_window(),
            Err(FmaError::InvalidConfig { what: "window", .. })
        ));
        // The layout (and so the dense mode) takes it.
        assert!(DecodeLayout::new(&windowed(16, 17, 4096, 1), &limits).is_ok());
        // R > 0 is no causal window.
        let right = cfg(16, 2, 4096, 1).variants(crate::Variants {
            window: Some(Window { left: 4, right: 1 }),
            ..Default::default()
        });
        assert!(matches!(
            DecodeLayout::new(&right, &limits),
            Err(FmaError::InvalidConfig { what: "window", .. })
        ));
    }

    /// A step runs as one pass exactly when none of its queries reads a coarse window the step
    /// writes: checked by brute force over starts and levels against the pooling's windows
    /// (those holding a token of the step) and the far lists' (a - 2, a - 3 of each query).
    #[test]
    fn a_fused_step_reads_no_window_it_writes() {
        let limits = KernelLimits::with_binding(1 << 27);
        for m in [1, 2, 4, 16] {
            let l = DecodeLayout::new(&cfg(m, 1, 1 << 12, 3 * m + 3), &limits).unwrap();
            for chunk in 1..=(3 * m + 3) {
                let mut conflict = false;
                for s in 0..(8 * m + 8) {
                    for lvl in 0..l.levels.min(3) {
                        let w = l.window(lvl);
                        let written = (s / w)..=((s + chunk - 1) / w);
                        for i in s..s + chunk {
                            let a = i / w;
                            let far = [a.checked_sub(2), a.checked_sub(3).filter(|_| a % 2 == 1)];
                            conflict |= far.iter().flatten().any(|b| written.contains(b));
                        }
                    }
                }
                assert_eq!(l.can_fuse(chunk), !conflict, "m {m} chunk {chunk}");
                assert_eq!(l.fused(chunk), !conflict, "m {m} chunk {chunk}");
            }
        }
        // Learned pooling: never fused (decode_step has no binding for the weights); a window
        // (no coarse level): always.
        let learned = FmaConfig::new(4, 2).downsample(Downsample::Learned(
            crate::weights::LearnedWeights::box_init_for(16, 4, 2, 64),
        ));
        let c = DecodeConfig::new(learned, 2, 3, 16, 64).max_chunk(3);
        let l = DecodeLayout::new(&c, &limits).unwrap();
        assert!(l.learned && !l.fused(1));
        // A CPU adapter's tuning: two passes where one could do.
        let c = cfg(4, 2, 64, 3);
        let cpu = DecodeLayout::with_tuning(&c, &limits, DecodeTuning::CPU).unwrap();
        assert!(cpu.can_fuse(1) && !cpu.fused(1));
        // ... and its upkeep a dispatch per role, each covering its units, then the attention.
        let steps = cpu.fma_steps(cpu.group, 3, true, 2, &limits).unwrap();
        let rows = cpu.group as u64;
        let d = cpu.head_dim as u64;
        let units = [
            rows * 3 * d + 2,
            rows * 2 * (cpu.levels * cpu.slots * cpu.rank) as u64 * d,
        ];
        assert_eq!(steps.len(), 3);
        for (s, (role, units)) in steps
            .iter()
            .zip([UPKEEP_RING_LENS, UPKEEP_SLOTS].into_iter().zip(units))
        {
            assert_eq!((s.pass, s.spec.bk), (Pass::DecodeIngest, role));
            assert_eq!(s.workgroups as u64, units.div_ceil(DECODE_WG as u64));
        }
        assert_eq!(
            (steps[2].pass, steps[2].spec.bk),
            (Pass::DecodeAttention, UPKEEP_ALL)
        );
        // Without lengths to advance (a group before the record's last), the ring's units alone.
        let steps = cpu.fma_steps(cpu.group, 1, false, 0, &limits).unwrap();
        let roles: Vec<(u32, u32)> = steps.iter().map(|s| (s.spec.bk, s.workgroups)).collect();
        assert_eq!(
            roles[0],
            (
                UPKEEP_RING_LENS,
                (rows * d).div_ceil(DECODE_WG as u64) as u32
            )
        );
        assert_eq!(roles[1].0, UPKEEP_SLOTS);
        let steps = l.fma_steps(l.group, 1, true, 2, &limits).unwrap();
        let passes: Vec<Pass> = steps.iter().map(|s| s.pass).collect();
        assert_eq!(passes, [Pass::DecodeIngest, Pass::DecodeAttention]);
    }

    /// Dispatches per record: FMA 1 (fused) or 2, a prefill chunk 1, dense 2 + pages; the
    /// upkeep's workgroups cover its units exactly.
    #[test]
    fn records_have_few_dispatches() {
        let limits = KernelLimits::with_binding(1 << 27);
        let l = DecodeLayout::new(&cfg(64, 2, 1 << 20, 64).history(true), &limits).unwrap();
        let fma = l.fma_steps(l.group, 1, true, 2, &limits).unwrap();
        assert_eq!(fma.len(), 1);
        assert_eq!(fma[0].pass, Pass::DecodeStep);
        let rows = l.group as u64;
        let upkeep = rows * 16 + rows * 2 * (l.levels * l.slots * 2 * 16) as u64 + 2;
        let queries = rows; // one query head per K/V head, one token
        assert_eq!(
            fma[0].workgroups as u64,
            queries + upkeep.div_ceil(DECODE_WG as u64)
        );
        assert_eq!(l.fma_steps(l.group, 64, true, 2, &limits).unwrap().len(), 1);
        let ingest = l.fma_steps(l.group, 200, false, 0, &limits).unwrap();
        assert_eq!(ingest.len(), 1);
        let cut = l.dense_cut(1 << 20);
        let dense = l.dense_steps(l.group, 1, cut, &limits).unwrap();
        assert_eq!(dense.len(), cut.pages + 1);
    }

    /// The dense split: S a power of two in [min_segment, T], the count within the partial
    /// slots for every length, about `workgroups` segments per step at 2^20 tokens (the GPU's
    /// 1024 at batch 1, >= 264: two per SM of an H200), and dispatches that change only when
    /// the length doubles.
    #[test]
    fn dense_splits_fill_the_adapter_and_fit_the_partials() {
        let limits = KernelLimits::discrete_gpu();
        for (split, batch, heads) in [
            (DenseSplit::GPU, 1, 1),
            (DenseSplit::GPU, 8, 8),
            (DenseSplit::CPU, 1, 1),
            (DenseSplit::CPU, 8, 1),
        ] {
            let c = DecodeConfig::new(FmaConfig::new(64, 2), batch, heads, 64, (1 << 20) + 64)
                .max_chunk(16);
            let tuning = DecodeTuning {
                dense: split,
                ..DecodeTuning::GPU
            };
            let l = DecodeLayout::with_tuning(&c, &limits, tuning).unwrap();
            let mut cuts = std::collections::HashSet::new();
            let mut len = 1;
            while len <= l.max_len {
                for longest in [len, len + 1, (len * 3) / 2] {
                    let longest = longest.min(l.max_len);
                    let cut = l.dense_cut(longest);
                    assert!(cut.segment.is_power_of_two());
                    assert!(cut.segment >= l.min_segment && cut.segment <= l.page_tokens);
                    assert!(
                        longest.div_ceil(cut.segment) <= l.segments,
                        "{split:?} {longest}"
                    );
                    assert!(cut.covered >= longest.div_ceil(cut.segment));
                    cuts.insert(cut);
                }
                len *= 2;
            }
            // O(log n) distinct records.
            assert!(cuts.len() <= 3 * 21, "{}", cuts.len());
            let rows = batch * heads;
            let at_1m = l.dense_cut(1 << 20);
            let workgroups = rows * at_1m.covered;
            if split == DenseSplit::GPU {
                assert!(workgroups >= 1024, "{split:?} batch {batch}: {workgroups}");
            }
            if (split, batch) == (DenseSplit::GPU, 1) {
                assert_eq!((at_1m.segment, at_1m.covered), (1024, 1024));
            }
            if (split, batch) == (DenseSplit::CPU, 1) {
                assert_eq!(at_1m.segment, 4096);
            }
        }
    }

    /// `decode_dense.wgsl`'s `segment_of` with BK = [`SEGMENTS_INTERLEAVED`]: workgroup `w`
    /// of `per_page` (a power of two) takes segment `w` bit-reversed.
    fn interleaved(w: u32, per_page: u32) -> u32 {
        if per_page > 1 && per_page.is_power_of_two() {
            w.reverse_bits() >> (32 - per_page.trailing_zeros())
        } else {
            w
        }
    }

    /// The CPU tuning's dense dispatches interleave their segments, the GPU's keep them in
    /// order; every page dispatches a power of two of segments (what the interleaving needs),
    /// over several pages too; interleaved, every segment is taken once, and each of T
    /// contiguous runs of workgroups (llvmpipe's threads) holds at most ceil(w / T) of the w
    /// working ones, where in order one run held them all.
    #[test]
    fn cpu_dense_segments_interleave_evenly() {
        let limits = KernelLimits::with_binding(64 << 10);
        let c = DecodeConfig::new(FmaConfig::new(16, 2), 1, 1, 16, 20_000).max_chunk(3);
        for (tuning, bk) in [
            (DecodeTuning::CPU, SEGMENTS_INTERLEAVED),
            (DecodeTuning::GPU, UPKEEP_ALL),
        ] {
            let tuning = DecodeTuning {
                dense: DenseSplit {
                    workgroups: 64,
                    min_segment: 16,
                },
                ..tuning
            };
            let l = DecodeLayout::with_tuning(&c, &limits, tuning).unwrap();
            assert!(l.pages_for(l.max_len) > 2, "{l:?}");
            for longest in 1..=l.max_len {
                let cut = l.dense_cut(longest);
                let steps = l.dense_steps(1, 1, cut, &limits).unwrap();
                let (merge, dense) = steps.split_last().unwrap();
                assert_eq!(merge.pass, Pass::DecodeMerge);
                assert_eq!(dense.len(), cut.pages);
                for s in dense {
                    assert_eq!((s.pass, s.spec.bk), (Pass::DecodeDense, bk));
                    assert!(s.args[0].is_power_of_two(), "{longest} {cut:?}");
                }
            }
        }
        for k in 0..=10 {
            let per_page = 1u32 << k;
            let order: std::collections::BTreeSet<u32> =
                (0..per_page).map(|w| interleaved(w, per_page)).collect();
            assert_eq!(order, (0..per_page).collect());
            for working in 1..=per_page {
                for threads in [2u32, 4, 8].into_iter().filter(|&t| t <= per_page) {
                    let run = per_page / threads;
                    for r in 0..threads {
                        let held = (r * run..(r + 1) * run)
                            .filter(|&w| interleaved(w, per_page) < working)
                            .count() as u32;
                        assert!(held <= working.div_ceil(threads), "{per_page} {working}");
                    }
                }
            }
        }
    }
}
