//! The CLI's error type and how each error maps to an exit code.

use multipole_attn::FmaError;
use std::io;
use std::path::PathBuf;
use thiserror::Error;

/// Exit code for bad input: arguments, files, shapes, weights.
pub const EXIT_BAD_INPUT: u8 = 2;
/// Exit code for a GPU or runtime failure (no adapter, device lost, write failed, ...).
pub const EXIT_RUNTIME: u8 = 1;

/// Everything `multipole-attn` can fail with. Each message names the file or key at fault.
#[derive(Debug, Error)]
pub enum CliError {
    /// An error from the library (config, shapes, weights, GPU).
    #[error(transparent)]
    Fma(#[from] FmaError),
    /// An input file could not be opened or read.
    #[error("cannot read {what} file {}: {source}", path.display())]
    Open {
        /// Which input (Q, K, V, weights).
        what: String,
        /// The path given.
        path: PathBuf,
        /// What the OS said.
        source: io::Error,
    },
    /// The contents of an input are malformed: not .npy/.npz, truncated, wrong dtype or ndim,
    /// shapes that disagree, a missing key.
    #[error("{0}")]
    Input(String),
    /// An output file could not be written.
    #[error("cannot write {}: {message}", path.display())]
    Write {
        /// The output path.
        path: PathBuf,
        /// What went wrong.
        message: String,
        /// The I/O error kind, when there was one: decides bad path vs runtime failure.
        kind: Option<io::ErrorKind>,
    },
    /// `info` found no adapter.
    #[error("no adapter found")]
    NoAdapter,
    /// Something that should not happen with valid input (e.g. the GPU returned a wrong size).
    #[error("{0}")]
    Runtime(String),
}

impl CliError {
    /// The process exit code: 2 when the input is at fault, 1 when the GPU or the system is.
    pub fn exit_code(&self) -> u8 {
        match self {
            CliError::Fma(e) => match e {
                FmaError::ShapeMismatch { .. }
                | FmaError::InvalidConfig { .. }
                | FmaError::Weights(_)
                | FmaError::CausalCoarseQueries
                | FmaError::CausalGrid => EXIT_BAD_INPUT,
                // LimitExceeded: the input is valid, this adapter just cannot run it.
                _ => EXIT_RUNTIME,
            },
            CliError::Open { .. } | CliError::Input(_) => EXIT_BAD_INPUT,
            // A missing directory or a read-only path is the caller's argument; a full disk is not.
            CliError::Write { kind, .. } => match kind {
                Some(io::ErrorKind::NotFound | io::ErrorKind::PermissionDenied) => EXIT_BAD_INPUT,
                _ => EXIT_RUNTIME,
            },
            CliError::NoAdapter | CliError::Runtime(_) => EXIT_RUNTIME,
        }
    }
}

/// Shorthand for the CLI's results.
pub type CliResult<T> = std::result::Result<T, CliError>;
