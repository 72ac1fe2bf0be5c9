//! The `--dtype` option of the commands that make their own random inputs.

use clap::ValueEnum;

/// Precision of generated inputs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Dtype {
    /// float32.
    F32,
    /// float64.
    F64,
}
