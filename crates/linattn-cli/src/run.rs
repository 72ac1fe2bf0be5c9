//! `linattn run`: one attention call on q, k, v read from .npy files, the output written
//! as .npy in the inputs' precision; with an output gradient, the backward pass too.

use crate::error::CliError;
use crate::gpu::{self, Device, GpuDtype};
use crate::method_options::{InputDims, MethodName, MethodOptions, method_name_parser};
use crate::npy::{self, Array, Elements, Float};
use clap::Args;
use linattn::{Attention, Gradients, Method, Tensor};
use std::path::{Path, PathBuf};

/// The layout q, k and v must have.
const QKV_LAYOUT: &str = "4-D [batch, seq, heads, head_dim]";
/// The layout of the output gradient (its shape is checked by the library).
const OUTPUT_LAYOUT: &str = "4-D, the output's shape";

/// Arguments of `linattn run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// The attention method
    #[arg(long, value_parser = method_name_parser())]
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
    /// Gradient of the loss with respect to the output (its shape, the inputs' dtype):
    /// also compute the backward pass (needs --grads-prefix)
    #[arg(long, value_name = "FILE")]
    grad_out: Option<PathBuf>,
    /// Where the gradients go: PATH + dq.npy, dk.npy, dv.npy, and for linformer dE.npy,
    /// dF.npy (needs --grad-out)
    #[arg(long, value_name = "PATH")]
    grads_prefix: Option<PathBuf>,
    /// Caps the bytes the call may allocate (to exercise the out-of-memory path)
    #[arg(long, value_name = "BYTES", hide = true)]
    memory_limit: Option<u64>,
    /// Where to compute: the CPU, or the first NVIDIA GPU (linear attention so far)
    #[arg(long, value_enum, default_value_t = Device::Cpu)]
    device: Device,
    /// With --device cuda: the element type of the tensors on the GPU
    #[arg(long, value_enum, default_value_t = GpuDtype::F32)]
    gpu_dtype: GpuDtype,
    // Last: its help heading would otherwise also cover the arguments after it.
    #[command(flatten)]
    options: MethodOptions,
}

impl RunArgs {
    /// The output gradient's file when the backward pass is asked for; one of
    /// `--grad-out` and `--grads-prefix` without the other is a usage error.
    fn gradient_request(&self) -> Result<Option<&Path>, CliError> {
        match (&self.grad_out, &self.grads_prefix) {
            (Some(d_out), Some(_)) => Ok(Some(d_out)),
            (None, None) => Ok(None),
            (Some(_), None) => Err(CliError::Usage(
                "--grad-out needs --grads-prefix PATH, where dq.npy, dk.npy and dv.npy are written"
                    .into(),
            )),
            (None, Some(_)) => Err(CliError::Usage(
                "--grads-prefix needs --grad-out FILE, the gradient of the loss with respect to the output"
                    .into(),
            )),
        }
    }
}

/// The arrays of one call in their common precision.
enum Inputs {
    F32(Tensors<f32>),
    F64(Tensors<f64>),
}

/// q, k, v and, for the backward pass, the output gradient.
struct Tensors<T> {
    q: Tensor<T>,
    k: Tensor<T>,
    v: Tensor<T>,
    d_out: Option<Tensor<T>>,
}

impl Inputs {
    /// The tensors in q's precision; k, v and the output gradient must share it.
    fn new(q: Array, k: Array, v: Array, d_out: Option<Array>) -> Result<Self, CliError> {
        Ok(match q.elements {
            Elements::F32(_) => Inputs::F32(Tensors::new(q, k, v, d_out)?),
            Elements::F64(_) => Inputs::F64(Tensors::new(q, k, v, d_out)?),
        })
    }

    fn dims(&self) -> InputDims {
        let (q, k) = match self {
            Inputs::F32(tensors) => (tensors.q.shape(), tensors.k.shape()),
            Inputs::F64(tensors) => (tensors.q.shape(), tensors.k.shape()),
        };
        InputDims {
            head_dim: q[3],
            key_len: k[1],
        }
    }
}

impl<T: Float> Tensors<T> {
    fn new(q: Array, k: Array, v: Array, d_out: Option<Array>) -> Result<Self, CliError> {
        let shapes = [
            q.dims::<4>("q", QKV_LAYOUT)?,
            k.dims::<4>("k", QKV_LAYOUT)?,
            v.dims::<4>("v", QKV_LAYOUT)?,
        ];
        let mismatch = CliError::DtypeMismatch {
            q: q.elements.dtype(),
            k: k.elements.dtype(),
            v: v.elements.dtype(),
        };
        let [q, k, v] = match [q, k, v].map(|array| T::take(array.elements)) {
            [Ok(q), Ok(k), Ok(v)] => [q, k, v],
            _ => return Err(mismatch),
        };
        let d_out = match d_out {
            Some(array) => {
                let shape = array.dims::<4>("the output gradient", OUTPUT_LAYOUT)?;
                let values =
                    T::take(array.elements).map_err(|other| CliError::GradientDtypeMismatch {
                        path: array.path,
                        d_out: other.dtype(),
                        inputs: T::NAME,
                    })?;
                Some(Tensor::from_vec(values, shape)?)
            }
            None => None,
        };
        Ok(Self {
            q: Tensor::from_vec(q, shapes[0])?,
            k: Tensor::from_vec(k, shapes[1])?,
            v: Tensor::from_vec(v, shapes[2])?,
            d_out,
        })
    }
}

/// Runs `linattn run`.
pub fn run(args: &RunArgs) -> Result<(), CliError> {
    let gradients = args.gradient_request()?;
    // Before any reading or computing: every destination is known and writable, and
    // none of them is an input.
    let mut outputs = npy::Outputs::create(&args.destinations(), &args.input_files())?;
    let inputs = Inputs::new(
        npy::read(&args.q)?,
        npy::read(&args.k)?,
        npy::read(&args.v)?,
        gradients.map(npy::read).transpose()?,
    )?;
    let method = args.options.method(args.method, inputs.dims())?;
    let mut attention = Attention::new(method).causal(args.causal);
    if let Some(limit) = args.memory_limit {
        attention = attention.memory_limit(limit);
    }
    if args.device == Device::Cuda {
        if gradients.is_some() {
            return Err(gpu::refuse_on_gpu("--grad-out"));
        }
        match &inputs {
            Inputs::F32(t) => {
                let output = gpu::forward(&attention, [&t.q, &t.k, &t.v], args.gpu_dtype)?;
                outputs.write(0, &output)?;
            }
            Inputs::F64(t) => {
                let (q, k, v) = (t.q.cast(), t.k.cast(), t.v.cast());
                let output = gpu::forward(&attention, [&q, &k, &v], args.gpu_dtype)?;
                outputs.write(0, &output.cast::<f64>())?;
            }
        }
    } else {
        match &inputs {
            Inputs::F32(tensors) => compute(&attention, tensors, &mut outputs)?,
            Inputs::F64(tensors) => compute(&attention, tensors, &mut outputs)?,
        }
    }
    outputs.commit()
}

impl RunArgs {
    /// Every file the command writes, in order: the output, then dq, dk, dv (and
    /// Linformer's dE, dF) under the gradients' prefix.
    fn destinations(&self) -> Vec<PathBuf> {
        let mut paths = vec![self.out.clone()];
        if let Some(prefix) = &self.grads_prefix {
            let parameters = self.method.info().parameters.iter();
            let names = ["q", "k", "v"].iter().chain(parameters);
            paths.extend(names.map(|name| prefixed(prefix, &format!("d{name}"))));
        }
        paths
    }

    /// Every file the command reads.
    fn input_files(&self) -> Vec<&Path> {
        let mut files = vec![self.q.as_path(), self.k.as_path(), self.v.as_path()];
        files.extend(self.grad_out.as_deref());
        files.extend(self.options.input_files());
        files
    }
}

/// Computes the output (and with an output gradient, the gradients) and writes them in
/// the order of [`RunArgs::destinations`].
fn compute<T: Float>(
    attention: &Attention,
    tensors: &Tensors<T>,
    outputs: &mut npy::Outputs,
) -> Result<(), CliError> {
    let Tensors { q, k, v, d_out } = tensors;
    let output = attention.forward(q, k, v)?;
    outputs.write(0, &output)?;
    drop(output);
    if let Some(d_out) = d_out {
        let gradients = attention.backward(q, k, v, d_out)?;
        write_gradients(attention.method(), &gradients, outputs)?;
    }
    Ok(())
}

/// Writes dq, dk, dv in the inputs' precision and Linformer's dE, dF as float64
/// `[max_len, k]`, as outputs 1 to 5.
fn write_gradients<T: Float>(
    method: &Method,
    gradients: &Gradients<T>,
    outputs: &mut npy::Outputs,
) -> Result<(), CliError> {
    for (index, gradient) in [&gradients.dq, &gradients.dk, &gradients.dv]
        .into_iter()
        .enumerate()
    {
        outputs.write(1 + index, gradient)?;
    }
    if let (Some((d_e, d_f)), Method::Linformer(linformer)) = (&gradients.projections, method) {
        let shape = [linformer.max_len, linformer.k];
        outputs.write_array(4, &shape, d_e)?;
        outputs.write_array(5, &shape, d_f)?;
    }
    Ok(())
}

/// `prefix` with `name.npy` appended to its last component: `out/grad_` gives
/// `out/grad_dq.npy`.
fn prefixed(prefix: &Path, name: &str) -> PathBuf {
    let mut path = prefix.as_os_str().to_owned();
    path.push(format!("{name}.npy"));
    path.into()
}
