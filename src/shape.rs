//! The shape of an attention problem: (batch, heads, seq, head_dim), row-major f32.

use crate::error::{FmaError, Result};

/// Shape of Q, K, V and O: `(batch, heads, seq, head_dim)`, row-major, so element
/// `(b, h, i, c)` sits at `((b * heads + h) * seq + i) * head_dim + c`.
/// The LSE has shape `(batch, heads, seq)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Shape {
    /// Batch size.
    pub batch: usize,
    /// Heads per batch element.
    pub heads: usize,
    /// Sequence length n (number of queries = number of keys).
    pub seq: usize,
    /// Head dimension d.
    pub head_dim: usize,
}

impl Shape {
    /// A shape `(batch, heads, seq, head_dim)`.
    pub fn new(batch: usize, heads: usize, seq: usize, head_dim: usize) -> Self {
        Self {
            batch,
            heads,
            seq,
            head_dim,
        }
    }

    /// batch * heads: the number of independent attention problems.
    pub fn batch_heads(&self) -> usize {
        self.batch * self.heads
    }

    /// Number of elements of Q (and of K, V, O): batch * heads * seq * head_dim.
    pub fn elements(&self) -> usize {
        self.batch_heads() * self.seq * self.head_dim
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
            ("seq", self.seq),
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
        let total = self
            .batch
            .checked_mul(self.heads)
            .and_then(|x| x.checked_mul(self.seq))
            .and_then(|x| x.checked_mul(self.head_dim));
        if total.is_none() || total.unwrap_or(0) > u32::MAX as usize {
            return Err(FmaError::InvalidConfig {
                what: "shape",
                value: format!("{self}"),
                allowed: format!("at most {} elements per tensor", u32::MAX),
            });
        }
        Ok(())
    }

    /// Checks that a slice holds exactly `elements()` values.
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
        write!(
            f,
            "(batch {}, heads {}, seq {}, head_dim {})",
            self.batch, self.heads, self.seq, self.head_dim
        )
    }
}
