//! A variable-length batch of host tensors too large for one storage binding: its sequences
//! run in groups that fit (each group packed into tensors of its own), and a sequence too large
//! alone through the executor's ordinary forward, which splits it along its sequence; the
//! results are put back in the batch's layout (padding rows: O = 0, LSE = -inf).
//!
//! Training takes the same route ([`train_in_groups`] keeps what each group's training
//! forward saved, with its [`GroupLayout`]); its groups are those whose backward fits
//! ([`groups_that_fit`]), and [`backward_in_groups`] puts their gradients back
//! ([`GroupGradients`]): dQ, dK and dV row by row (sequences are disjoint: a copy, no sum), the
//! sums over heads and sequences (the sinks' and the learned weights' gradients) added in group
//! order. FMA's and dense attention's `backward_groups.rs` give them their executor's calls.

use crate::error::{FmaError, Result};
use crate::gpu::engine::front::{add_sums, reworded_limit};
use crate::gpu::engine::tensors::Output;
use crate::gradients::Gradients;
use crate::sequences::Sequences;
use crate::shape::Shape;

/// The bytes of the largest tensor of a packed run of sequences of these lengths.
pub(crate) type BytesOf<'a> = dyn Fn(&[usize]) -> u64 + 'a;

/// Where a group's sequences sit in its batch: their indices and their packed layout.
#[derive(Clone, Debug)]
pub(crate) struct GroupLayout {
    /// Indices of its sequences in the batch, in batch order.
    pub members: Vec<usize>,
    /// The group's sequences, packed.
    pub seqs: Sequences,
}

impl GroupLayout {
    /// The sequences `members` of `batch`, packed.
    fn new(batch: &Sequences, members: Vec<usize>) -> Result<Self> {
        let lengths = members.iter().map(|&s| batch.lengths[s]).collect();
        Ok(Self {
            seqs: Sequences::packed(lengths)?,
            members,
        })
    }

    /// Every row range `(batch row, group row, tokens)` of the group's sequences in `heads`
    /// heads: where row `group row` of the packed tensor comes from in the batch's.
    fn rows(&self, batch: &Sequences, heads: usize) -> Vec<(usize, usize, usize)> {
        let mut out = Vec::with_capacity(heads * self.members.len());
        for h in 0..heads {
            for (i, &s) in self.members.iter().enumerate() {
                let (stride, row) = batch.rows(heads, s);
                let (g_stride, g_row) = self.seqs.rows(heads, i);
                out.push((h * stride + row, h * g_stride + g_row, batch.lengths[s]));
            }
        }
        out
    }

    /// The group's rows of `x` (`heads` heads of width `d`, laid out as `batch`), packed.
    pub(crate) fn gather(&self, x: &[f32], batch: &Sequences, heads: usize, d: usize) -> Vec<f32> {
        let mut out = Vec::with_capacity(heads * self.seqs.total() * d);
        for (at, _, n) in self.rows(batch, heads) {
            out.extend_from_slice(&x[at * d..(at + n) * d]);
        }
        out
    }

    /// Writes the group's packed rows `src` (`heads` heads of width `d`) into `dst`, laid out
    /// as `batch`.
    pub(crate) fn scatter(
        &self,
        dst: &mut [f32],
        src: &[f32],
        batch: &Sequences,
        (heads, d): (usize, usize),
    ) {
        for (at, from, n) in self.rows(batch, heads) {
            dst[at * d..(at + n) * d].copy_from_slice(&src[from * d..(from + n) * d]);
        }
    }
}

/// Q, K, V of some sequences of a batch, packed, and where their rows came from.
pub(crate) struct Group {
    /// Its sequences: their indices in the batch and their packed layout.
    pub layout: GroupLayout,
    /// Its tensors' shape: `(1, heads, total, d)`, K/V with the batch's K/V heads.
    pub shape: Shape,
    pub q: Vec<f32>,
    pub k: Vec<f32>,
    pub v: Vec<f32>,
}

impl Group {
    /// The shape of the group's one sequence as a batch of one (`(1, heads, n, d)`): a group
    /// of one sequence runs through the executor's ordinary path, which splits a long one.
    pub(crate) fn one(&self) -> Shape {
        let s = self.shape;
        Shape::new(1, s.heads, s.seq, s.head_dim).with_kv_heads(s.kv_heads)
    }
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

/// Splits the non-empty sequences of `seqs`, in order, into groups each as long as `fits`
/// (a plan check of a packed group of these lengths: the backward's, for training) allows;
/// a sequence that does not fit alone is a group of one. `fits` is asked O(log) times per
/// group (doubling, then bisection: a group's tensors only grow with its sequences), so a
/// batch of many short sequences costs a few plans per group, not one per sequence. An
/// error other than a binding limit is returned as it is.
fn groups_that_fit(
    seqs: &Sequences,
    fits: impl Fn(&[usize]) -> Result<()>,
) -> Result<Vec<Vec<usize>>> {
    let live: Vec<usize> = (0..seqs.count()).filter(|&s| seqs.lengths[s] > 0).collect();
    let ok = |run: &[usize]| -> Result<bool> {
        let lens: Vec<usize> = run.iter().map(|&s| seqs.lengths[s]).collect();
        match fits(&lens) {
            Ok(()) => Ok(true),
            Err(FmaError::LimitExceeded { .. }) => Ok(false),
            Err(e) => Err(e),
        }
    };
    let mut out = Vec::new();
    let mut at = 0;
    while at < live.len() {
        let rest = &live[at..];
        // `lo` sequences are known to fit; more than `hi` are not tried.
        let mut lo = usize::from(ok(&rest[..1])?);
        if lo == 0 {
            out.push(vec![rest[0]]);
            at += 1;
            continue;
        }
        let mut hi = 2;
        while hi <= rest.len() && ok(&rest[..hi])? {
            lo = hi;
            hi *= 2;
        }
        // The first count known not to fit (or one past the end).
        let mut hi = hi.min(rest.len() + 1);
        while hi - lo > 1 {
            let mid = (lo + hi) / 2;
            if ok(&rest[..mid])? {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        out.push(rest[..lo].to_vec());
        at += lo;
    }
    Ok(out)
}

/// Runs the batch `seqs` of `shape` in groups under `cap` bytes per tensor (`bytes_of` the
/// largest tensor of a packed run of lengths): `run(group)` for each group and puts O (and the
/// LSE) back in the batch's layout.
pub(crate) async fn varlen_in_groups<F, Fut>(
    qkv: (&[f32], &[f32], &[f32]),
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
    let groups = runs(seqs, cap, bytes_of);
    let run = |g| {
        let part = run(g);
        async move { Ok((part.await?, ())) }
    };
    let (out, _) = in_groups(qkv, shape, seqs, want_lse, groups, run).await?;
    Ok(out)
}

/// Runs the batch `seqs` of `shape` in the groups `groups` (indices of its sequences, each
/// group in batch order): `run(group)` for each, O (and the LSE) put back in the batch's
/// layout, and what each run returns beside its output (a training group's saved forward)
/// kept with the group's layout, in group order.
async fn in_groups<T, F, Fut>(
    (q, k, v): (&[f32], &[f32], &[f32]),
    shape: Shape,
    seqs: &Sequences,
    want_lse: bool,
    groups: Vec<Vec<usize>>,
    mut run: F,
) -> Result<(Output, Vec<(GroupLayout, T)>)>
where
    F: FnMut(Group) -> Fut,
    Fut: std::future::Future<Output = Result<(Output, T)>>,
{
    let (heads, kv_heads, d) = (shape.heads, shape.kv_heads, shape.head_dim);
    let mut o = vec![0f32; shape.elements()];
    let mut lse = vec![f32::NEG_INFINITY; if want_lse { shape.rows() } else { 0 }];
    let mut kept = Vec::with_capacity(groups.len());
    for members in groups {
        let layout = GroupLayout::new(seqs, members)?;
        let group = Group {
            shape: layout.seqs.shape(heads, kv_heads, d),
            q: layout.gather(q, seqs, heads, d),
            k: layout.gather(k, seqs, kv_heads, d),
            v: layout.gather(v, seqs, kv_heads, d),
            layout: layout.clone(),
        };
        let (out, t) = run(group).await?;
        layout.scatter(&mut o, &out.o, seqs, (heads, d));
        if let (true, Some(l)) = (want_lse, &out.lse) {
            layout.scatter(&mut lse, l, seqs, (heads, 1));
        }
        kept.push((layout, t));
    }
    let out = Output {
        o,
        lse: want_lse.then_some(lse),
    };
    Ok((out, kept))
}

/// The gradients of a variable-length batch trained in groups, put back in the batch's layout:
/// dQ (Q's shape), dK and dV (K's shape) copied row by row from each group (0 on padding rows);
/// the sinks' and the learned weights' gradients added in group order, in f32: the same bits
/// run to run.
struct GroupGradients<'a> {
    shape: Shape,
    seqs: &'a Sequences,
    sum: Gradients<f32>,
}

impl<'a> GroupGradients<'a> {
    /// No group yet, for the batch `seqs` of `shape`.
    fn new(shape: Shape, seqs: &'a Sequences) -> Self {
        Self {
            shape,
            seqs,
            sum: Gradients {
                dq: vec![0.0; shape.elements()],
                dk: vec![0.0; shape.kv_elements()],
                dv: vec![0.0; shape.kv_elements()],
                weights: None,
                dsinks: None,
            },
        }
    }

    /// Adds the gradients `g` of the group `layout` (packed, as its training forward's).
    fn add(&mut self, layout: &GroupLayout, g: Gradients<f32>) {
        let (s, seqs) = (self.shape, self.seqs);
        let sum = &mut self.sum;
        layout.scatter(&mut sum.dq, &g.dq, seqs, (s.heads, s.head_dim));
        layout.scatter(&mut sum.dk, &g.dk, seqs, (s.kv_heads, s.head_dim));
        layout.scatter(&mut sum.dv, &g.dv, seqs, (s.kv_heads, s.head_dim));
        add_sums(sum, g);
    }

    /// The gradients of every group.
    fn finish(self) -> Gradients<f32> {
        self.sum
    }
}

/// A sequence of a batch trained alone (a group of one) whose training is refused for a
/// binding limit: the error says which sequence, so the caller knows what to shorten.
fn one_sequence_refused(e: FmaError, index: usize, tokens: usize) -> FmaError {
    let what = |what| {
        format!(
            "sequence {index} of the variable-length batch ({tokens} tokens), which is trained \
             alone since its tensors exceed one storage binding: {what}"
        )
    };
    reworded_limit(e, what, |advice| advice)
}

/// The training forward of the variable-length batch `seqs` of `shape` whose backward does not
/// fit one binding (FMA's and dense attention's `backward_groups.rs`): the groups are those
/// whose backward fits ([`groups_that_fit`] of `fits(shape, packed)`, the executor's plan check
/// of a packed batch of sequences); a sequence that trains alone is checked by `alone` (its
/// shape as a batch of one) before any group runs, an error naming it; then `train(group)`
/// runs each group. Returns O and the LSE in the batch's layout (padding rows: 0 and -inf)
/// and each group's saved forward with its layout, in group order.
pub(crate) async fn train_in_groups<T, Fits, Alone, F, Fut>(
    qkv: (&[f32], &[f32], &[f32]),
    shape: Shape,
    seqs: &Sequences,
    (fits, alone): (Fits, Alone),
    train: F,
) -> Result<(Output, Vec<(GroupLayout, T)>)>
where
    Fits: Fn(Shape, &Sequences) -> Result<()>,
    Alone: Fn(Shape) -> Result<()>,
    F: FnMut(Group) -> Fut,
    Fut: std::future::Future<Output = Result<(Output, T)>>,
{
    let (h, kvh, d) = (shape.heads, shape.kv_heads, shape.head_dim);
    let groups = groups_that_fit(seqs, |lens| {
        let packed = Sequences::packed(lens.to_vec())?;
        fits(packed.shape(h, kvh, d), &packed)
    })?;
    for g in groups.iter().filter(|g| g.len() == 1) {
        let n = seqs.lengths[g[0]];
        alone(Shape::new(1, h, n, d).with_kv_heads(kvh))
            .map_err(|e| one_sequence_refused(e, g[0], n))?;
    }
    in_groups(qkv, shape, seqs, true, groups, train).await
}

/// The backward of host dO (the batch `seqs`' layout, Q's shape) over the groups of a forward
/// of `shape` trained by [`train_in_groups`] (each group's layout and saved forward, in group
/// order): `backward(saved, dO)` of each group's packed rows of dO, the gradients put back in
/// the batch's layout and the sums added in group order ([`GroupGradients`]).
pub(crate) async fn backward_in_groups<'g, S: 'g, F, Fut>(
    shape: Shape,
    seqs: &Sequences,
    groups: impl IntoIterator<Item = (&'g GroupLayout, &'g S)>,
    dout: &[f32],
    mut backward: F,
) -> Result<Gradients<f32>>
where
    F: FnMut(&'g S, Vec<f32>) -> Fut,
    Fut: std::future::Future<Output = Result<Gradients<f32>>>,
{
    let mut sum = GroupGradients::new(shape, seqs);
    for (layout, saved) in groups {
        let dout = layout.gather(dout, seqs, shape.heads, shape.head_dim);
        sum.add(layout, backward(saved, dout).await?);
    }
    Ok(sum.finish())
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

    /// `fits` as a cap on the tokens of a group.
    fn cap(tokens: usize) -> impl Fn(&[usize]) -> Result<()> {
        move |lens: &[usize]| {
            let sum: usize = lens.iter().sum();
            if sum <= tokens {
                Ok(())
            } else {
                Err(FmaError::LimitExceeded {
                    what: "tokens".into(),
                    requested: sum as u64,
                    max: tokens as u64,
                    unit: "tokens",
                    advice: String::new(),
                })
            }
        }
    }

    #[test]
    fn groups_are_the_longest_runs_that_fit_and_skip_empty_sequences() {
        let seqs = Sequences::padded(50, vec![10, 0, 20, 50, 5, 5, 1, 1, 1, 40]).unwrap();
        assert_eq!(
            groups_that_fit(&seqs, cap(30)).unwrap(),
            vec![vec![0, 2], vec![3], vec![4, 5, 6, 7, 8], vec![9]]
        );
        // Everything fits: one group of the non-empty sequences.
        assert_eq!(
            groups_that_fit(&seqs, cap(1000)).unwrap(),
            vec![vec![0, 2, 3, 4, 5, 6, 7, 8, 9]]
        );
        // Ten thousand sequences of 1 token in groups of 64: the greedy answer, found with a
        // few checks per group.
        let many = Sequences::packed(vec![1; 10_000]).unwrap();
        let asked = std::cell::Cell::new(0);
        let counted = |lens: &[usize]| {
            asked.set(asked.get() + 1);
            cap(64)(lens)
        };
        let groups = groups_that_fit(&many, counted).unwrap();
        assert_eq!(groups.len(), 10_000usize.div_ceil(64));
        assert!(groups.iter().rev().skip(1).all(|g| g.len() == 64));
        assert!(asked.get() <= 20 * groups.len(), "{} checks", asked.get());
    }

    #[test]
    fn other_errors_than_a_limit_are_returned() {
        let seqs = Sequences::packed(vec![3, 4]).unwrap();
        let bad = |_: &[usize]| Err(FmaError::Weights("no".into()));
        assert!(matches!(
            groups_that_fit(&seqs, bad),
            Err(FmaError::Weights(_))
        ));
    }

    #[test]
    fn gather_and_scatter_invert_each_other_on_a_padded_batch() {
        // Two heads of width 2, rows of 4 tokens: sequences of 3, 0 and 4 tokens.
        let seqs = Sequences::padded(4, vec![3, 0, 4]).unwrap();
        let (heads, d) = (2, 2);
        let x: Vec<f32> = (0..seqs.shape(heads, heads, d).elements())
            .map(|i| i as f32)
            .collect();
        let layout = GroupLayout::new(&seqs, vec![0, 2]).unwrap();
        let packed = layout.gather(&x, &seqs, heads, d);
        assert_eq!(packed.len(), heads * 7 * d);
        // Head 0 of sequence 0 (batch row 0, head 0: elements 0..6), then of sequence 2.
        assert_eq!(&packed[..6], &[0.0, 1.0, 2.0, 3.0, 4.0, 5.0]);
        assert_eq!(packed[6], (2 * heads * 4 * d) as f32);
        let mut back = vec![f32::NAN; x.len()];
        layout.scatter(&mut back, &packed, &seqs, (heads, d));
        for (i, (&b, &a)) in back.iter().zip(&x).enumerate() {
            // Row i / d of the batch: its token within its padded row of 4.
            let (row, token) = ((i / d) / 4, (i / d) % 4);
            let seq = row / heads;
            let live = token < seqs.lengths[seq];
            assert_eq!(b.to_bits() == a.to_bits(), live, "element {i}");
        }
    }
}
