//! The sequence table of a variable-length batch: what `shaders/shared/sequences.wgsl` reads to
//! turn a dispatch index into (head, sequence) and rows. Pure arithmetic, tested here.
//!
//! Sections (u32), S sequences: TOK (S + 1, prefix sums of the real tokens), TILE (S + 1,
//! prefix sums of the executor's query tiles per sequence), QBASE and KVBASE (S each: the row of
//! token 0 of head 0 in Q and in K), KVTOK (S + 1, prefix sums of the sequences' keys: TOK's
//! unless `Sequences::packed_cross` gave them lengths of their own), then per coarse level l
//! ROWS_l (S + 1, prefix sums of windows_l(n_s) p). Work is laid out head by head, sequence by
//! sequence inside a head.

use crate::error::{FmaError, Result};
use crate::levels::Levels;
use crate::sequences::Sequences;

/// A variable-length batch's table and the totals its plan sizes dispatches and buffers by.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SeqTable {
    /// The u32 words, as the shaders read them.
    pub words: Vec<u32>,
    /// Number of sequences S.
    pub seqs: usize,
    /// Query tiles of one head over all sequences (the TILE section's total).
    pub tiles: u64,
    /// Coarse rows of one head per level over all sequences (each ROWS section's total).
    pub level_rows: Vec<usize>,
    /// Rows between the query heads of a sequence in Q, O, the LSE.
    pub q_head_stride: usize,
    /// Rows between the K/V heads of a sequence in K, V.
    pub kv_head_stride: usize,
    /// Tokens of the longest sequence.
    pub max_len: usize,
    /// Keys of the longest sequence (the most keys a query row attends to).
    pub max_kv_len: usize,
}

impl SeqTable {
    /// The table of `seqs` with `heads` query and `kv_heads` K/V heads, `tiles(n)` query tiles
    /// for a sequence of n tokens, and the coarse levels `levels` (those of the longest
    /// sequence, with the index maps' (m, p); none for dense attention).
    pub fn new(
        seqs: &Sequences,
        heads: usize,
        kv_heads: usize,
        levels: Option<&Levels>,
        tiles: impl Fn(usize) -> u64,
    ) -> Result<Self> {
        let s = seqs.count();
        let prefix = |f: &dyn Fn(usize) -> u64| -> Vec<u64> {
            let mut out = Vec::with_capacity(s + 1);
            let mut acc = 0u64;
            out.push(0);
            for &n in &seqs.lengths {
                acc += f(n);
                out.push(acc);
            }
            out
        };
        let mut words64 = prefix(&|n| n as u64);
        let tile_prefix = prefix(&|n| tiles(n));
        let total_tiles = tile_prefix[s];
        words64.extend(tile_prefix);
        words64.extend((0..s).map(|i| seqs.rows(heads, i).1 as u64));
        words64.extend((0..s).map(|i| seqs.kv_rows(kv_heads, i).1 as u64));
        let kv_lens = seqs.kv_lens();
        words64.extend(
            std::iter::once(0).chain(kv_lens.iter().scan(0u64, |acc, &n| {
                *acc += n as u64;
                Some(*acc)
            })),
        );
        let mut level_rows = Vec::new();
        if let Some(lv) = levels {
            for level in &lv.levels {
                let rows = prefix(&|n| (n.div_ceil(level.window) * lv.p) as u64);
                level_rows.push(rows[s] as usize);
                words64.extend(rows);
            }
        }
        let words = words64
            .iter()
            .map(|&w| u32::try_from(w))
            .collect::<std::result::Result<Vec<u32>, _>>()
            .map_err(|_| FmaError::LimitExceeded {
                what: "the sequence table of a variable-length batch".into(),
                requested: words64.iter().copied().max().unwrap_or(0),
                max: u32::MAX as u64,
                unit: "rows, tokens or tiles (the shaders index them in u32)",
                advice: "split the batch into several calls".into(),
            })?;
        let (q_head_stride, _) = seqs.rows(heads, 0);
        let (kv_head_stride, _) = seqs.kv_rows(kv_heads, 0);
        Ok(Self {
            words,
            seqs: s,
            tiles: total_tiles,
            level_rows,
            q_head_stride,
            kv_head_stride,
            max_len: seqs.max_len(),
            max_kv_len: seqs.max_kv_len(),
        })
    }

    /// Coarse rows of one head over all levels and sequences.
    pub fn coarse_rows(&self) -> usize {
        self.level_rows.iter().sum()
    }

    /// First row of each level in a head's coarse block (the levels' rows concatenated).
    pub fn level_offsets(&self) -> Vec<usize> {
        self.level_rows
            .iter()
            .scan(0, |at, &r| {
                let first = *at;
                *at += r;
                Some(first)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cross_lengths_get_their_own_key_sections() {
        let seqs = Sequences::packed_cross(vec![3, 0, 2], vec![5, 4, 1]).unwrap();
        let t = SeqTable::new(&seqs, 2, 1, None, |n| n.div_ceil(2) as u64).unwrap();
        let w = &t.words;
        assert_eq!(&w[0..4], &[0, 3, 3, 5]); // TOK
        assert_eq!(&w[8..11], &[0, 3, 3]); // QBASE
        assert_eq!(&w[11..14], &[0, 5, 9]); // KVBASE: packed by the key lengths
        assert_eq!(&w[14..18], &[0, 5, 9, 10]); // KVTOK
        assert_eq!((t.q_head_stride, t.kv_head_stride), (5, 10));
        assert_eq!((t.max_len, t.max_kv_len), (3, 5));
    }

    #[test]
    fn packed_table_sections() {
        let seqs = Sequences::packed(vec![3, 9, 1]).unwrap();
        let levels = Levels::new(9, 2, 2); // m = 2: L = 2, windows of 2 and 4
        assert_eq!(levels.count(), 2);
        let t = SeqTable::new(&seqs, 4, 2, Some(&levels), |n| n.div_ceil(2) as u64).unwrap();
        let w = &t.words;
        assert_eq!(&w[0..4], &[0, 3, 12, 13]); // TOK
        assert_eq!(&w[4..8], &[0, 2, 7, 8]); // TILE: blocks of 2
        assert_eq!(&w[8..11], &[0, 3, 12]); // QBASE
        assert_eq!(&w[11..14], &[0, 3, 12]); // KVBASE
        assert_eq!(&w[14..18], &[0, 3, 12, 13]); // KVTOK: as TOK
        assert_eq!(&w[18..22], &[0, 4, 14, 16]); // level 1: 2, 5, 1 windows of 2, p = 2
        assert_eq!(&w[22..26], &[0, 2, 8, 10]); // level 2: 1, 3, 1 windows of 4
        assert_eq!(t.level_rows, vec![16, 10]);
        assert_eq!(t.level_offsets(), vec![0, 16]);
        assert_eq!((t.tiles, t.q_head_stride), (8, 13));
    }

    #[test]
    fn padded_bases_follow_each_tensors_heads() {
        let seqs = Sequences::padded(8, vec![5, 0, 8]).unwrap();
        let t = SeqTable::new(&seqs, 4, 1, None, |n| n.div_ceil(4) as u64).unwrap();
        let w = &t.words;
        assert_eq!(&w[0..4], &[0, 5, 5, 13]);
        assert_eq!(&w[4..8], &[0, 2, 2, 4]);
        assert_eq!(&w[8..11], &[0, 32, 64]); // b * heads * n
        assert_eq!(&w[11..14], &[0, 8, 16]); // b * kv_heads * n
        assert_eq!(t.q_head_stride, 8);
    }
}
