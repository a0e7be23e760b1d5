//! The one closeness check of the project: is a computed tensor within tolerance of a reference?
//!
//! Every comparison of a GPU result (or an analytic gradient) with the f64 CPU reference uses the
//! bound of numpy's `isclose`, `|got - want| <= atol + rtol |want|`, with the reference on the
//! right so that the relative part scales with the trusted value. NaN is never close: an output
//! element a kernel forgot to write (the tests fill outputs with NaN first) must fail, and a
//! plain `err > bound` test would let it through because every comparison with NaN is false.
//!
//! Pure arithmetic on slices, no GPU types, so the native tests, the conformance suite of the
//! `doctor` command and the browser tests (wasm32) all share it.

/// Whether `got` is within `atol + rtol |want|` of `want`. False when either is NaN, and when
/// both are the same infinity (their difference is NaN: an overflow is never "close").
pub fn is_close(got: f64, want: f64, atol: f64, rtol: f64) -> bool {
    // Written as `<=` so that a NaN anywhere makes it false.
    (got - want).abs() <= atol + rtol * want.abs()
}

/// What [`closeness`] found: how many elements are outside the bound, the largest error and
/// where it is. Printed with `{:?}` in test failures.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Closeness {
    /// Elements not [`is_close`] to the reference (NaN counts), plus every element one slice
    /// has and the other lacks.
    pub violations: usize,
    /// The largest |got - want|; infinite when an error is NaN or an element is missing.
    pub max_abs: f64,
    /// Index of the first element with error `max_abs` (0 when every error is zero).
    pub worst_index: usize,
}

impl Closeness {
    /// True when no element is outside the bound (the lengths then agree too).
    pub fn passed(&self) -> bool {
        self.violations == 0
    }
}

/// Compares `got` (f32 from a GPU, or f64) with the reference `want` element by element under
/// [`is_close`]. Slices of different lengths do not panic: each element without a partner is a
/// violation with an infinite error, so a missing output (say, an LSE the GPU did not return)
/// fails like a wrong one.
pub fn closeness<T: Copy + Into<f64>>(got: &[T], want: &[f64], atol: f64, rtol: f64) -> Closeness {
    let mut c = Closeness {
        violations: 0,
        max_abs: 0.0,
        worst_index: 0,
    };
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let g: f64 = g.into();
        if !is_close(g, w, atol, rtol) {
            c.violations += 1;
        }
        // NaN ranks as the worst possible error.
        let err = match (g - w).abs() {
            e if e.is_nan() => f64::INFINITY,
            e => e,
        };
        if err > c.max_abs {
            c.max_abs = err;
            c.worst_index = i;
        }
    }
    let common = got.len().min(want.len());
    if got.len() != want.len() {
        c.violations += got.len().max(want.len()) - common;
        if c.max_abs < f64::INFINITY {
            c.max_abs = f64::INFINITY;
            c.worst_index = common;
        }
    }
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bound_is_absolute_plus_relative_to_the_reference() {
        assert!(is_close(1.0 + 1.5e-5, 1.0, 1e-5, 1e-5)); // bound 2e-5
        assert!(!is_close(1.0 + 2.5e-5, 1.0, 1e-5, 1e-5));
        // Relative to `want`, not to `got`.
        assert!(is_close(0.0, 100.0, 0.0, 1.0));
        assert!(!is_close(100.0, 0.0, 0.0, 1.0));
        // The bound itself is inside.
        assert!(is_close(0.5, 0.25, 0.25, 0.0));
    }

    #[test]
    fn nan_and_infinity_are_never_close() {
        assert!(!is_close(f64::NAN, 1.0, 1.0, 1.0));
        assert!(!is_close(1.0, f64::NAN, 1.0, 1.0));
        assert!(!is_close(f64::INFINITY, f64::INFINITY, 1.0, 1.0));
        assert!(!is_close(f64::INFINITY, 1.0, 1.0, 1.0));
    }

    #[test]
    fn closeness_counts_violations_and_finds_the_worst() {
        let want = [1.0, 2.0, 3.0, 4.0];
        let got = [1.0f32, 2.5, 3.0, 3.0];
        let c = closeness(&got, &want, 0.1, 0.0);
        assert_eq!(c.violations, 2);
        assert_eq!(c.max_abs, 1.0);
        assert_eq!(c.worst_index, 3);
        assert!(!c.passed());
        let ok = closeness(&want, &want, 0.0, 0.0);
        assert!(ok.passed());
        assert_eq!((ok.max_abs, ok.worst_index), (0.0, 0));
    }

    #[test]
    fn nan_is_a_violation_with_infinite_error() {
        let c = closeness(&[0.0f32, f32::NAN, 5.0], &[0.0, 0.0, 0.0], 1.0, 1.0);
        assert_eq!(c.violations, 2);
        assert_eq!(c.max_abs, f64::INFINITY);
        assert_eq!(c.worst_index, 1);
    }

    #[test]
    fn a_missing_element_is_a_violation() {
        let c = closeness::<f32>(&[], &[1.0, 2.0], 1.0, 1.0);
        assert_eq!(
            (c.violations, c.max_abs, c.worst_index),
            (2, f64::INFINITY, 0)
        );
        let c = closeness(&[1.0f64, 2.0, 3.0], &[1.0], 0.0, 0.0);
        assert_eq!((c.violations, c.worst_index), (2, 1));
    }
}
