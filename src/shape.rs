//! The shape of an attention problem: Q and O of (batch, heads, seq, head_dim), K and V of
//! (batch, kv_heads, seq_kv, head_dim), row-major f32.

use crate::error::{FmaError, Result};

/// Shape of Q and O: `(batch, heads, seq, head_dim)`, row-major, so element `(b, h, i, c)`
/// sits at `((b * heads + h) * seq + i) * head_dim + c`; K and V: `(batch, kv_heads, seq_kv,
/// head_dim)`, the same with `kv_heads` and `seq_kv`. The LSE has shape `(batch, heads, seq)`.
/// Self-attention ([`Shape::new`]) has `seq_kv = seq`; dense attention also takes
/// `seq_kv != seq` ([`Shape::cross`]); FMA asks for equal lengths.
///
/// Grouped-query attention ([`Shape::with_kv_heads`]): `kv_heads` divides `heads`, and query
/// head `h` reads K/V head `h / (heads / kv_heads)`, so consecutive query heads share a K/V
/// head (PyTorch's `enable_gqa`, FlashAttention). `kv_heads = heads` is multi-head attention,
/// `kv_heads = 1` multi-query attention. In the flattened `(batch * heads)` index `bh`, the
/// K/V head is `bh / group` with `group = heads / kv_heads`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Shape {
    /// Batch size.
    pub batch: usize,
    /// Query heads per batch element.
    pub heads: usize,
    /// K/V heads per batch element: `heads` (multi-head), or a divisor of it (grouped-query).
    pub kv_heads: usize,
    /// Query length n (rows of Q, O and the LSE).
    pub seq: usize,
    /// Key length (rows of K and V): `seq` for self-attention.
    pub seq_kv: usize,
    /// Head dimension d.
    pub head_dim: usize,
}

impl Shape {
    /// A self-attention shape `(batch, heads, seq, head_dim)`: as many keys as queries.
    pub fn new(batch: usize, heads: usize, seq: usize, head_dim: usize) -> Self {
        Self::cross(batch, heads, seq, seq, head_dim)
    }

    /// Q of `(batch, heads, seq, head_dim)` against K, V of `(batch, heads, seq_kv, head_dim)`.
    pub fn cross(batch: usize, heads: usize, seq: usize, seq_kv: usize, head_dim: usize) -> Self {
        Self {
            batch,
            heads,
            kv_heads: heads,
            seq,
            seq_kv,
            head_dim,
        }
    }

    /// This shape with `kv_heads` K/V heads (grouped-query attention; `kv_heads` must divide
    /// `heads`, which [`Shape::validate`] checks).
    pub fn with_kv_heads(mut self, kv_heads: usize) -> Self {
        self.kv_heads = kv_heads;
        self
    }

    /// Query heads per K/V head: `heads / kv_heads` (1 for multi-head attention).
    pub fn group(&self) -> usize {
        self.heads / self.kv_heads.max(1)
    }

    /// batch * kv_heads: the number of K/V heads, each pooled once for its group of queries.
    pub fn kv_batch_heads(&self) -> usize {
        self.batch * self.kv_heads
    }

    /// Whether there are as many keys as queries.
    pub fn is_self(&self) -> bool {
        self.seq == self.seq_kv
    }

    /// [`FmaError::ShapeMismatch`] unless there are as many keys as queries: FMA's levels are
    /// those of one sequence (until incremental decoding plans a query block against a longer
    /// cache).
    pub fn check_self_attention(&self) -> Result<()> {
        if self.is_self() {
            return Ok(());
        }
        Err(FmaError::ShapeMismatch {
            what: "FMA keys and values".into(),
            expected: format!(
                "as many keys as queries ({} rows): FMA's levels are those of one sequence",
                self.seq
            ),
            got: format!("{} rows (seq_kv)", self.seq_kv),
        })
    }

    /// This shape with `heads` query heads per batch element (and a batch of one): a run of
    /// heads. A run of grouped heads keeps the group size when `heads` is a multiple of it
    /// (whole groups); a run that is a part of one group reads one K/V head.
    pub fn with_heads(&self, heads: usize) -> Self {
        let kv_heads = if heads.is_multiple_of(self.group()) {
            heads / self.group()
        } else {
            1
        };
        Self::cross(1, heads, self.seq, self.seq_kv, self.head_dim).with_kv_heads(kv_heads)
    }

    /// batch * heads: the number of independent attention problems.
    pub fn batch_heads(&self) -> usize {
        self.batch * self.heads
    }

    /// Number of elements of Q (and of O): batch * heads * seq * head_dim.
    pub fn elements(&self) -> usize {
        self.batch_heads() * self.seq * self.head_dim
    }

    /// Number of elements of K (and of V): batch * kv_heads * seq_kv * head_dim.
    pub fn kv_elements(&self) -> usize {
        self.kv_batch_heads() * self.seq_kv * self.head_dim
    }

    /// Number of rows of the LSE: batch * heads * seq.
    pub fn rows(&self) -> usize {
        self.batch_heads() * self.seq
    }

    /// Rejects zero-length axes and sizes whose element count overflows.
    pub fn validate(&self) -> Result<()> {
        for (name, v) in [
            ("batch", self.batch),
            ("heads", self.heads),
            ("kv_heads", self.kv_heads),
            ("seq", self.seq),
            ("seq_kv", self.seq_kv),
            ("head_dim", self.head_dim),
        ] {
            if v == 0 {
                return Err(FmaError::InvalidConfig {
                    what: name,
                    value: "0".into(),
                    allowed: "every axis of (batch, heads, seq, head_dim) must be >= 1".into(),
                });
            }
        }
        if !self.heads.is_multiple_of(self.kv_heads) {
            return Err(FmaError::InvalidConfig {
                what: "kv_heads",
                value: self.kv_heads.to_string(),
                allowed: format!(
                    "a divisor of heads = {} (grouped-query attention: each K/V head serves \
                     heads / kv_heads consecutive query heads)",
                    self.heads
                ),
            });
        }
        let total = |seq: usize| {
            self.batch
                .checked_mul(self.heads)
                .and_then(|x| x.checked_mul(seq))
                .and_then(|x| x.checked_mul(self.head_dim))
        };
        let fits = |t: Option<usize>| t.is_some_and(|t| t <= u32::MAX as usize);
        if !fits(total(self.seq)) || !fits(total(self.seq_kv)) {
            return Err(FmaError::InvalidConfig {
                what: "shape",
                value: format!("{self}"),
                allowed: format!("at most {} elements per tensor", u32::MAX),
            });
        }
        Ok(())
    }

    /// Checks that a slice of K or V holds exactly `kv_elements()` values.
    pub fn check_kv_len(&self, what: &str, len: usize) -> Result<()> {
        if len != self.kv_elements() {
            return Err(FmaError::ShapeMismatch {
                what: what.into(),
                expected: format!("{self} = {} elements", self.kv_elements()),
                got: format!("{len} elements"),
            });
        }
        Ok(())
    }

    /// Checks that a slice of Q (or O, dO) holds exactly `elements()` values.
    pub fn check_len(&self, what: &str, len: usize) -> Result<()> {
        if len != self.elements() {
            return Err(FmaError::ShapeMismatch {
                what: what.into(),
                expected: format!("{self} = {} elements", self.elements()),
                got: format!("{len} elements"),
            });
        }
        Ok(())
    }
}

impl std::fmt::Display for Shape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "(batch {}, heads {}", self.batch, self.heads)?;
        if self.kv_heads != self.heads {
            write!(f, ", kv_heads {}", self.kv_heads)?;
        }
        write!(f, ", seq {}", self.seq)?;
        if !self.is_self() {
            write!(f, ", seq_kv {}", self.seq_kv)?;
        }
        write!(f, ", head_dim {})", self.head_dim)
    }
}
