//! FMA of queries shorter than their keys (chunked prefill: a chunk of n new tokens attending
//! to itself and the seq_kv - n tokens before it): with causal, fine queries and
//! seq_kv >= seq, the n queries are the last n positions of a causal FMA over seq_kv tokens,
//! so their outputs are rows seq_kv - n .. of that full-length result (bottom-right aligned, as
//! FlashAttention's causal mask for seq_q != seq_k).
//!
//! With fine queries a query's output depends only on its own row of Q (keys and values are
//! pooled, queries are not), so the full-length forward runs on Q with zero rows before the
//! chunk and keeps the chunk's rows: exactly the rows a causal FMA over seq_kv tokens gives.
//! The same holds for the backward: a zero row of dO gives those padding queries no gradient,
//! and no key or value gets one from them. Cost: a forward over seq_kv queries; incremental
//! decoding (`gpu::Decoder`) serves the case of few new tokens against a long cache.
//! Other cross-length FMA problems (bidirectional, coarse queries, seq_kv < seq, 2D) have no
//! FMA meaning: [`check_fma_cross`] refuses them with a typed error.

use crate::config::{FmaConfig, Queries};
use crate::error::{FmaError, Result};
use crate::problem::Problem;
use crate::sequences::Sequences;
use crate::shape::Shape;

/// Whether `cfg` gives a chunk of queries an FMA meaning: causal (the chunk is the last
/// positions), fine queries (a query's output depends on its own row only) and 1D.
fn runs_chunks(cfg: &FmaConfig) -> bool {
    cfg.causal && cfg.queries == Queries::Fine && cfg.grid.is_none()
}

/// Checks `cfg` for the problem `p` before anything runs: the configuration with `p`'s mask
/// (m, p, causal with coarse queries or a grid, the learned weights' levels for `p`'s keys)
/// and the keys' lengths, whole ([`check_fma_cross`]) or per sequence
/// ([`check_fma_cross_varlen`]).
pub fn check(cfg: &FmaConfig, p: &Problem) -> Result<()> {
    let cfg = cfg.clone().causal(p.causal);
    cfg.validate(p.shape.head_dim, p.shape.seq_kv)?;
    match &p.sequences {
        None => check_fma_cross(p.shape, &cfg).map(drop),
        Some(seqs) => check_fma_cross_varlen(seqs, &cfg).map(drop),
    }
}

/// Whether `shape` is a cross-length FMA problem that FMA runs (causal, fine queries, 1D,
/// seq_kv > seq): `Ok(true)`; self-attention: `Ok(false)`; any other cross-length problem: a
/// typed error saying what FMA takes.
pub fn check_fma_cross(shape: Shape, cfg: &FmaConfig) -> Result<bool> {
    if shape.is_self() {
        return Ok(false);
    }
    let ok = runs_chunks(cfg);
    if ok && shape.seq_kv > shape.seq {
        return Ok(true);
    }
    Err(FmaError::ShapeMismatch {
        what: "FMA keys and values".into(),
        expected: format!(
            "as many keys as queries ({} rows), or more keys with causal, fine queries and 1D \
             tokens (the queries are then the last {} of the keys' positions, bottom-right \
             aligned); dense attention takes any lengths",
            shape.seq, shape.seq
        ),
        got: format!(
            "{} rows (seq_kv){}",
            shape.seq_kv,
            if ok {
                ""
            } else {
                " with a bidirectional, coarse-query or 2D configuration"
            }
        ),
    })
}

/// The self-attention shape the chunk runs in: `shape` with seq = seq_kv.
pub fn full_shape(shape: Shape) -> Shape {
    Shape::cross(
        shape.batch,
        shape.heads,
        shape.seq_kv,
        shape.seq_kv,
        shape.head_dim,
    )
    .with_kv_heads(shape.kv_heads)
}

/// Q (or dO) of `shape`, (batch, heads, seq, head_dim), placed at the last seq positions of
/// every head of [`full_shape`], zeros before.
pub fn pad_rows<T: Copy + Default>(x: &[T], shape: Shape) -> Vec<T> {
    let (n, n_kv, d) = (shape.seq, shape.seq_kv, shape.head_dim);
    let mut full = vec![T::default(); shape.batch_heads() * n_kv * d];
    for (src, dst) in x.chunks_exact(n * d).zip(full.chunks_exact_mut(n_kv * d)) {
        dst[(n_kv - n) * d..].copy_from_slice(src);
    }
    full
}

/// The last seq rows of every head of a [`full_shape`] tensor with `width` values per row (d for
/// O and dQ, 1 for the LSE): the chunk's rows.
pub fn last_rows<T: Copy>(full: &[T], shape: Shape, width: usize) -> Vec<T> {
    let (n, n_kv) = (shape.seq, shape.seq_kv);
    full.chunks_exact(n_kv * width)
        .flat_map(|head| &head[(n_kv - n) * width..])
        .copied()
        .collect()
}

/// The same for a packed batch whose sequences have keys of their own
/// ([`Sequences::packed_cross`]): `Ok(true)` when FMA runs it (causal, fine queries, 1D, every
/// sequence with at least as many keys as queries), `Ok(false)` for equal lengths, else a
/// typed error.
pub fn check_fma_cross_varlen(seqs: &Sequences, cfg: &FmaConfig) -> Result<bool> {
    if !seqs.is_cross() {
        return Ok(false);
    }
    let ok = runs_chunks(cfg);
    let short = (0..seqs.count()).find(|&s| seqs.kv_len(s) < seqs.lengths[s]);
    if ok && short.is_none() {
        return Ok(true);
    }
    Err(FmaError::ShapeMismatch {
        what: "FMA of sequences with key lengths of their own".into(),
        expected: "causal, fine queries, 1D, and at least as many keys as queries in every \
                   sequence (its queries are the last of its keys' positions); dense attention \
                   takes any lengths"
            .into(),
        got: match short {
            Some(s) => format!(
                "sequence {s}: {} queries, {} keys",
                seqs.lengths[s],
                seqs.kv_len(s)
            ),
            None => "a bidirectional, coarse-query or 2D configuration".into(),
        },
    })
}

/// The self-attention batch a cross-length packed batch runs as: the key lengths.
pub fn full_sequences(seqs: &Sequences) -> Result<Sequences> {
    Sequences::packed(seqs.kv_lens())
}

/// Q (or dO) of a cross-length packed batch, `(1, heads, sum q_s, d)`, placed at the last q_s
/// positions of each sequence's k_s in `(1, heads, sum k_s, d)`, zeros before.
pub fn pad_rows_varlen<T: Copy + Default>(
    x: &[T],
    seqs: &Sequences,
    heads: usize,
    d: usize,
) -> Vec<T> {
    let (q_total, kv_total) = (seqs.total(), seqs.kv_lens().iter().sum::<usize>());
    let mut full = vec![T::default(); heads * kv_total * d];
    for h in 0..heads {
        let (mut q_at, mut kv_at) = (h * q_total, h * kv_total);
        for s in 0..seqs.count() {
            let (n, nk) = (seqs.lengths[s], seqs.kv_len(s));
            let dst = (kv_at + nk - n) * d;
            full[dst..dst + n * d].copy_from_slice(&x[q_at * d..(q_at + n) * d]);
            (q_at, kv_at) = (q_at + n, kv_at + nk);
        }
    }
    full
}

/// The rows of each sequence's queries out of a [`pad_rows_varlen`]-shaped tensor with `width`
/// values per row: `(1, heads, sum q_s, width)`.
pub fn last_rows_varlen<T: Copy>(
    full: &[T],
    seqs: &Sequences,
    heads: usize,
    width: usize,
) -> Vec<T> {
    let kv_total = seqs.kv_lens().iter().sum::<usize>();
    let mut out = Vec::with_capacity(heads * seqs.total() * width);
    for h in 0..heads {
        let mut kv_at = h * kv_total;
        for s in 0..seqs.count() {
            let (n, nk) = (seqs.lengths[s], seqs.kv_len(s));
            out.extend_from_slice(&full[(kv_at + nk - n) * width..(kv_at + nk) * width]);
            kv_at += nk;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pad_and_take_back_are_inverse() {
        let shape = Shape::cross(2, 3, 2, 5, 4).with_kv_heads(1);
        let x: Vec<u32> = (1..=(shape.elements() as u32)).collect();
        let full = pad_rows(&x, shape);
        assert_eq!(full.len(), full_shape(shape).elements());
        assert!(full[..3 * 4].iter().all(|&v| v == 0), "padding rows first");
        assert_eq!(&full[3 * 4..5 * 4], &x[..2 * 4]);
        assert_eq!(last_rows(&full, shape, 4), x);
        let lse: Vec<u32> = (0..full_shape(shape).rows() as u32).collect();
        assert_eq!(
            last_rows(&lse, shape, 1),
            vec![3, 4, 8, 9, 13, 14, 18, 19, 23, 24, 28, 29]
        );
    }

    #[test]
    fn varlen_padding_places_each_sequence_at_its_keys_end() {
        let seqs = Sequences::packed_cross(vec![1, 2, 0], vec![3, 2, 4]).unwrap();
        let x = [1u32, 2, 3, 4, 5, 6]; // 2 heads, 3 query rows, width 1
        let full = pad_rows_varlen(&x, &seqs, 2, 1);
        assert_eq!(
            full,
            vec![0, 0, 1, 2, 3, 0, 0, 0, 0, 0, 0, 4, 5, 6, 0, 0, 0, 0]
        );
        assert_eq!(last_rows_varlen(&full, &seqs, 2, 1), x);
        let causal = FmaConfig::new(4, 2).causal(true);
        assert!(check_fma_cross_varlen(&seqs, &causal).unwrap());
        assert!(check_fma_cross_varlen(&seqs, &FmaConfig::new(4, 2)).is_err());
        let short = Sequences::packed_cross(vec![3], vec![2]).unwrap();
        let e = check_fma_cross_varlen(&short, &causal).unwrap_err();
        assert!(
            e.to_string().contains("sequence 0: 3 queries, 2 keys"),
            "{e}"
        );
    }

    #[test]
    fn only_causal_fine_1d_longer_keys_run() {
        let causal = FmaConfig::new(4, 2).causal(true);
        assert!(!check_fma_cross(Shape::new(1, 1, 8, 4), &causal).unwrap());
        assert!(check_fma_cross(Shape::cross(1, 1, 3, 8, 4), &causal).unwrap());
        for (shape, cfg) in [
            (Shape::cross(1, 1, 8, 3, 4), causal.clone()),
            (Shape::cross(1, 1, 3, 8, 4), FmaConfig::new(4, 2)),
            (
                Shape::cross(1, 1, 3, 8, 4),
                FmaConfig::new(4, 2).queries(Queries::Coarse),
            ),
        ] {
            let e = check_fma_cross(shape, &cfg).unwrap_err();
            assert!(
                e.to_string().contains("dense attention takes any lengths"),
                "{e}"
            );
        }
    }
}
