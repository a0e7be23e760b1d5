//! A float tensor as read from a .npy file: its shape and its values in row-major order, kept
//! in the file's own precision until the caller decides (f32 for the GPU, f64 for the reference).

use crate::error::{CliError, CliResult};
use ndarray::ArrayD;

/// The values of a tensor, in the dtype they were stored with.
#[derive(Clone, Debug)]
pub enum Data {
    /// float32 values.
    F32(Vec<f32>),
    /// float64 values.
    F64(Vec<f64>),
}

/// A tensor: shape and row-major (C order) values.
#[derive(Clone, Debug)]
pub struct Tensor {
    /// The shape, as in the file.
    pub shape: Vec<usize>,
    /// The values, row-major.
    pub data: Data,
}

/// Values of `a` in row-major order, whatever its memory layout (.npy allows Fortran order).
fn row_major<T: Clone>(a: ArrayD<T>) -> Vec<T> {
    if a.is_standard_layout() {
        // Freshly read arrays start at offset 0, so the raw vector is exactly the row-major data.
        a.into_raw_vec_and_offset().0
    } else {
        a.iter().cloned().collect()
    }
}

impl Tensor {
    /// A tensor from an f32 array.
    pub fn from_f32(a: ArrayD<f32>) -> Self {
        Self {
            shape: a.shape().to_vec(),
            data: Data::F32(row_major(a)),
        }
    }

    /// A tensor from an f64 array.
    pub fn from_f64(a: ArrayD<f64>) -> Self {
        Self {
            shape: a.shape().to_vec(),
            data: Data::F64(row_major(a)),
        }
    }

    /// The numpy name of the stored dtype.
    pub fn dtype(&self) -> &'static str {
        match self.data {
            Data::F32(_) => "float32",
            Data::F64(_) => "float64",
        }
    }

    /// The values as f32. A finite f64 beyond the f32 range is an error (it would silently
    /// become infinity on the GPU); `src` names the tensor in the message.
    pub fn into_f32(self, src: &str) -> CliResult<Vec<f32>> {
        match self.data {
            Data::F32(v) => Ok(v),
            Data::F64(v) => {
                if let Some(i) = v
                    .iter()
                    .position(|x| x.is_finite() && !(*x as f32).is_finite())
                {
                    return Err(CliError::Input(format!(
                        "{src} holds {} at flat index {i}, which does not fit in float32 \
                         (the GPU computes in f32; --reference keeps f64)",
                        v[i]
                    )));
                }
                Ok(v.into_iter().map(|x| x as f32).collect())
            }
        }
    }

    /// The values as f64 (exact for both dtypes).
    pub fn into_f64(self) -> Vec<f64> {
        match self.data {
            Data::F32(v) => v.into_iter().map(f64::from).collect(),
            Data::F64(v) => v,
        }
    }
}

/// A shape as numpy prints it: `(64, 2, 128)`, `(5,)`, `()`.
pub fn fmt_shape(shape: &[usize]) -> String {
    match shape {
        [one] => format!("({one},)"),
        _ => {
            let parts: Vec<String> = shape.iter().map(ToString::to_string).collect();
            format!("({})", parts.join(", "))
        }
    }
}
