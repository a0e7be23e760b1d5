//! Reading float arrays out of an .npz archive, stored (`np.savez`) or deflate-compressed
//! (`np.savez_compressed`), with every size checked before anything is inflated or allocated:
//! the caller names the shape it expects, the member's .npy header is read first (a few hundred
//! bytes) and compared with it, and the member's declared size must be exactly that header plus
//! that data. A small compressed file claiming gigabytes is refused at its header.

use crate::error::{CliError, CliResult};
use crate::npy_io::{float_dtype, npy_error, FloatDtype};
use crate::tensor::{fmt_shape, Tensor};
use ndarray::ArrayD;
use ndarray_npy::npy::header::{Header, ReadHeaderError};
use ndarray_npy::{ReadNpyError, ReadNpyExt};
use std::collections::BTreeSet;
use std::fs::File;
use std::io::Read;
use std::path::Path;
use zip::result::ZipError;
use zip::ZipArchive;

/// An open .npz archive and the name it is reported under ("weights file W.npz").
pub struct Npz {
    zip: ZipArchive<File>,
    src: String,
}

impl Npz {
    /// Opens `path`; `src` names it in messages.
    pub fn open(path: &Path, src: String) -> CliResult<Self> {
        let file = File::open(path).map_err(|source| CliError::Open {
            what: "weights".into(),
            path: path.to_path_buf(),
            source,
        })?;
        let zip = ZipArchive::new(file).map_err(|e| bad_archive(&src, e))?;
        Ok(Self { zip, src })
    }

    /// The arrays' keys: member names without their `.npy` suffix.
    pub fn names(&self) -> BTreeSet<String> {
        self.zip
            .file_names()
            .map(|n| n.strip_suffix(".npy").unwrap_or(n).to_owned())
            .collect()
    }

    /// The member holding `key` (`key.npy`, or `key` as numpy's own reader also accepts).
    fn member(&self, key: &str) -> Option<String> {
        [format!("{key}.npy"), key.to_owned()]
            .into_iter()
            .find(|n| self.zip.index_for_name(n).is_some())
    }

    /// Reads `key`, a float32 or float64 array that must have shape `want`: its header is
    /// checked before its data is inflated, so a wrong or absurd declared shape costs nothing.
    pub fn read(&mut self, key: &str, want: &[usize]) -> CliResult<Tensor> {
        let name = format!("{key} in {}", self.src);
        let member = self
            .member(key)
            .ok_or_else(|| CliError::Input(format!("{} has no array {key}", self.src)))?;
        let (header, declared) = {
            let mut file = self
                .zip
                .by_name(&member)
                .map_err(|e| bad_archive(&self.src, e))?;
            let declared = file.size();
            let mut counted = CountingReader::new(&mut file);
            let header = Header::from_reader(&mut counted).map_err(|e| match e {
                ReadHeaderError::Io(e) => npy_error(&name, ReadNpyError::Io(e)),
                ReadHeaderError::Parse(e) => npy_error(&name, ReadNpyError::ParseHeader(e)),
            })?;
            (header, declared.checked_sub(counted.read))
        };
        if header.shape != want {
            return Err(CliError::Input(format!(
                "{}: {key} has shape {}, expected {}",
                self.src,
                fmt_shape(&header.shape),
                fmt_shape(want)
            )));
        }
        let elem = match float_dtype(&header.type_descriptor.to_string()) {
            Ok(FloatDtype::F32) => 4u64,
            Ok(FloatDtype::F64) => 8u64,
            Ok(FloatDtype::F16 { .. }) => {
                return Err(CliError::Input(format!(
                    "{name} is float16: weights must be float32 or float64"
                )))
            }
            Err(m) => return Err(CliError::Input(format!("{name} has {m}"))),
        };
        let data = want.iter().map(|&x| x as u64).product::<u64>() * elem;
        if declared != Some(data) {
            return Err(CliError::Input(format!(
                "{name}: the archive declares {} bytes of data after the .npy header, but shape {} \
                 of {elem}-byte floats is {data} bytes (a truncated or inconsistent archive)",
                declared.map_or("fewer".into(), |b| b.to_string()),
                fmt_shape(want)
            )));
        }
        // The header and size agree with `want`: only now is the member inflated.
        let file = self
            .zip
            .by_name(&member)
            .map_err(|e| bad_archive(&self.src, e))?;
        let read = if elem == 4 {
            ArrayD::<f32>::read_npy(file).map(Tensor::from_f32)
        } else {
            ArrayD::<f64>::read_npy(file).map(Tensor::from_f64)
        };
        read.map_err(|e| npy_error(&name, e))
    }
}

/// The error for an archive zip cannot read (not a zip, a compression method other than stored
/// and deflate, a damaged member).
fn bad_archive(src: &str, e: ZipError) -> CliError {
    CliError::Input(format!(
        "{src} is not a valid .npz archive (np.savez or np.savez_compressed): {e}"
    ))
}

/// Counts the bytes read through it (the length of an .npy header).
struct CountingReader<R> {
    inner: R,
    read: u64,
}

impl<R> CountingReader<R> {
    fn new(inner: R) -> Self {
        Self { inner, read: 0 }
    }
}

impl<R: Read> Read for CountingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.read += n as u64;
        Ok(n)
    }
}
