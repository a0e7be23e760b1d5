//! FMA configuration: block size m, rank p, causal mask, downsampling mode, count correction.

use crate::error::{FmaError, Result};
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

/// Configuration of a Fast Multipole Attention with fine queries.
///
/// Defaults (`FmaConfig::default()`): m = 64, p = 2, bidirectional, Average, count correction on.
#[derive(Clone, Debug, PartialEq)]
pub struct FmaConfig {
    /// Fine block size m (>= 1, divisible by `rank`).
    pub block: usize,
    /// Coarse rank p: coarse keys per window at every coarse level (>= 1).
    pub rank: usize,
    /// Causal mask: query i sees keys t <= i only.
    pub causal: bool,
    /// Downsampling mode of the coarse keys and values.
    pub downsample: Downsample,
    /// Add ln |S(l,a,j)| to the logit of every coarse key (algorithm.md §5).
    pub count_correction: bool,
}

impl Default for FmaConfig {
    fn default() -> Self {
        Self {
            block: 64,
            rank: 2,
            causal: false,
            downsample: Downsample::Average,
            count_correction: true,
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

    /// Sets the causal mask.
    pub fn causal(mut self, causal: bool) -> Self {
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

    /// Checks m and p (and the weights' shapes for `head_dim` and `seq`, in Learned mode).
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
        if let Downsample::Learned(w) = &self.downsample {
            w.validate(head_dim, self.block, self.rank, seq)?;
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
