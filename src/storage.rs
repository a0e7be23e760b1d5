//! The element type of the tensors a caller hands the GPU path: f32 (every adapter) or f16
//! (adapters with `SHADER_F16`; issue 29). Arithmetic and the softmax state are f32 either
//! way: f16 storage halves the bytes of Q, K, V and O, not the precision of the sums.

use crate::error::{FmaError, Result};

/// How Q, K, V and O are stored in GPU memory ([`crate::gpu::Attention::storage`]).
///
/// With [`Storage::F16`] the caller's resident buffers hold IEEE binary16 values (2 bytes per
/// element, same row-major layouts), host tensors are rounded to f16 on upload and O comes
/// back as f16 values widened to f32. The kernels load each element as f16, convert it to f32
/// and compute exactly as the f32 path does; O is rounded to f16 once when stored. The LSE and
/// every internal row (coarse keys, values and queries, partial outputs) stay f32.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Storage {
    /// 4-byte IEEE binary32: every adapter, the browser included.
    #[default]
    F32,
    /// 2-byte IEEE binary16: needs `wgpu::Features::SHADER_F16` on the device.
    F16,
}

impl Storage {
    /// Bytes of one element.
    pub const fn bytes(self) -> u64 {
        match self {
            Storage::F32 => 4,
            Storage::F16 => 2,
        }
    }

    /// The name the CLI and errors use: `f32` or `f16`.
    pub const fn name(self) -> &'static str {
        match self {
            Storage::F32 => "f32",
            Storage::F16 => "f16",
        }
    }

    /// The storage named `s` (`f32` or `f16`), or a typed error naming both.
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "f32" => Ok(Storage::F32),
            "f16" => Ok(Storage::F16),
            _ => Err(FmaError::InvalidConfig {
                what: "storage",
                value: s.into(),
                allowed: "f32 or f16".into(),
            }),
        }
    }
}

/// The relative rounding of one f16 store: 2^-11, half of f16's machine epsilon 2^-10.
pub const F16_UNIT_ROUNDOFF: f32 = 1.0 / 2048.0;

/// The largest finite f16, 65504: host values beyond it would become infinities.
pub const F16_MAX: f32 = 65504.0;

/// `x` rounded to the nearest f16 (ties to even), as raw bits. A finite value beyond
/// [`F16_MAX`] in magnitude is a typed error naming `name` and its index; NaN and infinities
/// pass through, as the f32 path passes them.
pub fn to_f16_bits(name: &str, x: &[f32]) -> Result<Vec<u16>> {
    x.iter()
        .enumerate()
        .map(|(i, &v)| {
            let h = half::f16::from_f32(v);
            if v.is_finite() && !h.is_finite() {
                return Err(beyond_range(name, i, v));
            }
            Ok(h.to_bits())
        })
        .collect()
}

/// Checks that no finite value of `x` becomes an infinity in f16 (what [`to_f16_bits`] refuses,
/// without making the bits): the GPU path's host calls under [`Storage::F16`] check their
/// tensors so, before anything is uploaded.
pub fn check_f16_range(name: &str, x: &[f32]) -> Result<()> {
    let beyond = |v: &f32| v.is_finite() && !half::f16::from_f32(*v).is_finite();
    match x.iter().position(beyond) {
        None => Ok(()),
        Some(i) => Err(beyond_range(name, i, x[i])),
    }
}

/// The error of `name[i] = v`, a finite value beyond f16's range.
fn beyond_range(name: &str, i: usize, v: f32) -> FmaError {
    FmaError::InvalidConfig {
        what: "f16 storage",
        value: format!("{name}[{i}] = {v}, beyond f16's range"),
        allowed: format!("values of magnitude at most {F16_MAX} (or Storage::F32 for larger ones)"),
    }
}

/// f16 bits widened to f32 (exact).
pub fn from_f16_bits(bits: &[u16]) -> Vec<f32> {
    bits.iter()
        .map(|&b| half::f16::from_bits(b).to_f32())
        .collect()
}

/// `x` rounded to f16 and back: what an f16 tensor holds of it (for references and tests).
/// Values beyond f16's range become infinities.
pub fn round_to_f16(x: &[f32]) -> Vec<f32> {
    x.iter().map(|&v| half::f16::from_f32(v).to_f32()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounding_and_range() {
        assert_eq!(
            to_f16_bits("q", &[1.0, -2.0]).unwrap(),
            vec![0x3c00, 0xc000]
        );
        assert_eq!(from_f16_bits(&[0x3c00, 0x7bff]), vec![1.0, 65504.0]);
        let err = to_f16_bits("k", &[0.0, 1.0e6]).unwrap_err().to_string();
        assert!(err.contains("k[1]") && err.contains("65504"), "{err}");
        // The check alone: 65519 rounds to 65504 (finite), 65520 to infinity.
        assert!(check_f16_range("k", &[65519.0, -65519.0, f32::INFINITY]).is_ok());
        let err = check_f16_range("v", &[1.0, 65519.0, -65520.0]).unwrap_err();
        assert!(err.to_string().contains("v[2]"), "{err}");
        // Non-finite values travel as they are.
        let b = to_f16_bits("v", &[f32::INFINITY, f32::NAN]).unwrap();
        assert!(from_f16_bits(&b)[0].is_infinite() && from_f16_bits(&b)[1].is_nan());
        // 1 + 2^-11 is a tie: it rounds to even (1); 1 + 3 * 2^-11 rounds up.
        assert_eq!(round_to_f16(&[1.0 + F16_UNIT_ROUNDOFF])[0], 1.0);
        assert_eq!(Storage::parse("f16").unwrap(), Storage::F16);
        assert!(Storage::parse("bf16").is_err());
    }
}
