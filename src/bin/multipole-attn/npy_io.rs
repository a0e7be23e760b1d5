//! Reading float16/float32/float64 .npy files into [`Tensor`]s and writing results, with error
//! messages that say what is wrong with the file (truncated, wrong dtype, not .npy at all).

use crate::error::{CliError, CliResult};
use crate::tensor::{fmt_shape, Tensor};
use ndarray::{ArrayD, IxDyn, ShapeBuilder};
use ndarray_npy::npy::header::{Header, ReadHeaderError};
use ndarray_npy::{write_npy, ReadNpyError, ReadNpyExt, WritableElement, WriteNpyError};
use std::fs::File;
use std::io::{self, BufReader, Seek};
use std::path::Path;

/// The float dtypes the CLI accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FloatDtype {
    /// float16, '<f2' or '>f2': decoded to float32 on load (exactly: every f16 is an f32).
    F16 { big_endian: bool },
    /// float32, '<f4' or '>f4'.
    F32,
    /// float64, '<f8' or '>f8'.
    F64,
}

impl FloatDtype {
    /// Bytes per element.
    fn size(self) -> usize {
        match self {
            FloatDtype::F16 { .. } => 2,
            FloatDtype::F32 => 4,
            FloatDtype::F64 => 8,
        }
    }

    /// The numpy name.
    fn name(self) -> &'static str {
        match self {
            FloatDtype::F16 { .. } => "float16",
            FloatDtype::F32 => "float32",
            FloatDtype::F64 => "float64",
        }
    }
}

/// The float dtype of an .npy type descriptor (as the header's Python literal prints, e.g.
/// `'<f4'`), or an error message naming the dtype that was found instead.
pub fn float_dtype(descriptor: &str) -> Result<FloatDtype, String> {
    let d = descriptor.trim_matches('\'');
    // ndarray-npy reads the f4 and f8 ones, `read_f16` the f2 ones; native-order '=' is never
    // written by numpy.
    match d {
        "<f2" => return Ok(FloatDtype::F16 { big_endian: false }),
        ">f2" => return Ok(FloatDtype::F16 { big_endian: true }),
        "<f4" | ">f4" => return Ok(FloatDtype::F32),
        "<f8" | ">f8" => return Ok(FloatDtype::F64),
        _ => {}
    }
    let mut chars = d.chars();
    let (order, kind) = (chars.next(), chars.next());
    let bytes: Option<usize> = chars.as_str().parse().ok();
    let name = match (order, kind, bytes) {
        (Some('<' | '>' | '|' | '='), Some(kind), Some(bytes)) => match kind {
            'i' => format!("int{}", bytes * 8),
            'u' => format!("uint{}", bytes * 8),
            'f' => format!("float{}", bytes * 8),
            'c' => format!("complex{}", bytes * 8),
            'b' => "bool".to_string(),
            _ => descriptor.to_string(),
        },
        _ => descriptor.to_string(),
    };
    Err(format!(
        "dtype {name} ({descriptor}); only float16, float32 and float64 are supported \
         (convert with numpy's .astype(np.float32); bfloat16 has no numpy dtype: save it as float32)"
    ))
}

/// A friendly message for an ndarray-npy read error of the array called `src`.
pub fn npy_error(src: &str, err: ReadNpyError) -> CliError {
    let msg = match err {
        ReadNpyError::Io(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
            format!("{src} is truncated: it ends inside its .npy header")
        }
        ReadNpyError::Io(e) => format!("I/O error reading {src}: {e}"),
        ReadNpyError::ParseHeader(e) => format!("{src} is not a valid .npy array: {e}"),
        ReadNpyError::WrongDescriptor(d) => match float_dtype(&d.to_string()) {
            Err(m) => format!("{src} has {m}"),
            Ok(_) => format!("{src} has an unexpected dtype {d}"),
        },
        ReadNpyError::MissingData => {
            format!("{src} is truncated: it ends before all the data its header promises")
        }
        ReadNpyError::ExtraBytes(n) => {
            format!("{src} has {n} bytes after the data its header describes")
        }
        ReadNpyError::LengthOverflow => format!("{src} has a header shape too large to hold"),
        other => format!("cannot read {src}: {other}"),
    };
    CliError::Input(msg)
}

/// Reads a float16, float32 or float64 .npy file (float16 becomes float32). `what` names the input in messages ("Q", "K", ...).
///
/// The header is checked against the file size before the data is read, so a truncated or
/// corrupt file gives a message with byte counts instead of a huge allocation.
pub fn read_tensor(path: &Path, what: &str) -> CliResult<Tensor> {
    let (mut reader, header, dtype, src) = open_npy(path, what)?;
    let open_err = |source: io::Error| CliError::Open {
        what: what.to_string(),
        path: path.to_path_buf(),
        source,
    };
    match dtype {
        FloatDtype::F16 { big_endian } => read_f16(
            &mut reader,
            &header.shape,
            big_endian,
            header.layout.is_fortran(),
        )
        .map_err(|e| npy_error(&src, ReadNpyError::Io(e))),
        FloatDtype::F32 => {
            reader.rewind().map_err(open_err)?;
            ArrayD::<f32>::read_npy(&mut reader)
                .map(Tensor::from_f32)
                .map_err(|e| npy_error(&src, e))
        }
        FloatDtype::F64 => {
            reader.rewind().map_err(open_err)?;
            ArrayD::<f64>::read_npy(&mut reader)
                .map(Tensor::from_f64)
                .map_err(|e| npy_error(&src, e))
        }
    }
}

/// The shape of an .npy file, from its header alone (the header is checked as
/// [`read_tensor`] checks it, the data is not read): lets a command check the problem against
/// the adapter before it reads gigabytes.
pub fn read_shape(path: &Path, what: &str) -> CliResult<Vec<usize>> {
    open_npy(path, what).map(|(_, header, _, _)| header.shape)
}

/// Opens an .npy file and reads its header: the reader just past the header, the header,
/// its float dtype, and the name of the file for messages. Checks the dtype and that exactly
/// the data the header promises follows it.
fn open_npy(path: &Path, what: &str) -> CliResult<(BufReader<File>, Header, FloatDtype, String)> {
    let src = format!("{what} file {}", path.display());
    let open_err = |source: io::Error| CliError::Open {
        what: what.to_string(),
        path: path.to_path_buf(),
        source,
    };
    let file = File::open(path).map_err(open_err)?;
    let file_len = file.metadata().map_err(open_err)?.len();
    if file_len == 0 {
        return Err(CliError::Input(format!("{src} is empty (0 bytes)")));
    }
    let mut reader = BufReader::new(file);
    let header = Header::from_reader(&mut reader).map_err(|e| match e {
        ReadHeaderError::Io(e) => npy_error(&src, ReadNpyError::Io(e)),
        ReadHeaderError::Parse(e) => npy_error(&src, ReadNpyError::ParseHeader(e)),
    })?;
    let data_start = reader.stream_position().map_err(open_err)?;
    let dtype = float_dtype(&header.type_descriptor.to_string())
        .map_err(|m| CliError::Input(format!("{src} has {m}")))?;
    check_data_size(
        &src,
        &header.shape,
        dtype,
        file_len.saturating_sub(data_start),
    )?;
    Ok((reader, header, dtype, src))
}

/// The float16 data after an .npy header (its size already checked), as an f32 tensor: the
/// conversion is exact (f16's values are a subset of f32's), so the result is the one a
/// float32 file holding the same values gives.
fn read_f16(
    reader: &mut impl io::Read,
    shape: &[usize],
    big_endian: bool,
    fortran_order: bool,
) -> io::Result<Tensor> {
    let count: usize = shape.iter().product();
    let mut bytes = vec![0u8; count * 2];
    reader.read_exact(&mut bytes)?;
    let values: Vec<f32> = bytes
        .chunks_exact(2)
        .map(|b| {
            let pair = [b[0], b[1]];
            let h = if big_endian {
                half::f16::from_be_bytes(pair)
            } else {
                half::f16::from_le_bytes(pair)
            };
            h.to_f32()
        })
        .collect();
    let array = if fortran_order {
        ArrayD::from_shape_vec(IxDyn(shape).f(), values)
    } else {
        ArrayD::from_shape_vec(IxDyn(shape), values)
    }
    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
    Ok(Tensor::from_f32(array))
}

/// Checks that exactly the bytes the header's shape and dtype need follow the header.
fn check_data_size(src: &str, shape: &[usize], dtype: FloatDtype, have: u64) -> CliResult<()> {
    let need = shape
        .iter()
        .try_fold(dtype.size() as u64, |acc, &s| acc.checked_mul(s as u64));
    let shape_s = fmt_shape(shape);
    match need {
        None => Err(CliError::Input(format!(
            "{src} has a header shape {shape_s} too large to hold"
        ))),
        Some(need) if have < need => Err(CliError::Input(format!(
            "{src} is truncated: its header promises {} {shape_s} = {need} bytes of data, \
             but only {have} bytes follow the header",
            dtype.name()
        ))),
        Some(need) if have > need => Err(CliError::Input(format!(
            "{src} has {} bytes after the {need} bytes of data its header describes \
             ({} {shape_s}); is it a valid .npy file?",
            have - need,
            dtype.name()
        ))),
        Some(_) => Ok(()),
    }
}

/// Fails early (before any long computation) when `path` cannot be an output file:
/// its directory does not exist or it is itself a directory.
pub fn check_output_path(path: &Path) -> CliResult<()> {
    let not_found = |message: String| CliError::Write {
        path: path.to_path_buf(),
        message,
        kind: Some(io::ErrorKind::NotFound),
    };
    if path.is_dir() {
        return Err(not_found("it is a directory".into()));
    }
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() && !dir.is_dir() => Err(not_found(format!(
            "directory {} does not exist",
            dir.display()
        ))),
        _ => Ok(()),
    }
}

/// Writes `data` (row-major) as an .npy array of shape `shape`.
pub fn write_array<A: WritableElement>(
    path: &Path,
    shape: &[usize],
    data: Vec<A>,
) -> CliResult<()> {
    let len = data.len();
    let arr = ArrayD::from_shape_vec(IxDyn(shape), data).map_err(|_| {
        CliError::Runtime(format!(
            "internal error: {len} values do not fill the output shape {}",
            fmt_shape(shape)
        ))
    })?;
    write_npy(path, &arr).map_err(|e| {
        let kind = match &e {
            WriteNpyError::Io(io) => Some(io.kind()),
            _ => None,
        };
        CliError::Write {
            path: path.to_path_buf(),
            message: e.to_string(),
            kind,
        }
    })
}

/// The .npy (format 1.0) header of a little-endian float16 C-order array of `shape`: the magic,
/// the version, the header's length and the dict, padded with spaces to a multiple of 64 bytes
/// and ended by a newline, as numpy writes it.
fn f16_header(shape: &[usize]) -> Vec<u8> {
    let dims = match shape {
        [n] => format!("({n},)"),
        _ => format!(
            "({})",
            shape
                .iter()
                .map(|d| d.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    let mut dict = format!("{{'descr': '<f2', 'fortran_order': False, 'shape': {dims}, }}");
    // 6 magic + 2 version + 2 length bytes, then the dict and its newline.
    while (10 + dict.len() + 1) % 64 != 0 {
        dict.push(' ');
    }
    dict.push('\n');
    let mut out = b"\x93NUMPY\x01\x00".to_vec();
    out.extend_from_slice(&(dict.len() as u16).to_le_bytes());
    out.extend_from_slice(dict.as_bytes());
    out
}

/// The .npy bytes of `data` (row-major, values already f16, as f16 storage returns them) as
/// a float16 array of shape `shape`: each value rounded to f16 (exact for f16 values).
fn f16_npy(shape: &[usize], data: &[f32]) -> CliResult<Vec<u8>> {
    if data.len() != shape.iter().product::<usize>() {
        return Err(CliError::Runtime(format!(
            "internal error: {} values do not fill the output shape {}",
            data.len(),
            fmt_shape(shape)
        )));
    }
    let mut bytes = f16_header(shape);
    bytes.reserve(2 * data.len());
    for &x in data {
        bytes.extend_from_slice(&half::f16::from_f32(x).to_le_bytes());
    }
    Ok(bytes)
}

fn write_failed(path: &Path, e: impl std::fmt::Display, kind: Option<io::ErrorKind>) -> CliError {
    CliError::Write {
        path: path.to_path_buf(),
        message: e.to_string(),
        kind,
    }
}

/// Writes `data` as a float16 .npy array of shape `shape` ([`f16_npy`]).
pub fn write_f16(path: &Path, shape: &[usize], data: &[f32]) -> CliResult<()> {
    let bytes = f16_npy(shape, data)?;
    std::fs::write(path, bytes).map_err(|e| write_failed(path, &e, Some(e.kind())))
}

/// Writes the float16 arrays `(name, shape, data)` as an .npz archive (stored, as
/// `np.savez` writes it: one `name.npy` entry each).
pub fn write_f16_npz(path: &Path, arrays: &[(&str, &[usize], &[f32])]) -> CliResult<()> {
    use std::io::Write;
    let file = File::create(path).map_err(|e| write_failed(path, &e, Some(e.kind())))?;
    let mut zip = zip::ZipWriter::new(file);
    let options =
        zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    for (name, shape, data) in arrays {
        let bytes = f16_npy(shape, data)?;
        zip.start_file(format!("{name}.npy"), options)
            .map_err(|e| write_failed(path, e, None))?;
        zip.write_all(&bytes)
            .map_err(|e| write_failed(path, &e, Some(e.kind())))?;
    }
    zip.finish().map_err(|e| write_failed(path, e, None))?;
    Ok(())
}
