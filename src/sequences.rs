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
    /// Real tokens of each sequence (its queries).
    pub lengths: Vec<usize>,
    /// Keys (and values) of each sequence when they differ from its queries
    /// ([`Sequences::packed_cross`], FlashAttention's `cu_seqlens_k`); `None`: as `lengths`.
    pub kv_lengths: Option<Vec<usize>>,
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
            kv_lengths: None,
        })
    }

    /// Packed sequences whose queries and keys have lengths of their own (FlashAttention's
    /// `cu_seqlens_q` and `cu_seqlens_k` as lengths): Q, O of `(1, heads, sum q_lengths, d)`,
    /// K, V of `(1, kv_heads, sum kv_lengths, d)`; sequence s's queries attend to its own keys
    /// (causal: bottom-right aligned, as [`crate::Shape::cross`]). A sequence with no query
    /// and no key is dropped; one with keys but no query keeps its keys' place; one with queries
    /// but no key gives O = 0, LSE = -inf. Equal lengths are [`Sequences::packed`].
    pub fn packed_cross(q_lengths: Vec<usize>, kv_lengths: Vec<usize>) -> Result<Self> {
        if q_lengths.len() != kv_lengths.len() {
            return Err(FmaError::InvalidConfig {
                what: "key lengths of a packed batch",
                value: format!(
                    "{} key lengths for {} sequences",
                    kv_lengths.len(),
                    q_lengths.len()
                ),
                allowed: "one key length per sequence".into(),
            });
        }
        if q_lengths == kv_lengths {
            return Self::packed(q_lengths);
        }
        let (lengths, kv): (Vec<usize>, Vec<usize>) = q_lengths
            .into_iter()
            .zip(kv_lengths)
            .filter(|&(q, k)| q > 0 || k > 0)
            .unzip();
        if lengths.iter().all(|&l| l == 0) {
            return Err(FmaError::InvalidConfig {
                what: "sequence lengths",
                value: "no sequence has a query".into(),
                allowed: "at least one sequence with a token".into(),
            });
        }
        Ok(Self {
            layout: SeqLayout::Packed,
            lengths,
            kv_lengths: Some(kv),
        })
    }

    /// Keys of sequence s.
    pub fn kv_len(&self, s: usize) -> usize {
        self.kv_lengths.as_ref().map_or(self.lengths[s], |k| k[s])
    }

    /// Whether some sequence has another number of keys than of queries.
    pub fn is_cross(&self) -> bool {
        self.kv_lengths.is_some()
    }

    /// The keys of every sequence (its `lengths` unless [`Sequences::packed_cross`] set them).
    pub fn kv_lens(&self) -> Vec<usize> {
        self.kv_lengths
            .clone()
            .unwrap_or_else(|| self.lengths.clone())
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
            kv_lengths: None,
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

    /// The longest key range of a sequence (the most keys a query row attends to).
    pub fn max_kv_len(&self) -> usize {
        self.kv_lens().into_iter().max().unwrap_or(0)
    }

    /// The tensors' shape for `heads` query heads, `kv_heads` K/V heads and head dimension `d`:
    /// packed `(1, heads, total, d)` (K, V: their own total), padded `(batch, heads, n, d)`
    /// (K, V with `kv_heads`).
    pub fn shape(&self, heads: usize, kv_heads: usize, d: usize) -> Shape {
        match self.layout {
            SeqLayout::Packed => {
                let kv_total = self.kv_lens().iter().sum();
                Shape::cross(1, heads, self.total(), kv_total, d)
            }
            SeqLayout::Padded { n } => Shape::new(self.count(), heads, n, d),
        }
        .with_kv_heads(kv_heads)
    }

    /// Rows between the heads of one sequence, and the row of token 0 of head 0 of sequence
    /// `s`, in Q, O (`heads` query heads).
    pub fn rows(&self, heads: usize, s: usize) -> (usize, usize) {
        match self.layout {
            SeqLayout::Packed => (self.total(), self.lengths[..s].iter().sum()),
            SeqLayout::Padded { n } => (n, s * heads * n),
        }
    }

    /// [`Sequences::rows`] of K and V (`kv_heads` heads, packed by the key lengths).
    pub fn kv_rows(&self, kv_heads: usize, s: usize) -> (usize, usize) {
        match (&self.kv_lengths, self.layout) {
            (Some(kv), SeqLayout::Packed) => (kv.iter().sum(), kv[..s].iter().sum()),
            _ => self.rows(kv_heads, s),
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
                        "{want}: the lengths sum to {} packed tokens in one batch row (keys: {})",
                        self.total(),
                        self.kv_lens().iter().sum::<usize>()
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
    fn cross_lengths_pack_keys_by_their_own() {
        let s = Sequences::packed_cross(vec![2, 0, 0, 3], vec![5, 4, 0, 3]).unwrap();
        assert_eq!(
            (s.lengths.clone(), s.kv_lens()),
            (vec![2, 0, 3], vec![5, 4, 3])
        );
        assert_eq!(
            s.shape(2, 1, 8),
            Shape::cross(1, 2, 5, 12, 8).with_kv_heads(1)
        );
        assert_eq!((s.rows(2, 2), s.kv_rows(1, 2)), ((5, 2), (12, 9)));
        assert_eq!(s.max_kv_len(), 5);
        let same = Sequences::packed_cross(vec![0, 3], vec![0, 3]).unwrap();
        assert_eq!(same, Sequences::packed(vec![3]).unwrap());
        assert!(Sequences::packed_cross(vec![1], vec![1, 2]).is_err());
        assert!(Sequences::packed_cross(vec![0, 0], vec![1, 2]).is_err());
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
