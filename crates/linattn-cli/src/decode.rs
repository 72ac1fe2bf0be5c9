//! `linattn decode`: each method prefills a random prompt, then generates tokens one at a
//! time through its recurrent [`Decoder`]; every step is timed and the state's memory
//! read after it, so that the softmax KV cache's growth shows beside the constant states
//! of the linear methods.

use crate::decode_report::{DecodeReport, MethodTrace, Settings, Step};
use crate::dtype::Dtype;
use crate::error::CliError;
use crate::gates::{self, Gate, RandomGates};
use crate::gpu::{self, Device, GpuDtype};
use crate::method_options::{Fallbacks, InputDims, MethodName, MethodOptions, method_name_parser};
use crate::window_span::WindowSpan;
use clap::Args;
use clap::builder::RangedU64ValueParser;
use linattn::{Attention, Element, HeadLayout, Method, Tensor};
use std::io;
use std::time::{Duration, Instant};

/// The methods that decode token by token on the CPU, compared when `--method` is left
/// out.
pub fn recurrent_methods() -> Vec<MethodName> {
    MethodName::methods_where(|info| info.cpu.recurrent)
}

/// Rows the table has when `--every` is left out (plus the last step's).
const DEFAULT_ROWS: usize = 10;

/// Options this command supplies where `run` would insist on them.
const DECODE_DEFAULTS: &str = "\
Method options left out: window and hybrid use --window 256,0 (causal: keys after the \
query are never seen), hybrid --local-heads heads/2, cosformer --max-len P+N (decoding \
needs a fixed M), linformer --k-proj 256 (only to report that it cannot decode).";

/// Seeds of the prompt's q, k and v: every method sees the same prompt.
const PROMPT_SEEDS: [u64; 3] = [1, 2, 3];

/// Arguments of `linattn decode`.
#[derive(Debug, Args)]
#[command(after_help = DECODE_DEFAULTS)]
pub struct DecodeArgs {
    /// Methods to compare, comma-separated [default: every method with a recurrent
    /// form]
    #[arg(long, value_delimiter = ',', value_parser = method_name_parser())]
    method: Option<Vec<MethodName>>,
    /// Tokens of the random prompt, prefilled in one causal call
    #[arg(long, value_name = "P", default_value_t = 1024, value_parser = at_least_one())]
    prompt_len: usize,
    /// Tokens generated one at a time after the prompt
    #[arg(long, value_name = "N", default_value_t = 256, value_parser = at_least_one())]
    tokens: usize,
    /// Sequences decoded together
    #[arg(long, default_value_t = 1, value_parser = at_least_one())]
    batch: usize,
    /// Query heads
    #[arg(long, default_value_t = 8, value_parser = at_least_one())]
    heads: usize,
    /// Key and value heads (GQA/MQA: a divisor of --heads) [default: --heads]
    #[arg(long, value_name = "G", value_parser = at_least_one())]
    kv_heads: Option<usize>,
    /// Head dimension of q, k and v
    #[arg(long, default_value_t = 64, value_parser = at_least_one())]
    dim: usize,
    /// Precision of the inputs
    #[arg(long, value_enum, default_value_t = Dtype::F32)]
    dtype: Dtype,
    /// A table row every K tokens, plus the last [default: about 10 rows]
    #[arg(long, value_name = "K", value_parser = at_least_one())]
    every: Option<usize>,
    /// Print one JSON object on stdout instead of the tables
    #[arg(long)]
    json: bool,
    /// gla, gated-delta-rule: their random log decays per value head (log σ(x)) or per
    /// key channel (log σ(x)/16) [default: gla per channel, gated-delta-rule per head]
    #[arg(long, value_enum)]
    gate: Option<Gate>,
    /// Caps the bytes the prefill and each step may allocate
    #[arg(long, value_name = "BYTES")]
    memory_limit: Option<u64>,
    /// Where to decode: the CPU, or the first NVIDIA GPU (linear attention so far; the
    /// others are skipped with the reason)
    #[arg(long, value_enum, default_value_t = Device::Cpu)]
    device: Device,
    /// With --device cuda: the element type of the tensors on the GPU (the state is f32)
    #[arg(long, value_enum, default_value_t = GpuDtype::Bf16)]
    gpu_dtype: GpuDtype,
    // Last: its help heading would otherwise also cover the arguments after it.
    #[command(flatten)]
    options: MethodOptions,
}

/// Sizes of zero would only be refused later, once per method.
fn at_least_one() -> RangedU64ValueParser<usize> {
    RangedU64ValueParser::new().range(1..)
}

impl DecodeArgs {
    fn kv_heads(&self) -> usize {
        self.kv_heads.unwrap_or(self.heads)
    }

    /// The context length at the end: the prompt and every generated token.
    fn final_context(&self) -> usize {
        self.prompt_len + self.tokens
    }

    fn settings(&self, dtype: &'static str) -> Settings {
        Settings {
            prompt_len: self.prompt_len,
            tokens: self.tokens,
            batch: self.batch,
            heads: self.heads,
            kv_heads: self.kv_heads(),
            dim: self.dim,
            dtype,
            every: self.every.unwrap_or(self.tokens.div_ceil(DEFAULT_ROWS)),
        }
    }

    /// The methods to compare, named and configured.
    fn methods(&self) -> Result<Vec<(MethodName, Method)>, CliError> {
        let names = self.method.clone().unwrap_or_else(recurrent_methods);
        let dims = InputDims {
            head_dim: self.dim,
            key_len: self.final_context(),
        };
        let fallbacks = Fallbacks {
            window: Some(WindowSpan {
                left: Some(256),
                right: Some(0),
            }),
            local_heads: Some(self.heads / 2),
            k_proj: Some(256),
            max_len: Some(self.final_context()),
            // The delta rule on keys of unit length, as DeltaNet layers give it.
            l2norm_qk: Some(true),
        };
        gates::check_read(self.gate, &names)?;
        let methods = self.options.methods(&names, dims, fallbacks)?;
        Ok(names.into_iter().zip(methods).collect())
    }

    fn attention(&self, method: Method) -> Attention {
        let attention = Attention::new(method).causal(true);
        match self.memory_limit {
            Some(limit) => attention.memory_limit(limit),
            None => attention,
        }
    }
}

/// Runs `linattn decode`.
pub fn decode(args: &DecodeArgs) -> Result<(), CliError> {
    if !args.heads.is_multiple_of(args.kv_heads()) {
        return Err(CliError::Usage(format!(
            "--heads {} is not a multiple of --kv-heads {}: each key/value head serves an equal group of query heads",
            args.heads,
            args.kv_heads()
        )));
    }
    let methods = args.methods()?;
    let report = match (args.device, args.dtype) {
        (Device::Cuda, Dtype::F32) => compare_on_gpu(args, &methods)?,
        (Device::Cuda, Dtype::F64) => {
            return Err(CliError::Usage(
                "--dtype f64 is the CPU's; on the GPU use --gpu-dtype".into(),
            ));
        }
        (Device::Cpu, Dtype::F32) => compare::<f32>(args, &methods)?,
        (Device::Cpu, Dtype::F64) => compare::<f64>(args, &methods)?,
    };
    let stdout = io::stdout().lock();
    if args.json {
        report.write_json(stdout)
    } else {
        report.write_tables(stdout)
    }
    .map_err(CliError::Stdout)
}

/// Decodes with every method in turn; a method the library refuses (no causal form, too
/// little memory) becomes a skip note, so that one method's limits never end the
/// comparison.
fn compare<T: Element>(
    args: &DecodeArgs,
    methods: &[(MethodName, Method)],
) -> Result<DecodeReport, CliError> {
    let settings = args.settings(T::NAME);
    let prompt = prompt::<T>(args)?;
    let traces = methods
        .iter()
        .map(|(name, method)| {
            let gate = Gate::of(name.info(), args.gate);
            let name = name.name();
            eprint!(
                "decode: {name:<9} prefill {} + {} steps ... ",
                args.prompt_len, args.tokens
            );
            let trace = match decode_method(&args.attention(method.clone()), args, &prompt) {
                Ok(trace) => {
                    eprintln!("{:.3} ms prefill", trace.prefill.as_secs_f64() * 1e3);
                    MethodTrace::measured(
                        name,
                        trace.prefill,
                        &trace.steps,
                        trace.bytes_per_token,
                        &settings,
                    )
                }
                Err(error) => {
                    eprintln!("skipped: {error}");
                    MethodTrace::skipped(name, error.to_string())
                }
            };
            MethodTrace { gate, ..trace }
        })
        .collect();
    Ok(DecodeReport {
        settings,
        methods: traces,
    })
}

/// `decode --device cuda`: the methods that run on the GPU decode there, step times
/// measured on the device; the others are skipped with the reason.
fn compare_on_gpu(
    args: &DecodeArgs,
    methods: &[(MethodName, Method)],
) -> Result<DecodeReport, CliError> {
    let settings = args.settings(args.gpu_dtype.name());
    let prompt = prompt::<f32>(args)?;
    let mut traces = Vec::new();
    for (name, method) in methods {
        let name = name.name();
        if !method.info().cuda.recurrent {
            traces.push(MethodTrace::skipped(
                name,
                format!("{name} does not run on the GPU yet"),
            ));
            continue;
        }
        let tokens = (0..args.tokens).map(|index| token(args, index));
        let attention = args.attention(method.clone());
        let (prefill, steps, bytes_per_token) = gpu::decode_steps(
            &attention,
            [&prompt[0], &prompt[1], &prompt[2]],
            tokens,
            (args.gpu_dtype, args.gate),
        )?;
        traces.push(MethodTrace::measured(
            name,
            prefill,
            &steps,
            bytes_per_token,
            &settings,
        ));
    }
    Ok(DecodeReport {
        settings,
        methods: traces,
    })
}

/// What one method's decoding showed.
struct Trace {
    prefill: Duration,
    steps: Vec<Step>,
    bytes_per_token: usize,
}

/// Prefills `prompt`, then feeds `args.tokens` random tokens one at a time.
fn decode_method<T: Element>(
    attention: &Attention,
    args: &DecodeArgs,
    prompt: &[Tensor<T>; 3],
) -> linattn::Result<Trace> {
    if attention.method().info().layout == HeadLayout::GroupedValues {
        return decode_gated(attention, args, prompt);
    }
    let [q, k, v] = prompt;
    let start = Instant::now();
    let (prompt_output, mut decoder) = attention.prefill(q, k, v)?;
    let prefill = start.elapsed();
    drop(prompt_output);
    let steps = timed_steps(args, |[q, k, v]| {
        let start = Instant::now();
        drop(decoder.step(q, k, v)?);
        Ok((start.elapsed(), decoder.memory().state_bytes))
    })?;
    Ok(Trace {
        prefill,
        steps,
        bytes_per_token: decoder.memory().bytes_per_token,
    })
}

/// [`decode_method`] for the gated family, its gates drawn as `bench` draws them
/// ([`RandomGates`], g for `--gate`): the same for every step, which costs what any
/// other would.
fn decode_gated<T: Element>(
    attention: &Attention,
    args: &DecodeArgs,
    [q, k, v]: &[Tensor<T>; 3],
) -> linattn::Result<Trace> {
    let method = attention.method();
    let gates = RandomGates::for_call(method, args.gate, v.shape(), q.head_dim())?;
    let start = Instant::now();
    let (prompt_output, mut decoder) = attention.prefill_gated(q, k, v, &gates.inputs())?;
    let prefill = start.elapsed();
    drop(prompt_output);
    let [batch, _, heads_v, dim_v] = v.shape();
    let token_gates =
        RandomGates::for_call(method, args.gate, [batch, 1, heads_v, dim_v], q.head_dim())?;
    let (g, beta) = (token_gates.inputs().g, token_gates.inputs().beta);
    let steps = timed_steps(args, |[q, k, v]| {
        let start = Instant::now();
        drop(decoder.step(q, k, v, g, beta)?);
        Ok((start.elapsed(), decoder.memory().state_bytes))
    })?;
    Ok(Trace {
        prefill,
        steps,
        bytes_per_token: 0,
    })
}

/// Lines on stderr while a long decode runs: none in its first second, then one a
/// second (on a terminal and in a log alike).
struct Progress {
    start: Instant,
    last: Option<Instant>,
}

impl Progress {
    const EVERY: Duration = Duration::from_secs(1);

    fn new() -> Self {
        Self {
            start: Instant::now(),
            last: None,
        }
    }

    /// Prints `line()` if a second has passed since the start or the last line.
    fn report(&mut self, line: impl FnOnce() -> String) {
        let since = self.last.unwrap_or(self.start);
        if since.elapsed() >= Self::EVERY {
            eprint!(
                "\n  {} ({:.0} s) ",
                line(),
                self.start.elapsed().as_secs_f64()
            );
            self.last = Some(Instant::now());
        }
    }
}

/// The random prompt every method prefills: q, k and v of `--prompt-len` positions.
fn prompt<T: Element>(args: &DecodeArgs) -> linattn::Result<[Tensor<T>; 3]> {
    let shape = |heads| [args.batch, args.prompt_len, heads, args.dim];
    let [q_seed, k_seed, v_seed] = PROMPT_SEEDS;
    Ok([
        Tensor::randn(shape(args.heads), q_seed)?,
        Tensor::randn(shape(args.kv_heads()), k_seed)?,
        Tensor::randn(shape(args.kv_heads()), v_seed)?,
    ])
}

/// Generated token `index`: q, k and v of one position for every sequence. Three seeds
/// per token past the prompt's: every method (and device) sees the same tokens.
fn token<T: Element>(args: &DecodeArgs, index: usize) -> linattn::Result<[Tensor<T>; 3]> {
    let token_shape = |heads| [args.batch, 1, heads, args.dim];
    let seed = PROMPT_SEEDS.len() as u64 * (index as u64 + 1) + 1;
    Ok([
        Tensor::randn(token_shape(args.heads), seed)?,
        Tensor::randn(token_shape(args.kv_heads()), seed + 1)?,
        Tensor::randn(token_shape(args.kv_heads()), seed + 2)?,
    ])
}

/// Feeds `args.tokens` random tokens one at a time to `step`, which returns the time its
/// decoder took and the bytes its state holds after it (the token's making is not timed).
fn timed_steps<T: Element>(
    args: &DecodeArgs,
    mut step: impl FnMut(&[Tensor<T>; 3]) -> linattn::Result<(Duration, usize)>,
) -> linattn::Result<Vec<Step>> {
    let mut progress = Progress::new();
    (0..args.tokens)
        .map(|index| {
            progress.report(|| format!("step {}/{}", index + 1, args.tokens));
            let (latency, state_bytes) = step(&token(args, index)?)?;
            Ok(Step {
                context: args.prompt_len + index + 1,
                latency,
                state_bytes,
            })
        })
        .collect()
}
