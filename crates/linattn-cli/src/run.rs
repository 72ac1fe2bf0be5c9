//! `linattn run`: one attention call on q, k, v read from .npy files, the output written
//! as .npy in the inputs' precision; with an output gradient, the backward pass too.

use crate::error::CliError;
use crate::gpu::{self, Device, GpuDtype};
use crate::method_options::{InputDims, MethodName, MethodOptions, method_name_parser};
use crate::npy::{self, Array, Elements, Float};
use clap::Args;
use linattn::{Attention, GateInputs, Gradients, HeadLayout, Method, Tensor, TokenInput};
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
    /// The gated family's log decays g, every value ≤ 0: [batch, seq, heads_v] or, per
    /// key channel, [batch, seq, heads_v, head_dim] (gla, gated-delta-rule)
    #[arg(long, value_name = "FILE")]
    g: Option<PathBuf>,
    /// The delta rule's step sizes β, [batch, seq, heads_v] (delta-rule,
    /// gated-delta-rule)
    #[arg(long, value_name = "FILE")]
    beta: Option<PathBuf>,
    /// The gated family's states to start from, [batch, heads_v, head_dim, head_dim_v]
    /// (zeros without it)
    #[arg(long, value_name = "FILE")]
    initial_state: Option<PathBuf>,
    /// Where to write the gated family's state after the last token, as --initial-state
    /// reads it
    #[arg(long, value_name = "FILE")]
    final_state: Option<PathBuf>,
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
    /// Refuses per-token inputs and states the method does not read, and asks for those
    /// it does.
    fn check_gate_files(&self) -> Result<(), CliError> {
        let info = self.method.info();
        for (input, file) in [
            (TokenInput::LogDecay, &self.g),
            (TokenInput::StepSize, &self.beta),
        ] {
            let flag = input.name();
            match (info.token_inputs.contains(&input), file) {
                (true, None) => {
                    return Err(CliError::Usage(format!(
                        "{} needs --{flag} FILE: {}",
                        info.name,
                        match input {
                            TokenInput::LogDecay =>
                                "the log decays, [batch, seq, heads_v(, head_dim)]",
                            TokenInput::StepSize => "the step sizes β, [batch, seq, heads_v]",
                        }
                    )));
                }
                (false, Some(_)) => {
                    return Err(CliError::Usage(format!(
                        "{} reads no {flag}; leave --{flag} out",
                        info.name
                    )));
                }
                _ => {}
            }
        }
        let states = self.initial_state.is_some() || self.final_state.is_some();
        if states && info.layout != HeadLayout::GroupedValues {
            return Err(CliError::Usage(format!(
                "--initial-state and --final-state are for retention, gla, delta-rule and \
                 gated-delta-rule; {} continues a sequence through `linattn decode`",
                info.name
            )));
        }
        Ok(())
    }

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

/// q, k, v, the gated family's inputs and, for the backward pass, the output gradient.
struct Tensors<T> {
    q: Tensor<T>,
    k: Tensor<T>,
    v: Tensor<T>,
    g: Option<Tensor<T>>,
    beta: Option<Tensor<T>>,
    initial_state: Option<Tensor<T>>,
    d_out: Option<Tensor<T>>,
}

/// The files beside q, k and v, read.
struct Extra {
    g: Option<Array>,
    beta: Option<Array>,
    initial_state: Option<Array>,
    d_out: Option<Array>,
}

impl Inputs {
    /// The tensors in q's precision; k, v and the other inputs must share it.
    fn new(q: Array, k: Array, v: Array, extra: Extra) -> Result<Self, CliError> {
        Ok(match q.elements {
            Elements::F32(_) => Inputs::F32(Tensors::new(q, k, v, extra)?),
            Elements::F64(_) => Inputs::F64(Tensors::new(q, k, v, extra)?),
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
    fn new(q: Array, k: Array, v: Array, extra: Extra) -> Result<Self, CliError> {
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
        let d_out = match extra.d_out {
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
            g: extra.g.map(|a| per_token::<T>(a, "g")).transpose()?,
            beta: extra.beta.map(|a| per_token::<T>(a, "beta")).transpose()?,
            initial_state: extra.initial_state.map(|a| state::<T>(a)).transpose()?,
            d_out,
        })
    }
}

/// A per-token input: `[batch, seq, heads_v]` (read as `[.., 1]`) or 4-D, in `T`.
fn per_token<T: Float>(array: Array, role: &'static str) -> Result<Tensor<T>, CliError> {
    const LAYOUT: &str = "[batch, seq, heads_v] or [batch, seq, heads_v, head_dim]";
    let shape = match array.shape.as_slice() {
        &[b, t, h] => [b, t, h, 1],
        _ => array.dims::<4>(role, LAYOUT)?,
    };
    Ok(Tensor::from_vec(values_of::<T>(array)?, shape)?)
}

/// The states `[batch, heads_v, head_dim, head_dim_v]`, in `T`.
fn state<T: Float>(array: Array) -> Result<Tensor<T>, CliError> {
    let shape = array.dims::<4>(
        "the initial state",
        "4-D [batch, heads_v, head_dim, head_dim_v]",
    )?;
    Ok(Tensor::from_vec(values_of::<T>(array)?, shape)?)
}

/// The values of `array`, which must be of q's type `T`.
fn values_of<T: Float>(array: Array) -> Result<Vec<T>, CliError> {
    let path = array.path;
    T::take(array.elements).map_err(|other| {
        CliError::Usage(format!(
            "{} is {} but q is {}; give every input in one dtype",
            path.display(),
            other.dtype(),
            T::NAME
        ))
    })
}

/// Runs `linattn run`.
pub fn run(args: &RunArgs) -> Result<(), CliError> {
    let gradients = args.gradient_request()?;
    args.check_gate_files()?;
    // Before any reading or computing: every destination is known and writable, and
    // none of them is an input.
    let mut outputs = npy::Outputs::create(&args.destinations(), &args.input_files())?;
    let read = |file: &Option<PathBuf>| file.as_deref().map(npy::read).transpose();
    let extra = Extra {
        g: read(&args.g)?,
        beta: read(&args.beta)?,
        initial_state: read(&args.initial_state)?,
        d_out: gradients.map(npy::read).transpose()?,
    };
    let inputs = Inputs::new(
        npy::read(&args.q)?,
        npy::read(&args.k)?,
        npy::read(&args.v)?,
        extra,
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
        let final_state = args
            .final_state
            .is_some()
            .then(|| args.destinations().len() - 1);
        match &inputs {
            Inputs::F32(tensors) => compute(&attention, tensors, final_state, &mut outputs)?,
            Inputs::F64(tensors) => compute(&attention, tensors, final_state, &mut outputs)?,
        }
    }
    outputs.commit()
}

impl RunArgs {
    /// Every file the command writes, in order: the output, then dq, dk, dv (and
    /// Linformer's dE, dF) under the gradients' prefix, then the final state.
    fn destinations(&self) -> Vec<PathBuf> {
        let mut paths = vec![self.out.clone()];
        if let Some(prefix) = &self.grads_prefix {
            let info = self.method.info();
            let parameters = info.parameters.iter().copied();
            // The gated family: dg and dbeta where it reads them, and the initial state's.
            let token_inputs = info.token_inputs.iter().map(|input| input.name());
            let initial = self.initial_state.as_ref().map(|_| "_initial_state");
            let names = ["q", "k", "v"]
                .into_iter()
                .chain(parameters)
                .chain(token_inputs);
            let names = names.chain(initial);
            paths.extend(names.map(|name| prefixed(prefix, &format!("d{name}"))));
        }
        paths.extend(self.final_state.clone());
        paths
    }

    /// Every file the command reads.
    fn input_files(&self) -> Vec<&Path> {
        let mut files = vec![self.q.as_path(), self.k.as_path(), self.v.as_path()];
        files.extend(self.grad_out.as_deref());
        files.extend(self.g.as_deref());
        files.extend(self.beta.as_deref());
        files.extend(self.initial_state.as_deref());
        files.extend(self.options.input_files());
        files
    }
}

/// Computes the output (and with an output gradient, the gradients; for the gated family
/// the final state, written as output `final_state` if asked for) and writes them in the
/// order of [`RunArgs::destinations`].
fn compute<T: Float>(
    attention: &Attention,
    tensors: &Tensors<T>,
    final_state: Option<usize>,
    outputs: &mut npy::Outputs,
) -> Result<(), CliError> {
    let Tensors { q, k, v, d_out, .. } = tensors;
    if attention.method().info().layout == HeadLayout::GroupedValues {
        let gates = GateInputs {
            g: tensors.g.as_ref(),
            beta: tensors.beta.as_ref(),
            initial_state: tensors.initial_state.as_ref(),
            ..GateInputs::default()
        };
        let result = attention.forward_gated(q, k, v, &gates)?;
        outputs.write(0, &result.out)?;
        if let Some(index) = final_state {
            outputs.write(index, &result.final_state)?;
        }
        drop(result);
        if let Some(d_out) = d_out {
            let grads = attention.backward_gated(q, k, v, &gates, d_out, None)?;
            let optional = [grads.dg.as_ref(), grads.dbeta.as_ref()];
            let initial = tensors
                .initial_state
                .as_ref()
                .map(|_| &grads.d_initial_state);
            let written = [Some(&grads.dq), Some(&grads.dk), Some(&grads.dv)].into_iter();
            for (index, gradient) in written
                .chain(optional)
                .chain([initial])
                .flatten()
                .enumerate()
            {
                outputs.write(1 + index, gradient)?;
            }
        }
    } else {
        let output = attention.forward(q, k, v)?;
        outputs.write(0, &output)?;
        drop(output);
        if let Some(d_out) = d_out {
            let gradients = attention.backward(q, k, v, d_out)?;
            write_gradients(attention.method(), &gradients, outputs)?;
        }
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
