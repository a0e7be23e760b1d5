//! FMA configuration: block size m, rank p, downsampling mode, count correction, queries, grid.

use crate::error::{FmaError, Result};
use crate::geometry::Grid;
use crate::storage::Storage;
use crate::variants::Variants;
use crate::weights::LearnedWeights;

/// How the coarse keys and values of each level are made from the fine ones (algorithm.md §4).
#[derive(Clone, Debug, PartialEq)]
pub enum Downsample {
    /// Parameter-free: each coarse key is the mean of its sub-window's keys.
    Average,
    /// Learned per-channel basis functions (a depthwise convolution, kernel = stride = w_l),
    /// shared by all heads. [`LearnedWeights::box_init`] gives the box-average initialisation.
    Learned(LearnedWeights),
}

/// At which resolution the queries attend to the coarse levels (algorithm.md §6).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Queries {
    /// Every query attends at full resolution to every level: O(n log n), causal or not.
    #[default]
    Fine,
    /// Level 0 with fine queries; at each coarse level the queries are pooled like the keys
    /// (Average, or Learned with their own `wq`, `bq`), each coarse query attends to its
    /// window's far list, and every token takes its coarse query's result: O(n).
    /// Bidirectional only (a pooled query mixes later tokens into earlier outputs).
    Coarse,
}

/// Configuration of a Fast Multipole Attention.
///
/// Defaults (`FmaConfig::default()`): m = 64, p = 2, bidirectional, Average, count correction
/// on, fine queries.
#[derive(Clone, Debug, PartialEq)]
pub struct FmaConfig {
    /// Fine block size m (>= 1, divisible by `rank`).
    pub block: usize,
    /// Coarse rank p: coarse keys per window at every coarse level (>= 1).
    pub rank: usize,
    /// Causal mask: query i sees keys t <= i only. Set from the [`crate::Problem`] by the
    /// entry points (`gpu::Attention`, `cpu::forward`), the decoder (always causal) and
    /// `cross::check`: the mask belongs to the problem, not to the method.
    pub(crate) causal: bool,
    /// Downsampling mode of the coarse keys and values.
    pub downsample: Downsample,
    /// Add ln |S(l,a,j)| to the logit of every coarse key (algorithm.md §5).
    pub count_correction: bool,
    /// Fine or coarse queries (coarse: bidirectional only).
    pub queries: Queries,
    /// `None`: a 1D sequence (algorithm.md §2-3). `Some(grid)`: the tokens lie on an H x W grid
    /// in raster order (§9; the sequence length must be H W): `block` is the cell side r, cells
    /// r x r with a 3 x 3 near field, `rank` p coarse keys per cell (horizontal bands), learned
    /// weights (d, p, s_l, s_l) per level. Bidirectional only.
    pub grid: Option<Grid>,
    /// Softmax variants (issue 30: softcap, sinks, sliding window); default none. Set from the
    /// [`crate::Problem`] by the entry points, as the mask.
    pub(crate) variants: Variants,
}

impl Default for FmaConfig {
    fn default() -> Self {
        Self {
            block: 64,
            rank: 2,
            causal: false,
            downsample: Downsample::Average,
            count_correction: true,
            queries: Queries::Fine,
            grid: None,
            variants: Variants::default(),
        }
    }
}

impl FmaConfig {
    /// A bidirectional Average configuration with block size `block` and rank `rank`.
    pub fn new(block: usize, rank: usize) -> Self {
        Self {
            block,
            rank,
            ..Self::default()
        }
    }

    /// Sets the causal mask (the problem's: see the field).
    pub(crate) fn causal(mut self, causal: bool) -> Self {
        self.causal = causal;
        self
    }

    /// Sets the downsampling mode.
    pub fn downsample(mut self, downsample: Downsample) -> Self {
        self.downsample = downsample;
        self
    }

    /// Turns the count correction on or off.
    pub fn count_correction(mut self, on: bool) -> Self {
        self.count_correction = on;
        self
    }

    /// Chooses fine or coarse queries.
    pub fn queries(mut self, queries: Queries) -> Self {
        self.queries = queries;
        self
    }

    /// Lays the tokens on an H x W grid (algorithm.md §9), or back on a line with `None`.
    pub fn grid(mut self, grid: Option<Grid>) -> Self {
        self.grid = grid;
        self
    }

    /// Sets the softmax variants (the problem's: see the field).
    pub(crate) fn variants(mut self, variants: Variants) -> Self {
        self.variants = variants;
        self
    }

    /// Checks m and p, that coarse queries are not asked for with the causal mask, (with a
    /// grid) that the grid holds `seq` tokens and is not causal, and (in Learned mode) the
    /// weights' shapes for `head_dim` and `seq`.
    pub fn validate(&self, head_dim: usize, seq: usize) -> Result<()> {
        if self.block == 0 {
            return Err(FmaError::InvalidConfig {
                what: "block size m",
                value: "0".into(),
                allowed: "m >= 1".into(),
            });
        }
        if self.rank == 0 || !self.block.is_multiple_of(self.rank) {
            return Err(FmaError::InvalidConfig {
                what: "rank p",
                value: self.rank.to_string(),
                allowed: format!("p >= 1 and p divides the block size m = {}", self.block),
            });
        }
        if let Some(grid) = self.grid {
            if grid.h == 0 || grid.w == 0 {
                return Err(FmaError::InvalidConfig {
                    what: "grid",
                    value: grid.to_string(),
                    allowed: "H >= 1 and W >= 1".into(),
                });
            }
            if grid.h.checked_mul(grid.w) != Some(seq) {
                return Err(FmaError::ShapeMismatch {
                    what: "grid".into(),
                    expected: format!("H * W = the sequence length {seq}"),
                    got: format!("{grid} = {} tokens", grid.h.saturating_mul(grid.w)),
                });
            }
            if self.causal {
                return Err(FmaError::CausalGrid);
            }
        }
        if self.causal && self.queries == Queries::Coarse {
            return Err(FmaError::CausalCoarseQueries);
        }
        self.validate_variants(seq)?;
        if let Downsample::Learned(w) = &self.downsample {
            let with_queries = self.queries == Queries::Coarse;
            match self.grid {
                None => w.validate(head_dim, self.block, self.rank, seq, with_queries)?,
                Some(grid) => {
                    w.validate_grid(head_dim, self.block, self.rank, grid, with_queries)?
                }
            }
        }
        Ok(())
    }

    /// What FMA runs the softmax variants with (docs/variants.md): fine queries only (coarse
    /// queries run the plain softmax), and a window only on a line, within the near field
    /// (L <= m and R <= m for the sequence's block m), where FMA with a window is exactly
    /// windowed attention over the near field's keys with no coarse level. The values
    /// themselves are [`Variants::validate`]'s (it needs the heads).
    fn validate_variants(&self, seq: usize) -> Result<()> {
        let v = &self.variants;
        if self.queries == Queries::Coarse && !v.is_plain() {
            return Err(FmaError::InvalidConfig {
                what: "queries",
                value: "coarse with a softmax variant".into(),
                allowed: "softcap, sinks and windows run with fine queries (coarse queries \
                          run the plain softmax)"
                    .into(),
            });
        }
        let Some(w) = v.window else {
            return Ok(());
        };
        if self.grid.is_some() {
            return Err(FmaError::InvalidConfig {
                what: "window",
                value: format!("({}, {}) on a grid", w.left, w.right),
                allowed: "a sliding window on a 1D sequence (grids have no 1D band)".into(),
            });
        }
        // A block of at least the sequence holds every key in its near field.
        let m = self.block;
        if m < seq && (w.left > m || w.right > m) {
            return Err(FmaError::InvalidConfig {
                what: "window",
                value: format!("({}, {})", w.left, w.right),
                allowed: format!(
                    "L <= m and R <= m: FMA runs a window through its near field of block \
                     m = {m}; choose a block m >= {} or dense attention",
                    w.left.max(w.right)
                ),
            });
        }
        Ok(())
    }

    /// Checks that learned weights hold only finite values (a pass over every value, so it is
    /// done once when a configuration is prepared, not per call).
    pub fn validate_values(&self) -> Result<()> {
        match &self.downsample {
            Downsample::Learned(w) => w.check_finite(),
            Downsample::Average => Ok(()),
        }
    }
}

/// Configuration of incremental decoding (algorithm.md §10): a cache for `batch` sequences of
/// `heads` heads of width `head_dim`, each at most `max_len` tokens long, appended to `max_chunk`
/// tokens (or fewer) per step. The FMA part (`fma`: m, p, downsampling, count correction) is
/// causal, with fine queries.
///
/// What the cache holds per sequence and head: the last `2m - 1 + max_chunk` keys and values
/// (a ring: the near field of every query of a step), the last few complete windows of every
/// coarse level (a ring per level: far lists only reach back three windows), and, with
/// `history`, every key and value so far (in pages that each fit one storage binding) for the
/// exact dense decode and for callers who want the whole cache. With a sliding window
/// (`variants`) only the last L + `max_chunk` keys and values, whatever the length.
#[derive(Clone, Debug, PartialEq)]
pub struct DecodeConfig {
    /// Block size, rank, downsampling and count correction of the FMA.
    pub fma: FmaConfig,
    /// Sequences in the batch.
    pub batch: usize,
    /// Query heads per sequence.
    pub heads: usize,
    /// K/V heads per sequence: `heads`, or a divisor of it (grouped-query attention: query head
    /// h reads K/V head h / (heads / kv_heads)). The cache holds K/V heads only.
    pub kv_heads: usize,
    /// Head dimension d.
    pub head_dim: usize,
    /// Most tokens a sequence may reach (fixes the number of coarse levels kept).
    pub max_len: usize,
    /// Most tokens one step appends per sequence (fixes the rings' sizes).
    pub max_chunk: usize,
    /// Keep every key and value (needed by the dense decode; with a window nothing beyond
    /// the window is kept, so this is ignored).
    pub history: bool,
    /// Softmax variants (issue 30, docs/variants.md): softcap, sinks of shape (heads,), a
    /// sliding window (L, 0). With a window the cache keeps only the last L + `max_chunk`
    /// keys and values per sequence and head (a ring), no coarse level and no history, so its
    /// memory does not depend on `max_len`; both decode modes then run exact windowed
    /// attention over that ring.
    pub variants: Variants,
    /// How the cache's keys and values (the ring, the history pages) and a step's Q, K, V and
    /// O are stored (issue 29): [`Storage::F16`] halves their bytes on adapters with
    /// `SHADER_F16`; the coarse slots (running sums of a window's tokens), the LSE and every
    /// sum stay f32.
    pub storage: Storage,
}

impl DecodeConfig {
    /// A cache for `batch` sequences of `heads` heads of width `head_dim` up to `max_len` tokens,
    /// with `fma`'s block size, rank and downsampling, steps of up to 64 tokens and the history
    /// kept.
    pub fn new(
        fma: FmaConfig,
        batch: usize,
        heads: usize,
        head_dim: usize,
        max_len: usize,
    ) -> Self {
        Self {
            fma: fma.causal(true).queries(Queries::Fine),
            batch,
            heads,
            kv_heads: heads,
            head_dim,
            max_len,
            max_chunk: 64,
            history: true,
            variants: Variants::default(),
            storage: Storage::F32,
        }
    }

    /// Stores the cache and the step tensors as `storage` (see the field; f16 needs
    /// `SHADER_F16` on the device, else [`crate::FmaError::MissingFeature`] from
    /// [`crate::gpu::Decoder::new`]).
    pub fn storage(mut self, storage: Storage) -> Self {
        self.storage = storage;
        self
    }

    /// Decodes with the softmax variants `variants` (softcap, sinks (heads,), a window with
    /// R = 0): see the field.
    pub fn variants(mut self, variants: Variants) -> Self {
        self.variants = variants;
        self
    }

    /// `kv_heads` K/V heads per sequence (grouped-query attention; must divide `heads`): the
    /// cache then holds `heads / kv_heads` times less, and steps take K, V of shape
    /// (batch, kv_heads, C, head_dim).
    pub fn kv_heads(mut self, kv_heads: usize) -> Self {
        self.kv_heads = kv_heads;
        self
    }

    /// Query heads per K/V head.
    pub fn group(&self) -> usize {
        self.heads / self.kv_heads.max(1)
    }

    /// Steps of at most `max_chunk` tokens per sequence.
    pub fn max_chunk(mut self, max_chunk: usize) -> Self {
        self.max_chunk = max_chunk;
        self
    }

    /// Whether every key and value is kept (the dense decode needs it).
    pub fn history(mut self, keep: bool) -> Self {
        self.history = keep;
        self
    }

    /// Checks the sizes and the FMA configuration (learned weights must cover every level that
    /// a sequence of `max_len` tokens uses).
    pub fn validate(&self) -> Result<()> {
        let positive = [
            ("batch", self.batch),
            ("heads", self.heads),
            ("kv_heads", self.kv_heads),
            ("head_dim", self.head_dim),
            ("max_len", self.max_len),
            ("max_chunk", self.max_chunk),
        ];
        for (what, value) in positive {
            if value == 0 {
                return Err(FmaError::InvalidConfig {
                    what,
                    value: "0".into(),
                    allowed: ">= 1".into(),
                });
            }
        }
        if !self.heads.is_multiple_of(self.kv_heads) {
            return Err(FmaError::InvalidConfig {
                what: "kv_heads",
                value: format!("{} K/V heads for {} query heads", self.kv_heads, self.heads),
                allowed: "a divisor of heads (each K/V head serves heads / kv_heads query heads)"
                    .into(),
            });
        }
        if self.max_len > u32::MAX as usize / 2 {
            return Err(FmaError::InvalidConfig {
                what: "max_len",
                value: self.max_len.to_string(),
                allowed: format!("<= {} (positions are 32-bit on the GPU)", u32::MAX / 2),
            });
        }
        // Decoding is causal: a window looks no further right than the query (R = 0). The
        // variants are checked here rather than as FMA's: FMA's window rule (L <= m) binds
        // the FMA mode only (`DecodeConfig::check_fma_window`), not the dense one.
        self.variants.validate(self.heads, true)?;
        let mut fma = self.fma.clone();
        fma.causal = true;
        fma.queries = Queries::Fine;
        fma.variants = Variants::default();
        fma.validate(self.head_dim, self.max_len)
    }

    /// What the FMA mode adds for a window: FMA runs it through its near field, as the
    /// causal forward does, so L <= m for block m unless one block holds the whole sequence
    /// (m >= max_len); a wider window is the forward's typed error (`InvalidConfig`,
    /// "window"). The dense mode takes any L. Without a window: Ok.
    pub fn check_fma_window(&self) -> Result<()> {
        let mut fma = self.fma.clone();
        fma.variants = self.variants.clone();
        fma.validate_variants(self.max_len)
    }
}
