//! Variable-length batches: several sequences of different lengths in one call, each its own
//! attention problem (for FMA its own levels, windows and partial last window, exactly as if
//! run alone), no token attending across sequences.
//!
//! Two layouts, as models hold them:
//! - **packed** (FlashAttention's `cu_seqlens`): the sequences one after another along the
//!   sequence axis, Q, O of shape `(1, heads, total, d)`, K, V of `(1, kv_heads, total, d)`, the
//!   LSE `(1, heads, total)`, with `total` the sum of the lengths. No padding, so tens of
//!   thousands of short sequences cost their tokens, and one long sequence beside short ones
//!   costs its own.
//! - **padded**: `(batch, heads, n, d)` with one length per batch row; positions at or beyond a
//!   row's length are neither attended nor attended from: their O rows are 0 and their LSE
//!   -inf.

use crate::error::{FmaError, Result};
use crate::shape::Shape;

/// Where the sequences of a variable-length batch lie in the tensors.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SeqLayout {
    /// One after another along the sequence axis (`cu_seqlens`): `(1, heads, total, d)`.
    Packed,
    /// One batch row each, padded to `n` tokens: `(batch, heads, n, d)`.
    Padded {
        /// Tokens per row, real and padding.
        n: usize,
    },
}

/// The sequences of a variable-length batch: their layout and lengths.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Sequences {
    /// Where they lie.
    pub layout: SeqLayout,
    /// Real tokens of each sequence.
    pub lengths: Vec<usize>,
}

impl Sequences {
    /// Packed sequences of `lengths` tokens (FlashAttention's `cu_seqlens` are the prefix sums).
    /// An empty sequence (length 0, a repeated entry of `cu_seqlens`, as serving batches hold
    /// them) has no rows in a packed tensor: it is dropped, which changes no output, so
    /// `[0, 5, 0, 3]` is the batch `[5, 3]`. At least one sequence must be non-empty.
    pub fn packed(lengths: Vec<usize>) -> Result<Self> {
        let given = lengths.len();
        let lengths: Vec<usize> = lengths.into_iter().filter(|&l| l > 0).collect();
        if lengths.is_empty() {
            return Err(FmaError::InvalidConfig {
                what: "sequence lengths",
                value: format!("{given} sequence(s), all empty"),
                allowed: "at least one sequence with a token".into(),
            });
        }
        Ok(Self {
            layout: SeqLayout::Packed,
            lengths,
        })
    }

    /// Padded rows of `n` tokens with `lengths[b]` real ones each (0 allowed: a row with no
    /// sequence, whose outputs are all padding).
    pub fn padded(n: usize, lengths: Vec<usize>) -> Result<Self> {
        if lengths.is_empty() {
            return Err(FmaError::InvalidConfig {
                what: "sequence lengths",
                value: "[]".into(),
                allowed: "one length per batch row".into(),
            });
        }
        if let Some((i, &l)) = lengths.iter().enumerate().find(|&(_, &l)| l > n) {
            return Err(FmaError::InvalidConfig {
                what: "sequence lengths",
                value: format!("length {l} at batch row {i}"),
                allowed: format!("lengths <= n = {n}, the padded rows' length"),
            });
        }
        Ok(Self {
            layout: SeqLayout::Padded { n },
            lengths,
        })
    }

    /// Number of sequences.
    pub fn count(&self) -> usize {
        self.lengths.len()
    }

    /// The longest sequence (its levels are the most any sequence has).
    pub fn max_len(&self) -> usize {
        self.lengths.iter().copied().max().unwrap_or(0)
    }

    /// Real tokens of all sequences.
    pub fn total(&self) -> usize {
        self.lengths.iter().sum()
    }

    /// The tensors' shape for `heads` query heads, `kv_heads` K/V heads and head dimension `d`:
    /// packed `(1, heads, total, d)`, padded `(batch, heads, n, d)` (K, V with `kv_heads`).
    pub fn shape(&self, heads: usize, kv_heads: usize, d: usize) -> Shape {
        match self.layout {
            SeqLayout::Packed => Shape::new(1, heads, self.total(), d),
            SeqLayout::Padded { n } => Shape::new(self.count(), heads, n, d),
        }
        .with_kv_heads(kv_heads)
    }

    /// Rows between the heads of one sequence, and the row of token 0 of head 0 of sequence
    /// `s`, in a tensor with `heads` heads (Q, O: query heads; K, V: K/V heads).
    pub fn rows(&self, heads: usize, s: usize) -> (usize, usize) {
        match self.layout {
            SeqLayout::Packed => (self.total(), self.lengths[..s].iter().sum()),
            SeqLayout::Padded { n } => (n, s * heads * n),
        }
    }

    /// Checks the lengths against `shape` (the tensors' shape, as [`Sequences::shape`] gives).
    pub fn check(&self, shape: Shape) -> Result<()> {
        let want = self.shape(shape.heads, shape.kv_heads, shape.head_dim);
        if want != shape {
            return Err(FmaError::ShapeMismatch {
                what: "variable-length batch".into(),
                expected: match self.layout {
                    SeqLayout::Packed => format!(
                        "{want}: the lengths sum to {} packed tokens in one batch row",
                        self.total()
                    ),
                    SeqLayout::Padded { n } => format!(
                        "{want}: one batch row per length ({}), {n} tokens each",
                        self.count()
                    ),
                },
                got: format!("{shape}"),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_give_shapes_and_rows() {
        let p = Sequences::packed(vec![3, 1, 5]).unwrap();
        assert_eq!(p.shape(4, 2, 8), Shape::new(1, 4, 9, 8).with_kv_heads(2));
        assert_eq!(p.rows(4, 2), (9, 4));
        let q = Sequences::padded(6, vec![3, 0, 6]).unwrap();
        assert_eq!(q.shape(2, 1, 8), Shape::new(3, 2, 6, 8).with_kv_heads(1));
        assert_eq!(q.rows(2, 2), (6, 24));
        assert_eq!(q.rows(1, 2), (6, 12));
        assert!(q.check(Shape::new(3, 2, 7, 8)).is_err());
    }

    #[test]
    fn empty_packed_sequences_are_dropped() {
        let s = Sequences::packed(vec![0, 5, 0, 3, 0]).unwrap();
        assert_eq!(s, Sequences::packed(vec![5, 3]).unwrap());
        assert_eq!(s.shape(2, 1, 4), Shape::new(1, 2, 8, 4).with_kv_heads(1));
    }

    #[test]
    fn bad_lengths_are_typed_errors() {
        let e = Sequences::packed(vec![0, 0]).unwrap_err();
        assert!(e.to_string().contains("all empty"), "{e}");
        assert!(Sequences::packed(vec![]).is_err());
        let e = Sequences::padded(4, vec![3, 5]).unwrap_err();
        assert!(e.to_string().contains("length 5 at batch row 1"), "{e}");
    }
}
