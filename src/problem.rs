//! The attention problem every entry point takes besides the tensors: the shape (with the
//! keys' length and K/V heads), the sequences of a variable-length batch, the causal mask and
//! the softmax variants.
//! One value says what is attended to; [`crate::Method`] says how (FMA or exact).

use crate::error::Result;
use crate::sequences::Sequences;
use crate::shape::Shape;
use crate::variants::Variants;

/// One attention problem. Tensors (host slices or GPU buffers) are laid out as [`Shape`]
/// says: Q, O `(batch, heads, seq, head_dim)`, K, V `(batch, kv_heads, seq_kv, head_dim)`,
/// the LSE `(batch, heads, seq)`; a variable-length batch packs or pads its sequences into
/// those axes as [`Sequences`] says (its shape is [`Sequences::shape`]).
///
/// ```
/// use multipole_attn::{Problem, Sequences, Shape};
/// // Self-attention over 4096 tokens, causal, 8 query heads sharing 2 K/V heads.
/// let p = Problem::new(Shape::new(1, 8, 4096, 64).with_kv_heads(2)).causal(true);
/// assert!(p.validate().is_ok());
/// // A packed batch of three sequences (FlashAttention's cu_seqlens).
/// let seqs = Sequences::packed(vec![100, 0, 37])?;
/// let p = Problem::varlen(seqs, 8, 8, 64).causal(true);
/// assert_eq!(p.shape.seq, 137);
/// # Ok::<(), multipole_attn::FmaError>(())
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct Problem {
    /// Batch, heads, K/V heads, query and key lengths, head_dim.
    pub shape: Shape,
    /// The sequences of a variable-length batch (`None`: every row of the batch is one whole
    /// sequence of `shape.seq` queries and `shape.seq_kv` keys).
    pub sequences: Option<Sequences>,
    /// Causal mask, bottom-right aligned: query i sees key j iff j <= i + seq_kv - seq (per
    /// sequence in a variable-length batch). PyTorch's `is_causal` is top-left aligned; the
    /// two agree when seq_kv = seq.
    pub causal: bool,
    /// The softmax variants (softcap, sinks, sliding window); default none.
    pub variants: Variants,
}

impl Problem {
    /// A bidirectional problem of `shape`, one whole sequence per batch row.
    pub fn new(shape: Shape) -> Self {
        Self {
            shape,
            sequences: None,
            causal: false,
            variants: Variants::default(),
        }
    }

    /// A variable-length batch: `seqs` with `heads` query heads, `kv_heads` K/V heads and
    /// `head_dim` channels (the tensors' shape is `seqs.shape(heads, kv_heads, head_dim)`).
    pub fn varlen(seqs: Sequences, heads: usize, kv_heads: usize, head_dim: usize) -> Self {
        Self {
            shape: seqs.shape(heads, kv_heads, head_dim),
            sequences: Some(seqs),
            causal: false,
            variants: Variants::default(),
        }
    }

    /// Sets the causal mask.
    pub fn causal(mut self, causal: bool) -> Self {
        self.causal = causal;
        self
    }

    /// Sets the softmax variants.
    pub fn variants(mut self, variants: Variants) -> Self {
        self.variants = variants;
        self
    }

    /// Checks the shape, for a variable-length batch that the sequences fill it, and the
    /// variants against the heads and the mask.
    pub fn validate(&self) -> Result<()> {
        self.shape.validate()?;
        self.variants.validate(self.shape.heads, self.causal)?;
        if let Some(seqs) = &self.sequences {
            seqs.check(self.shape)?;
        }
        Ok(())
    }
}
