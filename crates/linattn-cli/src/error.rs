//! Everything the command can fail with, as values. `main` prints the message on one
//! line and exits with [`CliError::EXIT_CODE`].

use std::io;
use std::path::PathBuf;

/// A failure of the `linattn` command; every one is the user's to fix (a file, an option,
/// a shape), so all share one exit code.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// A file could not be opened or read.
    #[error("cannot read {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// What the system said.
        source: io::Error,
    },
    /// A file could not be created or written.
    #[error("cannot write {}: {source}", path.display())]
    Write {
        /// The file.
        path: PathBuf,
        /// What the system said.
        source: io::Error,
    },
    /// The file is not a well-formed .npy file.
    #[error("{} is not a valid .npy file: {problem}", path.display())]
    MalformedNpy {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        problem: String,
    },
    /// The array's element type is not float32 or float64.
    #[error(
        "{} has unsupported dtype {descr}; linattn reads float32 ('<f4') and float64 ('<f8') arrays",
        path.display()
    )]
    UnsupportedDtype {
        /// The file.
        path: PathBuf,
        /// The dtype as the header spells it.
        descr: String,
    },
    /// The array has the wrong number of dimensions for its role.
    #[error(
        "{} holds a {}-D array of shape {shape:?}, but {role} must be {expected}",
        path.display(),
        shape.len()
    )]
    WrongDimensions {
        /// The file.
        path: PathBuf,
        /// Its shape.
        shape: Vec<usize>,
        /// What the array is for (`q`, `omega`, ...).
        role: &'static str,
        /// The layout it must have, e.g. `4-D [batch, seq, heads, head_dim]`.
        expected: &'static str,
    },
    /// The array's data would not fit in the memory available.
    #[error("{} holds {size} of data but only {available} of memory is available", path.display())]
    TooLarge {
        /// The file.
        path: PathBuf,
        /// Size of its data.
        size: linattn::ByteSize,
        /// Memory available now.
        available: linattn::ByteSize,
    },
    /// q, k and v differ in element type.
    #[error("q, k and v must share a dtype, but q is {q}, k is {k} and v is {v}")]
    DtypeMismatch {
        /// dtype of q.
        q: &'static str,
        /// dtype of k.
        k: &'static str,
        /// dtype of v.
        v: &'static str,
    },
    /// The output gradient's element type differs from the inputs'.
    #[error("the output gradient {} is {d_out} but q, k and v are {inputs}; it must share their dtype", path.display())]
    GradientDtypeMismatch {
        /// The output gradient's file.
        path: PathBuf,
        /// Its dtype.
        d_out: &'static str,
        /// The dtype of q, k and v.
        inputs: &'static str,
    },
    /// Options that do not go together, or a method missing one it needs.
    #[error("{0}")]
    Usage(String),
    /// The library refused the request.
    #[error(transparent)]
    Attention(#[from] linattn::Error),
    /// The report could not be written to standard output.
    #[error("cannot write to standard output: {0}")]
    Stdout(io::Error),
}

impl CliError {
    /// The process exit status for every `CliError` (clap's usage errors use it too).
    pub const EXIT_CODE: u8 = 2;
}
