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

use super::dispatch::{dispatch, Dispatch};
use super::limits::KernelLimits;
use super::pass::{Pass, SoftmaxFlags, Specialization};
use crate::config::{DecodeConfig, Downsample};
use crate::error::{FmaError, Result};
use crate::levels::{effective_block, num_levels, window};
use crate::plan::MAX_HEAD_DIM;
use crate::storage::Storage;
use crate::variants::Window;

/// Invocations per workgroup of the decoding passes: a tile of keys per workgroup, and at least
/// one invocation per vec4 of a row in the value phase (`shared/decode_softmax.wgsl`; d <= 256
/// gives at most 64 vec4s).
pub const DECODE_WG: u32 = 64;
/// Per-row strides are rounded up to this many f32 (256 bytes), an offset every adapter
/// accepts for a storage binding.
pub const ROW_ALIGN: usize = 64;
/// The dense decode splits a query's keys into at most about this many segments (partials).
pub const TARGET_SEGMENTS: usize = 256;
/// Fewest keys per segment of the dense decode.
pub const MIN_SEGMENT: usize = 1024;

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
    /// Keys per partial of the dense decode (divides T).
    pub segment: usize,
    /// Partials per query row of the dense decode.
    pub segments: usize,
    /// f32 per query row in the partials buffer: (max_chunk, segments, d + 2), padded (0
    /// without history); a group's partials hold its rows' `heads / kv_heads` query rows each.
    pub partial_stride: usize,
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
    /// The layout of `cfg` under `limits`; a typed error when one row's state cannot fit one
    /// binding.
    pub fn new(cfg: &DecodeConfig, limits: &KernelLimits) -> Result<Self> {
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
        let (mut page_tokens, mut segment, mut segments, mut partial_stride) = (0, 0, 0, 0);
        if history {
            if d > cap {
                return Err(too_big("one history token of one head", d, cap));
            }
            // About TARGET_SEGMENTS partials per query, of at least MIN_SEGMENT keys.
            let wanted = cfg
                .max_len
                .div_ceil(TARGET_SEGMENTS)
                .next_power_of_two()
                .max(MIN_SEGMENT);
            loop {
                // The largest power-of-two page whose group of rows fits one binding; a
                // segment never straddles two pages.
                let per_row = (cap / (group * d))
                    .min(cfg.max_len.next_power_of_two())
                    .max(1);
                page_tokens = 1usize << per_row.ilog2();
                segment = wanted.min(page_tokens);
                segments = cfg.max_len.div_ceil(segment);
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
            segment,
            segments,
            partial_stride,
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
            bk: 1,
            d4: self.head_dim.div_ceil(4) as u32,
            grid: false,
            softmax: self.softmax,
            storage: self.storage,
        }
    }

    /// The dispatches of one group that append `chunk` tokens to its rows: the ring, the coarse
    /// slots and (with `attend`) the queries' FMA attention.
    pub fn fma_steps(
        &self,
        rows: usize,
        chunk: usize,
        attend: bool,
        limits: &KernelLimits,
    ) -> Result<Vec<Dispatch>> {
        let (spec, wg) = (self.spec(), DECODE_WG as u64);
        let d = self.head_dim as u64;
        let mut steps = vec![dispatch(
            Pass::DecodeAppend,
            None,
            (rows as u64 * chunk as u64 * d).div_ceil(wg),
            spec,
            limits,
        )?];
        // No coarse level (a window, or one block holds the sequence): nothing to pool.
        if self.levels > 0 {
            steps.push(dispatch(
                Pass::DecodePool,
                None,
                (rows as u64 * 2 * self.levels as u64 * self.slots as u64 * self.rank as u64 * d)
                    .div_ceil(wg)
                    .max(1),
                spec,
                limits,
            )?);
        }
        if attend {
            // One workgroup per query row and token: each cache row's query heads.
            steps.push(dispatch(
                Pass::DecodeAttention,
                None,
                (rows * self.qgroup()) as u64 * chunk as u64,
                spec,
                limits,
            )?);
        }
        Ok(steps)
    }

    /// The dense decode of one group over history pages `0..pages`: a partial pass per page
    /// (its level selector names the page) and the merge.
    pub fn dense_steps(
        &self,
        rows: usize,
        chunk: usize,
        pages: usize,
        limits: &KernelLimits,
    ) -> Result<Vec<Dispatch>> {
        let spec = self.spec();
        let per_page = (self.page_tokens / self.segment.max(1)) as u64;
        let mut steps = (0..pages)
            .map(|page| {
                dispatch(
                    Pass::DecodeDense,
                    Some(page as u32),
                    (rows * self.qgroup()) as u64 * chunk as u64 * per_page,
                    spec,
                    limits,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        steps.push(dispatch(
            Pass::DecodeMerge,
            None,
            (rows * self.qgroup()) as u64 * chunk as u64,
            spec,
            limits,
        )?);
        Ok(steps)
    }

    /// The last dispatch of every record: the sequences' lengths advance.
    pub fn advance_step(&self, limits: &KernelLimits) -> Result<Dispatch> {
        dispatch(Pass::DecodeAdvance, None, 1, self.spec(), limits)
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
        assert!(l.page_tokens.is_power_of_two() && l.page_tokens.is_multiple_of(l.segment));
        assert_eq!(l.segments, 4096usize.div_ceil(l.segment));
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
        // The attention passes run over every query row: as many workgroups either way.
        let steps = |l: &DecodeLayout| l.fma_steps(l.group, 2, true, &limits).unwrap();
        assert_eq!(steps(&mha)[2].workgroups, steps(&gqa)[2].workgroups);
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
        // No coarse level: nothing to pool, only the ring and the attention.
        let passes: Vec<Pass> = long
            .fma_steps(long.group, 3, true, &limits)
            .unwrap()
            .iter()
            .map(|s| s.pass)
            .collect();
        assert_eq!(passes, [Pass::DecodeAppend, Pass::DecodeAttention]);
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
}
