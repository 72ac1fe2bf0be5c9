//! `linattn run`: one attention call on q, k, v read from .npy files, the output written
//! as .npy in the inputs' precision; with an output gradient, the backward pass too.

use crate::error::CliError;
use crate::gpu::{self, Device, GpuDtype};
use crate::method_options::{InputDims, MethodName, MethodOptions, method_name_parser};
use crate::npy::{self, Array, Elements, Float};
use clap::Args;
use linattn::{
    Attention, GateInputs, GatedGradients, Gradients, HeadLayout, Method, RawGate, Tensor,
    TokenInput,
};
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
    /// Where the gradients go: PATH + dq.npy, dk.npy, dv.npy, for linformer dE.npy,
    /// dF.npy, and for the gated family the gradient of each input it read, in that
    /// input's shape: dg.npy or da.npy, dA_log.npy, ddt_bias.npy; dbeta.npy or
    /// dbeta_logits.npy; d_initial_state.npy (needs --grad-out)
    #[arg(long, value_name = "PATH")]
    grads_prefix: Option<PathBuf>,
    /// The gated family's log decays g, every value ≤ 0: [batch, seq, heads_v] or, per
    /// key channel, [batch, seq, heads_v, head_dim] (gla, gated-delta-rule)
    #[arg(long, value_name = "FILE")]
    g: Option<PathBuf>,
    /// In place of --g, g computed inside from a layer's raw gate input a, [batch, seq,
    /// heads_v] or per key channel [batch, seq, heads_v, head_dim]: g = −exp(A_log) ·
    /// softplus(a + dt_bias) (flash-linear-attention's use_gate_in_kernel; needs
    /// --a-log and --dt-bias)
    #[arg(long, value_name = "FILE", conflicts_with = "g", requires_all = ["a_log", "dt_bias"])]
    gate_a: Option<PathBuf>,
    /// With --gate-a: A_log, 1-D, one value per value head
    #[arg(long, value_name = "FILE", requires = "gate_a")]
    a_log: Option<PathBuf>,
    /// With --gate-a: dt_bias, 1-D, one value per value head or, for a per key channel,
    /// heads_v · head_dim values (row-major)
    #[arg(long, value_name = "FILE", requires = "gate_a")]
    dt_bias: Option<PathBuf>,
    /// The delta rule's step sizes β, [batch, seq, heads_v] (delta-rule,
    /// gated-delta-rule)
    #[arg(long, value_name = "FILE")]
    beta: Option<PathBuf>,
    /// In place of --beta, β's logits, [batch, seq, heads_v]: β = sigmoid(logits)
    /// computed inside
    #[arg(long, value_name = "FILE", conflicts_with = "beta")]
    beta_logits: Option<PathBuf>,
    /// The gated family's sequences packed along a batch of one (flash-linear-attention's
    /// varlen): comma-separated token offsets from 0 to the length, never decreasing,
    /// sequence n over tokens OFFSETS[n]..OFFSETS[n+1] with a state of its own
    #[arg(long, value_name = "OFFSETS", value_delimiter = ',')]
    cu_seqlens: Option<Vec<usize>>,
    /// The gated family's states to start from, [batch, heads_v, head_dim, head_dim_v],
    /// or [sequences, heads_v, head_dim, head_dim_v] with --cu-seqlens (zeros without it)
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
    /// Refuses per-token inputs, states and packed sequences the method does not read,
    /// and asks for the inputs it does.
    fn check_gate_files(&self) -> Result<(), CliError> {
        let info = self.method.info();
        for (input, flag) in [
            (TokenInput::LogDecay, self.decay_flag()),
            (TokenInput::StepSize, self.step_size_flag()),
        ] {
            let name = input.name();
            match (info.token_inputs.contains(&input), flag) {
                (true, None) => {
                    return Err(CliError::Usage(format!(
                        "{} needs --{name} FILE: {}",
                        info.name,
                        match input {
                            TokenInput::LogDecay =>
                                "the log decays, [batch, seq, heads_v(, head_dim)] (or --gate-a, \
                                 --a-log and --dt-bias, the gate's raw inputs)",
                            TokenInput::StepSize =>
                                "the step sizes β, [batch, seq, heads_v] (or --beta-logits)",
                        }
                    )));
                }
                (false, Some(flag)) => {
                    return Err(CliError::Usage(format!(
                        "{} reads no {name}; leave --{flag} out",
                        info.name
                    )));
                }
                _ => {}
            }
        }
        let gated = info.layout == HeadLayout::GroupedValues;
        let states = self.initial_state.is_some() || self.final_state.is_some();
        if states && !gated {
            return Err(CliError::Usage(format!(
                "--initial-state and --final-state are for retention, gla, delta-rule and \
                 gated-delta-rule; {} continues a sequence through `linattn decode`",
                info.name
            )));
        }
        if self.cu_seqlens.is_some() && !gated {
            return Err(CliError::Usage(format!(
                "--cu-seqlens is for retention, gla, delta-rule and gated-delta-rule, whose \
                 packed sequences each keep a state; {} reads no packed sequences",
                info.name
            )));
        }
        Ok(())
    }

    /// The flag that gave the log decays: `g`, or `gate-a` for the gate's raw inputs.
    fn decay_flag(&self) -> Option<&'static str> {
        match (&self.g, &self.gate_a) {
            (Some(_), _) => Some("g"),
            (None, Some(_)) => Some("gate-a"),
            (None, None) => None,
        }
    }

    /// The flag that gave the step sizes: `beta`, or `beta-logits`.
    fn step_size_flag(&self) -> Option<&'static str> {
        match (&self.beta, &self.beta_logits) {
            (Some(_), _) => Some("beta"),
            (None, Some(_)) => Some("beta-logits"),
            (None, None) => None,
        }
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
    g: Option<PerToken<T>>,
    raw_gate: Option<RawGateInputs<T>>,
    beta: Option<PerToken<T>>,
    beta_logits: Option<PerToken<T>>,
    initial_state: Option<Tensor<T>>,
    d_out: Option<Tensor<T>>,
}

/// A per-token input as the library reads it, `[batch, seq, heads_v, 1 or head_dim]`,
/// and the shape its file had, which its gradient is written in.
struct PerToken<T> {
    tensor: Tensor<T>,
    file_shape: Vec<usize>,
}

/// The raw inputs of the gate `g = −exp(A_log) · softplus(a + dt_bias)`.
struct RawGateInputs<T> {
    a: PerToken<T>,
    a_log: Vec<T>,
    dt_bias: Vec<T>,
}

/// The files beside q, k and v, read.
struct Extra {
    g: Option<Array>,
    /// a, A_log and dt_bias.
    raw_gate: Option<[Array; 3]>,
    beta: Option<Array>,
    beta_logits: Option<Array>,
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
        let raw_gate = match extra.raw_gate {
            Some([a, a_log, dt_bias]) => Some(RawGateInputs {
                a: per_token(a, "a")?,
                a_log: vector(a_log, "A_log", "1-D, one value per value head")?,
                dt_bias: vector(
                    dt_bias,
                    "dt_bias",
                    "1-D, one value per value head or heads_v · head_dim values",
                )?,
            }),
            None => None,
        };
        let per_token = |array: Option<Array>, role| array.map(|a| per_token(a, role));
        Ok(Self {
            q: Tensor::from_vec(q, shapes[0])?,
            k: Tensor::from_vec(k, shapes[1])?,
            v: Tensor::from_vec(v, shapes[2])?,
            g: per_token(extra.g, "g").transpose()?,
            raw_gate,
            beta: per_token(extra.beta, "beta").transpose()?,
            beta_logits: per_token(extra.beta_logits, "beta_logits").transpose()?,
            initial_state: extra.initial_state.map(|a| state::<T>(a)).transpose()?,
            d_out,
        })
    }

    /// The gated family's inputs of the call, packed along `cu_seqlens` if given.
    fn gate_inputs<'a>(&'a self, cu_seqlens: Option<&'a [usize]>) -> GateInputs<'a, T> {
        GateInputs {
            g: self.g.as_ref().map(|g| &g.tensor),
            beta: self.beta.as_ref().map(|beta| &beta.tensor),
            initial_state: self.initial_state.as_ref(),
            cu_seqlens,
            raw_gate: self.raw_gate.as_ref().map(|raw| RawGate {
                a: &raw.a.tensor,
                a_log: &raw.a_log,
                dt_bias: &raw.dt_bias,
            }),
            beta_logits: self.beta_logits.as_ref().map(|logits| &logits.tensor),
        }
    }
}

/// A per-token input: `[batch, seq, heads_v]` (read as `[.., 1]`) or 4-D, in `T`.
fn per_token<T: Float>(array: Array, role: &'static str) -> Result<PerToken<T>, CliError> {
    const LAYOUT: &str = "[batch, seq, heads_v] or [batch, seq, heads_v, head_dim]";
    let shape = match array.shape.as_slice() {
        &[b, t, h] => [b, t, h, 1],
        _ => array.dims::<4>(role, LAYOUT)?,
    };
    let file_shape = array.shape.clone();
    Ok(PerToken {
        tensor: Tensor::from_vec(values_of::<T>(array)?, shape)?,
        file_shape,
    })
}

/// The values of a 1-D array, in `T`.
fn vector<T: Float>(
    array: Array,
    role: &'static str,
    layout: &'static str,
) -> Result<Vec<T>, CliError> {
    array.dims::<1>(role, layout)?;
    values_of::<T>(array)
}

/// The states `[batch, heads_v, head_dim, head_dim_v]`, in `T`.
fn state<T: Float>(array: Array) -> Result<Tensor<T>, CliError> {
    let shape = array.dims::<4>(
        "the initial state",
        "4-D [batch or sequences, heads_v, head_dim, head_dim_v]",
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
    let raw_gate = match (&args.gate_a, &args.a_log, &args.dt_bias) {
        (Some(a), Some(a_log), Some(dt_bias)) => {
            Some([npy::read(a)?, npy::read(a_log)?, npy::read(dt_bias)?])
        }
        // clap requires all three or none.
        _ => None,
    };
    let extra = Extra {
        g: read(&args.g)?,
        raw_gate,
        beta: read(&args.beta)?,
        beta_logits: read(&args.beta_logits)?,
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
        let cu_seqlens = args.cu_seqlens.as_deref();
        match &inputs {
            Inputs::F32(t) => compute(&attention, t, cu_seqlens, final_state, &mut outputs)?,
            Inputs::F64(t) => compute(&attention, t, cu_seqlens, final_state, &mut outputs)?,
        }
    }
    outputs.commit()
}

impl RunArgs {
    /// Every file the command writes, in order: the output, then dq, dk, dv (and
    /// Linformer's dE, dF) under the gradients' prefix, the gradients of the gated
    /// family's inputs ([`Self::gate_gradients`]), then the final state.
    fn destinations(&self) -> Vec<PathBuf> {
        let mut paths = vec![self.out.clone()];
        if let Some(prefix) = &self.grads_prefix {
            let parameters = self.method.info().parameters.iter().copied();
            let names = ["q", "k", "v"]
                .into_iter()
                .chain(parameters)
                .chain(self.gate_gradients());
            paths.extend(names.map(|name| prefixed(prefix, &format!("d{name}"))));
        }
        paths.extend(self.final_state.clone());
        paths
    }

    /// The gated family's inputs whose gradients are written after dq, dk and dv, in
    /// order: g (or a, A_log and dt_bias), beta (or beta_logits), the initial state.
    fn gate_gradients(&self) -> Vec<&'static str> {
        let reads = |input| self.method.info().token_inputs.contains(&input);
        let mut names = Vec::new();
        if reads(TokenInput::LogDecay) {
            match self.gate_a {
                Some(_) => names.extend(["a", "A_log", "dt_bias"]),
                None => names.push("g"),
            }
        }
        if reads(TokenInput::StepSize) {
            names.push(match self.beta_logits {
                Some(_) => "beta_logits",
                None => "beta",
            });
        }
        names.extend(self.initial_state.as_ref().map(|_| "_initial_state"));
        names
    }

    /// Every file the command reads.
    fn input_files(&self) -> Vec<&Path> {
        let mut files = vec![self.q.as_path(), self.k.as_path(), self.v.as_path()];
        for file in [
            &self.grad_out,
            &self.g,
            &self.gate_a,
            &self.a_log,
            &self.dt_bias,
            &self.beta,
            &self.beta_logits,
            &self.initial_state,
        ] {
            files.extend(file.as_deref());
        }
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
    cu_seqlens: Option<&[usize]>,
    final_state: Option<usize>,
    outputs: &mut npy::Outputs,
) -> Result<(), CliError> {
    let Tensors { q, k, v, d_out, .. } = tensors;
    if attention.method().info().layout == HeadLayout::GroupedValues {
        let gates = tensors.gate_inputs(cu_seqlens);
        let result = attention.forward_gated(q, k, v, &gates)?;
        outputs.write(0, &result.out)?;
        if let Some(index) = final_state {
            outputs.write(index, &result.final_state)?;
        }
        drop(result);
        if let Some(d_out) = d_out {
            let grads = attention.backward_gated(q, k, v, &gates, d_out, None)?;
            for (index, (shape, values)) in gated_gradients(tensors, &grads).into_iter().enumerate()
            {
                outputs.write_array(1 + index, &shape, values)?;
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

/// The gated family's gradients in the order of [`RunArgs::gate_gradients`] after dq,
/// dk and dv, each with the shape its input's file had: a g or β given `[batch, seq,
/// heads_v]` gets its gradient so, as flash-linear-attention returns it.
fn gated_gradients<'a, T: Float>(
    tensors: &Tensors<T>,
    grads: &'a GatedGradients<T>,
) -> Vec<(Vec<usize>, &'a [T])> {
    let whole = |tensor: &'a Tensor<T>| (tensor.shape().to_vec(), tensor.as_slice());
    let like = |input: &PerToken<T>, gradient: &'a Tensor<T>| {
        (input.file_shape.clone(), gradient.as_slice())
    };
    let mut written = vec![whole(&grads.dq), whole(&grads.dk), whole(&grads.dv)];
    match (&tensors.raw_gate, &grads.raw_gate, &tensors.g, &grads.dg) {
        (Some(raw), Some(raw_grads), _, _) => written.extend([
            like(&raw.a, &raw_grads.da),
            (vec![raw.a_log.len()], raw_grads.d_a_log.as_slice()),
            (vec![raw.dt_bias.len()], raw_grads.d_dt_bias.as_slice()),
        ]),
        (None, _, Some(g), Some(dg)) => written.push(like(g, dg)),
        _ => {}
    }
    match (
        &tensors.beta_logits,
        &grads.dbeta_logits,
        &tensors.beta,
        &grads.dbeta,
    ) {
        (Some(logits), Some(d_logits), _, _) => written.push(like(logits, d_logits)),
        (None, _, Some(beta), Some(dbeta)) => written.push(like(beta, dbeta)),
        _ => {}
    }
    if tensors.initial_state.is_some() {
        written.push(whole(&grads.d_initial_state));
    }
    written
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
