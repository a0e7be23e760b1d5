//! The softmax variants of issue 30 (`crate::Variants`) as the reference applies them, one
//! helper per rule, so the forward and backward references read them from one place
//! (`docs/variants.md`). CPU mirror of `shaders/shared/variants.wgsl`.

use crate::variants::{Variants, Window};

/// The variants in f64: the softcap C, the sink logits per query head, the window.
#[derive(Clone, Debug, Default)]
pub(crate) struct RowRules {
    cap: Option<f64>,
    sinks: Option<Vec<f64>>,
    window: Option<Window>,
}

impl RowRules {
    pub(crate) fn new(v: &Variants) -> Self {
        Self {
            cap: v.softcap.map(f64::from),
            sinks: v
                .sinks
                .as_ref()
                .map(|s| s.iter().map(|&x| f64::from(x)).collect()),
            window: v.window,
        }
    }

    /// The logit of a raw score l = q . k / sqrt(d): C tanh(l / C) under the softcap.
    pub(crate) fn logit(&self, raw: f64) -> f64 {
        match self.cap {
            Some(c) => c * (raw / c).tanh(),
            None => raw,
        }
    }

    /// d logit / d raw: 1 - tanh^2(l / C) under the softcap, else 1.
    pub(crate) fn slope(&self, raw: f64) -> f64 {
        match self.cap {
            Some(c) => {
                let t = (raw / c).tanh();
                1.0 - t * t
            }
            None => 1.0,
        }
    }

    /// The sink logit of query head `head` (of the sequence's heads), if sinks are on.
    pub(crate) fn sink(&self, head: usize) -> Option<f64> {
        self.sinks.as_ref().map(|s| s[head])
    }

    /// Whether key position `t` lies in the window of a query at key position `pos`
    /// (i - L <= t <= i + R; `pos` may be negative for cross-length causal queries).
    pub(crate) fn sees(&self, pos: i64, t: usize) -> bool {
        match self.window {
            Some(w) => {
                // Saturating: a window beyond i64 (from user input) is unbounded, not negative.
                let wide = |x: usize| i64::try_from(x).unwrap_or(i64::MAX);
                let t = t as i64;
                pos.saturating_sub(wide(w.left)) <= t && t <= pos.saturating_add(wide(w.right))
            }
            None => true,
        }
    }

    /// Whether a window is on.
    pub(crate) fn windowed(&self) -> bool {
        self.window.is_some()
    }
}

/// One softmax over `(logit, value row)` pairs and an optional sink logit whose term joins the
/// denominator with no value: writes the weighted mean into `out` and returns the log-sum-exp
/// (the sink's term included). A row with neither a key nor a sink gets O = 0, LSE = -inf.
pub(crate) fn softmax_row_sink<'a>(
    keys: impl Iterator<Item = (f64, &'a [f64])> + Clone,
    sink: Option<f64>,
    out: &mut [f64],
) -> f64 {
    let max = keys
        .clone()
        .map(|(s, _)| s)
        .chain(sink)
        .fold(f64::NEG_INFINITY, f64::max);
    out.iter_mut().for_each(|o| *o = 0.0);
    if max == f64::NEG_INFINITY && sink.is_none() && keys.clone().next().is_none() {
        return max;
    }
    let mut z = sink.map_or(0.0, |s| (s - max).exp());
    for (s, val) in keys {
        let e = (s - max).exp();
        z += e;
        for (o, x) in out.iter_mut().zip(val) {
            *o += e * x;
        }
    }
    out.iter_mut().for_each(|o| *o /= z);
    max + z.ln()
}
