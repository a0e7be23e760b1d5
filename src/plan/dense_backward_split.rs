//! The dense backward of one head longer than a storage binding (issue 27): the head's queries
//! and keys are cut at the same boundaries into chunks, and the passes of the unsplit backward
//! ([`DenseBackwardPlan`]) run on (query chunk, key chunk) pairs, each pair a problem of its
//! own: a K/V head's `group` query heads' rows of the query chunk (Q, O, dO, the LSE and D)
//! against the K/V rows of the key chunk. Every gradient is summed by one invocation in a
//! fixed order, chunk after chunk, in device memory (no atomics):
//!
//! ```text
//!   D          per query chunk (rowsum(dO * O), beside the LSE)
//!   dK, dV     per key chunk k: query chunks q in order (causal: q >= k), each in parts
//!   dQ         per query chunk q: key chunks k in order (causal: k <= q), each in parts
//! ```
//!
//! A pair's first dispatch on an output writes it and every later one adds to it (the kernels'
//! `accumulate` flag; within a pair, as unsplit, a part after the first resumes). Causal: a
//! diagonal pair (q = k, equal lengths) is causal in its own rows (the kernels' bottom-right
//! mask of a square problem is the head's), an off-diagonal pair (k < q) sees every key: it
//! runs unmasked; pairs k > q see nothing and do not run.
//!
//! Parts are the unsplit backward's ([`DenseBackwardPlan::key_chunks`],
//! [`DenseBackwardPlan::query_chunks`], the loop limit) cut at the chunk boundaries. Chunks are
//! whole tiles of both passes; when a binding holds a multiple of the part length they are
//! one, so every sum is cut where the unsplit one is: dQ, dK, dV are then the unsplit bits.
//! Otherwise a chunk boundary inside a part adds one rounding per boundary (module
//! `tests/gpu/dense_backward_split.rs` bounds it).
//!
//! Pure arithmetic, unit-tested without a GPU; `gpu/dense/backward_split.rs` executes it.

use super::dense_backward::{chunks, DenseBackwardPlan};
use super::depth::{dense_backward, dense_delta, DispatchDepth};
use super::dispatch::Dispatch;
use super::limits::{KernelLimits, BINDING_BYTES};
use crate::error::{FmaError, Result};
use crate::shape::Shape;

/// One dispatch of a dK/dV or dQ pass of a [`DenseBackwardSplitPlan`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DenseBackwardStep {
    /// Index of the query chunk in [`DenseBackwardSplitPlan::chunks`].
    pub query: usize,
    /// Index of the key chunk.
    pub key: usize,
    /// Index of the pair's plan in [`DenseBackwardSplitPlan::plans`].
    pub plan: usize,
    /// The causal mask inside the pair (a diagonal pair of a causal head).
    pub causal: bool,
    /// The rows `lo..hi` this dispatch walks, relative to its chunk: queries of the query
    /// chunk (dK/dV) or keys of the key chunk (dQ).
    pub rows: (usize, usize),
    /// Add to the gradient an earlier pair left (`false`: the output's first pair writes it).
    pub accumulate: bool,
    /// The dispatch (the pair plan's `dkv` or `dq`).
    pub dispatch: Dispatch,
}

/// The plan of the dense backward over one K/V head split into chunks (module header).
#[derive(Clone, Debug)]
pub struct DenseBackwardSplitPlan {
    /// Tokens of the head.
    pub n: usize,
    /// Head dimension.
    pub d: usize,
    /// Query heads per K/V head: each pair binds all of them.
    pub group: usize,
    /// The causal mask.
    pub causal: bool,
    /// The chunks `lo..hi`, in order: the same boundaries for queries and keys.
    pub chunks: Vec<(usize, usize)>,
    /// The plans of the pairs' problems, (1, group, query chunk, key chunk, d) with one K/V
    /// head: one per distinct pair of chunk lengths.
    pub plans: Vec<DenseBackwardPlan>,
    /// Per query chunk, the plan whose `delta` computes its D (its diagonal pair's).
    pub delta: Vec<usize>,
    /// The dK/dV dispatches in execution order.
    pub dkv: Vec<DenseBackwardStep>,
    /// The dQ dispatches in execution order.
    pub dq: Vec<DenseBackwardStep>,
}

impl DenseBackwardSplitPlan {
    /// Plans the backward of a K/V head of `n` tokens of width `d` and its `group` query
    /// heads under `limits`, at most `max_keys` keys (dQ) and queries over the group (dK/dV)
    /// per dispatch (`None`: the unsplit plan's defaults).
    pub fn new(
        (n, d, group): (usize, usize, usize),
        causal: bool,
        limits: &KernelLimits,
        max_keys: Option<usize>,
    ) -> Result<Self> {
        let group = group.max(1);
        // The passes' tiles and parts do not depend on the length: a one-tile problem's.
        let probe = DenseBackwardPlan::new(pair_shape(group, 1, 1, d), limits)?;
        let part_keys = max_keys.unwrap_or_else(|| probe.keys_per_dispatch());
        let part_queries = max_keys.unwrap_or_else(|| probe.queries_per_dispatch());
        let (bq, bk) = (probe.dkv.spec.bk as usize, probe.dq.spec.bk as usize);
        let wg = probe.dq.spec.wg as usize;
        let key_parts = chunks(n, bk, part_keys);
        let query_parts = chunks(n, bq, part_queries / group);
        // Rows of a chunk: Q, O, dO, dQ of the group and its (LSE, D) each fit one binding.
        let per_row = group as u64 * (4 * d as u64).max(8);
        let max_rows = (limits.binding_bytes() / per_row) as usize;
        let tile = lcm(wg, lcm(bq, bk));
        let chunk = if n <= max_rows {
            n
        } else if max_rows >= tile {
            // Whole parts when they fit: cut where the unsplit sums are cut.
            let part = lcm(tile, lcm(length(&key_parts), length(&query_parts)));
            let unit = if part <= max_rows { part } else { tile };
            max_rows / unit * unit
        } else {
            return Err(FmaError::LimitExceeded {
                what: format!(
                    "the dense backward of a head split across bindings: one tile of {tile} \
                     rows of {group} query heads of head_dim {d}"
                ),
                requested: tile as u64 * per_row,
                max: limits.binding_bytes(),
                unit: BINDING_BYTES,
                advice: "allow larger storage bindings (max_binding), or use a smaller head_dim \
                         or fewer query heads per K/V head"
                    .into(),
            });
        };
        let cut: Vec<_> = (0..n.max(1))
            .step_by(chunk.max(1))
            .map(|lo| (lo, (lo + chunk).min(n)))
            .collect();
        let mut plan = Self {
            n,
            d,
            group,
            causal,
            chunks: cut.clone(),
            plans: Vec::new(),
            delta: Vec::new(),
            dkv: Vec::new(),
            dq: Vec::new(),
        };
        for qi in 0..cut.len() {
            let at = plan.plan_of(qi, qi, limits)?;
            plan.delta.push(at);
        }
        let sees = |q: usize, k: usize| !causal || k <= q;
        // dK, dV: per key chunk, its query chunks in order, each in the head's query parts.
        for ki in 0..cut.len() {
            let first = (0..cut.len()).find(|&q| sees(q, ki));
            for qi in (0..cut.len()).filter(|&q| sees(q, ki)) {
                let at = plan.plan_of(qi, ki, limits)?;
                for rows in within(&query_parts, cut[qi]) {
                    plan.dkv.push(DenseBackwardStep {
                        query: qi,
                        key: ki,
                        plan: at,
                        causal: causal && qi == ki,
                        rows,
                        accumulate: Some(qi) != first,
                        dispatch: plan.plans[at].dkv,
                    });
                }
            }
        }
        // dQ: per query chunk, its key chunks in order, each in the head's key parts.
        for qi in 0..cut.len() {
            for ki in (0..cut.len()).filter(|&k| sees(qi, k)) {
                let at = plan.plan_of(qi, ki, limits)?;
                for rows in within(&key_parts, cut[ki]) {
                    plan.dq.push(DenseBackwardStep {
                        query: qi,
                        key: ki,
                        plan: at,
                        causal: causal && qi == ki,
                        rows,
                        accumulate: ki > 0,
                        dispatch: plan.plans[at].dq,
                    });
                }
            }
        }
        Ok(plan)
    }

    /// The index in `plans` of the problem of query chunk `qi` against key chunk `ki` (made
    /// on first use).
    fn plan_of(&mut self, qi: usize, ki: usize, limits: &KernelLimits) -> Result<usize> {
        let len = |(lo, hi): (usize, usize)| hi - lo;
        let shape = pair_shape(
            self.group,
            len(self.chunks[qi]),
            len(self.chunks[ki]),
            self.d,
        );
        if let Some(at) = self.plans.iter().position(|p| p.forward.shape == shape) {
            return Ok(at);
        }
        self.plans.push(DenseBackwardPlan::new(shape, limits)?);
        Ok(self.plans.len() - 1)
    }

    /// Every dispatch of the backward of one K/V head in recording order (D per query chunk,
    /// the dK/dV steps, the dQ steps), with its depth: a step walks its rows (dK/dV: in each
    /// of the group's query heads), so no invocation's chain is longer than a part's.
    pub fn depths(&self) -> Vec<DispatchDepth> {
        let delta = self.delta.iter().enumerate().map(|(qi, &at)| {
            let (lo, hi) = self.chunks[qi];
            dense_delta(&self.plans[at].delta, (self.group * (hi - lo)) as u64)
        });
        let step = |s: &DenseBackwardStep, walked: usize, per: u64| {
            let depth = dense_backward(&s.dispatch, walked as u64, per);
            DispatchDepth {
                dispatch: s.dispatch,
                invocations: s.dispatch.spec.wg,
                serial_rows: depth.serial_rows,
                rows: depth.rows,
            }
        };
        let len = |s: &DenseBackwardStep| s.rows.1 - s.rows.0;
        delta
            .chain(self.dkv.iter().map(|s| step(s, self.group * len(s), 3)))
            .chain(self.dq.iter().map(|s| step(s, len(s), 2)))
            .collect()
    }
}

/// The problem of one pair: `group` query heads of `nq` rows against one K/V head of `nk`.
fn pair_shape(group: usize, nq: usize, nk: usize, d: usize) -> Shape {
    Shape::cross(1, group, nq, nk, d).with_kv_heads(1)
}

/// The length of the first of `parts` (all but the last are as long).
fn length(parts: &[(usize, usize)]) -> usize {
    parts.first().map_or(1, |&(lo, hi)| (hi - lo).max(1))
}

/// The parts of the head that fall in `chunk`, cut at its boundaries, relative to its start.
fn within(parts: &[(usize, usize)], (lo, hi): (usize, usize)) -> Vec<(usize, usize)> {
    let mut out: Vec<_> = parts
        .iter()
        .filter(|&&(a, b)| a < hi && b > lo)
        .map(|&(a, b)| (a.max(lo) - lo, b.min(hi) - lo))
        .collect();
    if out.is_empty() {
        // An empty chunk (n = 0): one dispatch that writes zeros.
        out.push((0, hi - lo));
    }
    out
}

fn lcm(a: usize, b: usize) -> usize {
    let gcd = |mut x: usize, mut y: usize| {
        while y != 0 {
            (x, y) = (y, x % y);
        }
        x
    };
    a / gcd(a, b) * b
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(binding: u64) -> KernelLimits {
        KernelLimits::lavapipe().capped(binding)
    }

    /// Every (query, key) pair the mask allows is walked once per output, in order.
    fn check_cover(plan: &DenseBackwardSplitPlan) {
        let m = plan.chunks.len();
        let sees = |q: usize, k: usize| !plan.causal || k <= q;
        for (steps, dkv) in [(&plan.dkv, true), (&plan.dq, false)] {
            // Per output chunk, its partner chunks in order, rows tiling each partner chunk.
            for out in 0..m {
                let mine: Vec<_> = steps
                    .iter()
                    .filter(|s| if dkv { s.key == out } else { s.query == out })
                    .collect();
                let mut expect = Vec::new();
                for other in 0..m {
                    let (q, k) = if dkv { (other, out) } else { (out, other) };
                    if sees(q, k) {
                        expect.push(other);
                    }
                }
                let partners: Vec<_> = mine
                    .iter()
                    .map(|s| if dkv { s.query } else { s.key })
                    .collect();
                let mut dedup = partners.clone();
                dedup.dedup();
                assert_eq!(dedup, expect);
                // Only the very first step writes.
                assert!(!mine[0].accumulate && mine[0].rows.0 == 0);
                for w in mine.windows(2) {
                    let other = |s: &DenseBackwardStep| if dkv { s.query } else { s.key };
                    if other(w[0]) == other(w[1]) {
                        assert_eq!(w[0].rows.1, w[1].rows.0);
                    } else {
                        assert!(w[1].accumulate && w[1].rows.0 == 0);
                        let (lo, hi) = plan.chunks[other(w[0])];
                        assert_eq!(w[0].rows.1, hi - lo);
                    }
                }
                for s in &mine {
                    assert_eq!(s.causal, plan.causal && s.query == s.key);
                    let p = &plan.plans[s.plan].forward.shape;
                    let len = |(lo, hi): (usize, usize)| hi - lo;
                    assert_eq!(
                        (p.seq, p.seq_kv),
                        (len(plan.chunks[s.query]), len(plan.chunks[s.key]))
                    );
                    assert_eq!(p.heads, plan.group);
                }
            }
        }
    }

    #[test]
    fn pairs_follow_the_mask_and_every_output_is_written_once_then_added_to() {
        // 32 KiB: 1024 rows of d = 8 for one query head, 512 for a group of 2.
        for (n, group, causal, chunks) in [
            (3001, 1, false, 3),
            (3001, 1, true, 3),
            (1025, 2, true, 3),
            (2000, 2, false, 4),
        ] {
            let plan = DenseBackwardSplitPlan::new((n, 8, group), causal, &limits(32 << 10), None)
                .unwrap();
            assert_eq!(plan.chunks.len(), chunks, "{n} {group}");
            assert_eq!(plan.chunks.last().unwrap().1, n);
            assert!(plan.chunks.iter().all(|&(lo, _)| lo % 64 == 0));
            check_cover(&plan);
            // Distinct pair shapes only: full/last x full/last.
            assert!(plan.plans.len() <= 4);
            assert_eq!(plan.delta.len(), chunks);
        }
    }

    #[test]
    fn chunks_of_whole_parts_cut_where_the_unsplit_backward_does() {
        // At most 128 keys per dispatch: parts of 128 keys; chunks of 1024 rows are 8 parts.
        let plan =
            DenseBackwardSplitPlan::new((3001, 8, 1), false, &limits(32 << 10), Some(128)).unwrap();
        assert_eq!(plan.chunks[0], (0, 1024));
        let unsplit = DenseBackwardPlan::new(Shape::new(1, 1, 3001, 8), &KernelLimits::lavapipe())
            .unwrap()
            .key_chunks(128);
        // The dQ steps of query chunk 0, as global key ranges: the unsplit ones.
        let global: Vec<_> = plan
            .dq
            .iter()
            .filter(|s| s.query == 0)
            .map(|s| {
                (
                    plan.chunks[s.key].0 + s.rows.0,
                    plan.chunks[s.key].0 + s.rows.1,
                )
            })
            .collect();
        assert_eq!(global, unsplit);
        check_cover(&plan);
    }

    #[test]
    fn depths_stay_within_a_part() {
        let plan =
            DenseBackwardSplitPlan::new((3001, 8, 2), true, &limits(32 << 10), Some(128)).unwrap();
        let all = plan.depths();
        assert_eq!(all.len(), plan.delta.len() + plan.dkv.len() + plan.dq.len());
        // dK/dV walks at most 128 queries over the group, dQ 128 keys, 3 and 2 rows a step.
        assert!(all.iter().all(|d| d.serial_rows <= 1 + 3 * 128), "{all:?}");
    }

    #[test]
    fn a_binding_below_one_tile_is_a_typed_error() {
        let e = DenseBackwardSplitPlan::new((100_000, 256, 4), false, &limits(32 << 10), None)
            .unwrap_err();
        assert!(matches!(e, FmaError::LimitExceeded { .. }), "{e}");
    }
}
