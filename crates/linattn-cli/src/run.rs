//! `linattn run`: one attention call on q, k, v read from .npy files, the output written
//! as .npy in the inputs' precision.

use crate::error::CliError;
use crate::method_options::{InputDims, MethodName, MethodOptions};
use crate::npy::{self, Array, Elements};
use clap::Args;
use linattn::{Attention, Element, Tensor};
use std::path::{Path, PathBuf};

/// The layout q, k and v must have.
const QKV_LAYOUT: &str = "4-D [batch, seq, heads, head_dim]";

/// Arguments of `linattn run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// The attention method
    #[arg(long, value_enum)]
    method: MethodName,
    /// Query i sees only keys j ≤ i
    #[arg(long)]
    causal: bool,
    /// Queries, [batch, seq_q, heads_q, head_dim], float32 or float64
    #[arg(long, value_name = "FILE")]
    q: PathBuf,
    /// Keys, [batch, seq_k, heads_kv, head_dim] (heads_q a multiple of heads_kv)
    #[arg(long, value_name = "FILE")]
    k: PathBuf,
    /// Values, [batch, seq_k, heads_kv, head_dim_v]
    #[arg(long, value_name = "FILE")]
    v: PathBuf,
    /// Where to write the output, in the inputs' dtype
    #[arg(long, value_name = "FILE")]
    out: PathBuf,
    /// Caps the bytes the call may allocate (to exercise the out-of-memory path)
    #[arg(long, value_name = "BYTES", hide = true)]
    memory_limit: Option<u64>,
    // Last: its help heading would otherwise also cover the arguments after it.
    #[command(flatten)]
    options: MethodOptions,
}

/// q, k and v in their common precision.
enum Inputs {
    F32([Tensor<f32>; 3]),
    F64([Tensor<f64>; 3]),
}

impl Inputs {
    fn new(q: Array, k: Array, v: Array) -> Result<Self, CliError> {
        let shapes = [
            q.dims::<4>("q", QKV_LAYOUT)?,
            k.dims::<4>("k", QKV_LAYOUT)?,
            v.dims::<4>("v", QKV_LAYOUT)?,
        ];
        Ok(match (q.elements, k.elements, v.elements) {
            (Elements::F32(q), Elements::F32(k), Elements::F32(v)) => Inputs::F32([
                Tensor::from_vec(q, shapes[0])?,
                Tensor::from_vec(k, shapes[1])?,
                Tensor::from_vec(v, shapes[2])?,
            ]),
            (Elements::F64(q), Elements::F64(k), Elements::F64(v)) => Inputs::F64([
                Tensor::from_vec(q, shapes[0])?,
                Tensor::from_vec(k, shapes[1])?,
                Tensor::from_vec(v, shapes[2])?,
            ]),
            (q, k, v) => {
                return Err(CliError::DtypeMismatch {
                    q: q.dtype(),
                    k: k.dtype(),
                    v: v.dtype(),
                });
            }
        })
    }

    fn dims(&self) -> InputDims {
        let [q, k, _] = match self {
            Inputs::F32(tensors) => tensors.each_ref().map(Tensor::shape),
            Inputs::F64(tensors) => tensors.each_ref().map(Tensor::shape),
        };
        InputDims {
            head_dim: q[3],
            key_len: k[1],
        }
    }
}

/// Runs `linattn run`.
pub fn run(args: &RunArgs) -> Result<(), CliError> {
    let inputs = Inputs::new(
        npy::read(&args.q)?,
        npy::read(&args.k)?,
        npy::read(&args.v)?,
    )?;
    let method = args.options.method(args.method, inputs.dims())?;
    let mut attention = Attention::new(method).causal(args.causal);
    if let Some(limit) = args.memory_limit {
        attention = attention.memory_limit(limit);
    }
    match &inputs {
        Inputs::F32([q, k, v]) => compute(&attention, q, k, v, &args.out),
        Inputs::F64([q, k, v]) => compute(&attention, q, k, v, &args.out),
    }
}

fn compute<T: Element + npyz::AutoSerialize>(
    attention: &Attention,
    q: &Tensor<T>,
    k: &Tensor<T>,
    v: &Tensor<T>,
    out: &Path,
) -> Result<(), CliError> {
    let output = attention.forward(q, k, v)?;
    npy::write(out, &output)
}
