//! A variable-length batch of host tensors too large for one storage binding: its sequences
//! run in groups that fit (each group packed into tensors of its own), and a sequence too large
//! alone through the executor's ordinary forward, which splits it along its sequence; the
//! results are put back in the batch's layout (padding rows: O = 0, LSE = -inf).

use crate::error::Result;
use crate::gpu::engine::tensors::Output;
use crate::sequences::Sequences;
use crate::shape::Shape;

/// The bytes of the largest tensor of a packed run of sequences of these lengths.
pub(crate) type BytesOf<'a> = dyn Fn(&[usize]) -> u64 + 'a;

/// Q, K, V of some sequences of a batch, packed, and where their rows came from.
pub(crate) struct Group {
    /// The group's sequences, packed.
    pub seqs: Sequences,
    /// Its tensors' shape: `(1, heads, total, d)`, K/V with the batch's K/V heads.
    pub shape: Shape,
    pub q: Vec<f32>,
    pub k: Vec<f32>,
    pub v: Vec<f32>,
    /// Indices of its sequences in the batch.
    members: Vec<usize>,
}

/// Splits the sequences of `seqs` (non-empty ones, in order) into runs whose packed tensors
/// stay under `cap` bytes by `bytes_of(lengths)` (an estimate that only grows with the run); a
/// sequence over `cap` alone is a run of one.
fn runs(seqs: &Sequences, cap: u64, bytes_of: &BytesOf<'_>) -> Vec<Vec<usize>> {
    let mut out: Vec<Vec<usize>> = Vec::new();
    let mut current: Vec<usize> = Vec::new();
    for (s, &n) in seqs.lengths.iter().enumerate() {
        if n == 0 {
            continue;
        }
        let mut lens: Vec<usize> = current.iter().map(|&i| seqs.lengths[i]).collect();
        lens.push(n);
        if !current.is_empty() && bytes_of(&lens) > cap {
            out.push(std::mem::take(&mut current));
        }
        current.push(s);
    }
    if !current.is_empty() {
        out.push(current);
    }
    out
}

/// Gathers the rows of `members` of every head of `x` (`heads` heads, laid out as `seqs`) into
/// one packed tensor.
fn gather(x: &[f32], seqs: &Sequences, heads: usize, d: usize, members: &[usize]) -> Vec<f32> {
    let mut out = Vec::new();
    for h in 0..heads {
        for &s in members {
            let (stride, row) = seqs.rows(heads, s);
            let at = (h * stride + row) * d;
            out.extend_from_slice(&x[at..at + seqs.lengths[s] * d]);
        }
    }
    out
}

/// Runs the batch `seqs` of `shape` in groups under `cap` bytes per tensor (`bytes_of` the
/// largest tensor of a packed run of lengths): `run(group)` for each group and puts O (and the
/// LSE) back in the batch's layout.
pub(crate) async fn varlen_in_groups<F, Fut>(
    (q, k, v): (&[f32], &[f32], &[f32]),
    shape: Shape,
    seqs: &Sequences,
    want_lse: bool,
    (cap, bytes_of): (u64, &BytesOf<'_>),
    mut run: F,
) -> Result<Output>
where
    F: FnMut(Group) -> Fut,
    Fut: std::future::Future<Output = Result<Output>>,
{
    let (heads, kv_heads, d) = (shape.heads, shape.kv_heads, shape.head_dim);
    let mut o = vec![0f32; shape.elements()];
    let mut lse = vec![f32::NEG_INFINITY; if want_lse { shape.rows() } else { 0 }];
    for members in runs(seqs, cap, bytes_of) {
        let lengths: Vec<usize> = members.iter().map(|&s| seqs.lengths[s]).collect();
        let packed = Sequences::packed(lengths)?;
        let group = Group {
            shape: packed.shape(heads, kv_heads, d),
            q: gather(q, seqs, heads, d, &members),
            k: gather(k, seqs, kv_heads, d, &members),
            v: gather(v, seqs, kv_heads, d, &members),
            seqs: packed,
            members,
        };
        let (members, packed) = (group.members.clone(), group.seqs.clone());
        let out = run(group).await?;
        // Scatter back: sequence i of the group is sequence members[i] of the batch.
        for h in 0..heads {
            for (i, &s) in members.iter().enumerate() {
                let n = seqs.lengths[s];
                let (stride, row) = seqs.rows(heads, s);
                let (g_stride, g_row) = packed.rows(heads, i);
                let (dst, src) = (h * stride + row, h * g_stride + g_row);
                o[dst * d..(dst + n) * d].copy_from_slice(&out.o[src * d..(src + n) * d]);
                if let (true, Some(l)) = (want_lse, &out.lse) {
                    lse[dst..dst + n].copy_from_slice(&l[src..src + n]);
                }
            }
        }
    }
    Ok(Output {
        o,
        lse: want_lse.then_some(lse),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_stay_under_the_cap_and_a_long_sequence_is_alone() {
        let seqs = Sequences::padded(50, vec![10, 0, 20, 50, 5, 5]).unwrap();
        let bytes = |l: &[usize]| l.iter().sum::<usize>() as u64;
        assert_eq!(
            runs(&seqs, 30, &bytes),
            vec![vec![0, 2], vec![3], vec![4, 5]]
        );
    }
}
