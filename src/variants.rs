//! The softmax variants models ship with (issue 30): logit softcapping, attention sinks and
//! sliding windows, in algorithm terms in `docs/variants.md`.

use crate::error::{FmaError, Result};
use crate::shape::Shape;

/// The softmax variants models ship with (issue 30). Default: none.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Variants {
    /// Logit softcap C > 0: every logit l (fine or coarse) becomes C tanh(l / C); FMA's count
    /// correction is added after the cap (Gemma 2).
    pub softcap: Option<f32>,
    /// Attention sinks, (heads,): one logit S_h per query head whose term exp(S_h) joins each
    /// row's softmax denominator and carries no value (gpt-oss).
    pub sinks: Option<Vec<f32>>,
    /// Sliding window: query i sees key j iff i - left <= j <= i + right (bottom-right aligned
    /// for cross-length inputs, as the causal mask).
    pub window: Option<Window>,
}

/// A sliding window: `left` keys before the query's position and `right` after it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Window {
    /// Keys before the query's own position (L >= 0).
    pub left: usize,
    /// Keys after the query's own position (R >= 0; 0 with the causal mask).
    pub right: usize,
}

/// Which of the caller's query heads a piece of its problem runs (a run of heads of tensors
/// over one storage binding, `gpu::engine::front::head_chunks`): the piece's problem `qh`
/// (its flat batch*heads index, from 0) is the caller's query head `(first + qh) mod heads`.
/// Only the sinks read it (each head has its own); the plan of a whole problem has
/// `first = 0` and the problem's own `heads`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct HeadSpan {
    /// Query heads per sequence of the caller's problem (the sinks' length).
    pub heads: usize,
    /// The caller's flat batch*heads index of the piece's first problem, reduced mod `heads`.
    pub first: usize,
}

impl HeadSpan {
    /// The whole problem of `shape`: its own heads from head 0.
    pub fn whole(shape: Shape) -> Self {
        Self {
            heads: shape.heads,
            first: 0,
        }
    }

    /// The run of the caller's problem `full` that starts at its flat batch*heads index
    /// `first`.
    pub fn run(full: Shape, first: usize) -> Self {
        Self {
            heads: full.heads,
            first: first % full.heads.max(1),
        }
    }
}

impl Variants {
    /// Checks the variants for `heads` query heads: the softcap C > 0 and finite, one finite
    /// sink per query head, and with the causal mask a window that looks no further right than
    /// the query itself (R = 0).
    pub fn validate(&self, heads: usize, causal: bool) -> Result<()> {
        if let Some(c) = self.softcap {
            if !(c.is_finite() && c > 0.0) {
                return Err(FmaError::InvalidConfig {
                    what: "softcap",
                    value: c.to_string(),
                    allowed: "a finite C > 0 (logits become C tanh(l / C))".into(),
                });
            }
        }
        if let Some(s) = &self.sinks {
            if s.len() != heads {
                return Err(FmaError::ShapeMismatch {
                    what: "sinks".into(),
                    expected: format!("({heads},): one logit per query head"),
                    got: format!("({},)", s.len()),
                });
            }
            if let Some(h) = s.iter().position(|x| !x.is_finite()) {
                return Err(FmaError::InvalidConfig {
                    what: "sinks",
                    value: format!("{} at head {h}", s[h]),
                    allowed: "finite sink logits".into(),
                });
            }
        }
        if let Some(w) = self.window {
            if causal && w.right != 0 {
                return Err(FmaError::InvalidConfig {
                    what: "window",
                    value: format!("({}, {})", w.left, w.right),
                    allowed: "with the causal mask the window's right extent R must be 0".into(),
                });
            }
        }
        Ok(())
    }

    /// dL/dS of the sinks from a forward's O and LSE and the loss's dO, all of `shape`'s rows
    /// ((batch, heads, seq), a variable-length batch's tensors as laid out): the sink of
    /// head h has weight P_i = exp(S_h - LSE_i) in row i's softmax and a zero value, so
    /// dS_h = -sum_i P_i D_i with D_i = dO_i . O_i, summed in f64 over its rows. A row with
    /// LSE = -inf (padding) adds nothing. `None` without sinks. `span` says which of the
    /// sinks' heads `shape`'s problems are ([`HeadSpan::whole`] unless a run of heads).
    pub fn sink_gradient(
        &self,
        shape: Shape,
        span: HeadSpan,
        o: &[f32],
        lse: &[f32],
        dout: &[f32],
    ) -> Option<Vec<f32>> {
        let sinks = self.sinks.as_ref()?;
        let (n, d) = (shape.seq.max(1), shape.head_dim);
        let mut ds = vec![0f64; sinks.len()];
        for (row, &l) in lse.iter().enumerate().take(shape.rows()) {
            if l == f32::NEG_INFINITY {
                continue;
            }
            let h = (span.first + row / n) % sinks.len();
            let at = row * d..(row + 1) * d;
            let delta: f64 = o[at.clone()]
                .iter()
                .zip(&dout[at])
                .map(|(&a, &b)| f64::from(a) * f64::from(b))
                .sum();
            ds[h] -= (f64::from(sinks[h]) - f64::from(l)).exp() * delta;
        }
        Some(ds.into_iter().map(|x| x as f32).collect())
    }

    /// No variant on: the plain softmax.
    pub fn is_plain(&self) -> bool {
        self.softcap.is_none() && self.sinks.is_none() && self.window.is_none()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validate_says_what_is_allowed() {
        assert!(Variants::default().validate(4, true).is_ok());
        assert!(Variants::default().is_plain());
        let cap = |c| Variants {
            softcap: Some(c),
            ..Variants::default()
        };
        assert!(cap(30.0).validate(1, false).is_ok());
        for bad in [0.0, -1.0, f32::NAN, f32::INFINITY] {
            assert!(cap(bad).validate(1, false).is_err(), "{bad}");
        }
        let sinks = |s: Vec<f32>| Variants {
            sinks: Some(s),
            ..Variants::default()
        };
        assert!(sinks(vec![0.5, -1.0]).validate(2, false).is_ok());
        assert!(sinks(vec![0.5]).validate(2, false).is_err());
        assert!(sinks(vec![0.5, f32::NAN]).validate(2, false).is_err());
        let window = |left, right| Variants {
            window: Some(Window { left, right }),
            ..Variants::default()
        };
        assert!(window(3, 2).validate(1, false).is_ok());
        assert!(window(3, 0).validate(1, true).is_ok());
        assert!(window(3, 1).validate(1, true).is_err());
        assert!(!window(0, 0).is_plain());
    }
}
