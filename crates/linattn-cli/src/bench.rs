//! `linattn bench`: methods over a sweep of sequence lengths, each timed, its extra
//! memory counted and its output compared with exact f64 softmax.

use crate::dtype::Dtype;
use crate::error::CliError;
use crate::gates::{self, Gate};
use crate::gpu::{self, Device, GpuDtype};
use crate::measure::measure;
use crate::method_options::{MethodName, method_name_parser};
use crate::report::{self, Case, Record};
use crate::window_span::{WindowSpan, parse_window};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use linattn::{
    Attention, Ceilings, DEFAULT_CHUNK, DEFAULT_FEATURES, Element, Method, MethodOptions, Tensor,
};
use std::cell::OnceCell;
use std::collections::HashMap;
use std::io::{self, Write};
use std::path::PathBuf;
use std::time::Duration;

/// Arguments of `linattn bench`.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Methods to measure, comma-separated [default: all]
    #[arg(long, value_delimiter = ',', value_parser = method_name_parser())]
    methods: Option<Vec<MethodName>>,
    /// Sequence lengths, comma-separated
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "1024,2048,4096,8192,16384,32768,65536",
        value_parser = positive,
        allow_hyphen_values = true
    )]
    seq: Vec<usize>,
    /// Batch size
    #[arg(long, default_value_t = 1, value_parser = positive, allow_hyphen_values = true)]
    batch: usize,
    /// Heads of q, k and v
    #[arg(long, default_value_t = 8, value_parser = positive, allow_hyphen_values = true)]
    heads: usize,
    /// Head dimension
    #[arg(long, default_value_t = 64, value_parser = positive, allow_hyphen_values = true)]
    dim: usize,
    /// Causal attention (methods without a causal form are skipped)
    #[arg(long)]
    causal: bool,
    /// Print one JSON array of records on stdout instead of the table
    #[arg(long)]
    json: bool,
    /// Precision of the inputs
    #[arg(long, value_enum, default_value_t = Dtype::F32)]
    dtype: Dtype,
    #[command(flatten)]
    settings: MethodSettings,
    /// gla, gated-delta-rule: their random log decays per value head (log σ(x)) or per
    /// key channel (log σ(x)/16) [default: gla per channel, gated-delta-rule per head]
    #[arg(long, value_enum)]
    gate: Option<Gate>,
    /// Caps the bytes each call may allocate (to exercise the out-of-memory path)
    #[arg(long, value_name = "BYTES", hide = true)]
    memory_limit: Option<u64>,
    /// Skips a case whose time, predicted from the method's last measured length and its
    /// cost, exceeds this many seconds (exact softmax at 1M tokens would take hours)
    #[arg(long, value_name = "SECONDS", default_value_t = 120.0, value_parser = positive_seconds, allow_hyphen_values = true)]
    max_seconds: f64,
    /// Also write the charts (time, extra memory, error against sequence length) as SVG
    /// files into this directory
    #[arg(long, value_name = "DIR")]
    plot: Option<PathBuf>,
    /// Where to compute: the CPU, or the first NVIDIA GPU (methods that do not run there
    /// yet are skipped)
    #[arg(long, value_enum, default_value_t = Device::Cpu)]
    device: Device,
    /// With --device cuda: the element type of the tensors on the GPU
    #[arg(long, value_enum, default_value_t = GpuDtype::Bf16)]
    gpu_dtype: GpuDtype,
}

/// Seeds of q, k and v: every method sees the same inputs.
const INPUT_SEEDS: [u64; 3] = [1, 2, 3];
/// Seed of performer's features and linformer's projections.
const METHOD_SEED: u64 = 0;
/// Largest batch · heads · seq² · dim for which exact f64 softmax is computed for
/// rel_err: about a minute of f64 work on a small machine.
const REFERENCE_WORK_LIMIT: u128 = 1 << 33;

/// The options of the methods that have any, as `bench` and `explore` take them.
#[derive(Clone, Debug, Args, PartialEq)]
pub struct MethodSettings {
    /// performer: number of random features
    #[arg(long, value_name = "M", default_value_t = DEFAULT_FEATURES)]
    pub features: usize,
    /// linformer: projected length k
    #[arg(long, value_name = "K", default_value_t = 256)]
    pub k_proj: usize,
    /// window, hybrid: keys seen before and after each query; -1 is unbounded
    #[arg(long, value_name = "L,R", default_value = "256,256", value_parser = parse_window, allow_hyphen_values = true)]
    pub window: WindowSpan,
    /// hybrid: how many leading heads use the window [default: heads / 2]
    #[arg(long, value_name = "N")]
    pub local_heads: Option<usize>,
    /// linear, performer, cosformer, hybrid: tokens per chunk of the causal form
    #[arg(long, default_value_t = DEFAULT_CHUNK)]
    pub chunk: usize,
}

impl MethodSettings {
    /// Performer with `features`, Linformer projecting to `k_proj`, windows of `window`
    /// keys before each query and as many after it (none when `causal`), the default
    /// chunk: the options the explorer's page sets.
    pub fn symmetric(features: usize, k_proj: usize, window: usize, causal: bool) -> Self {
        Self {
            features,
            k_proj,
            window: WindowSpan {
                left: Some(window),
                right: Some(if causal { 0 } else { window }),
            },
            local_heads: None,
            chunk: DEFAULT_CHUNK,
        }
    }

    /// `method` at sequence length `seq` with `heads` heads of `dim` dims.
    pub fn method(&self, method: MethodName, seq: usize, dim: usize, heads: usize) -> Method {
        let mut options = MethodOptions::new(dim, seq);
        let takes = |name: &str| method.info().options.iter().any(|o| o.name == name);
        let values = [
            ("features", self.features.to_string()),
            ("k-proj", self.k_proj.to_string()),
            ("window", self.window.to_string()),
            (
                "local-heads",
                self.local_heads.unwrap_or(heads / 2).to_string(),
            ),
            ("chunk", self.chunk.to_string()),
            ("seed", METHOD_SEED.to_string()),
            // The delta rule on keys of unit length, as DeltaNet layers give it: random
            // keys of length √d make I − β k kᵀ expand the state until it overflows.
            ("l2norm-qk", "true".to_string()),
        ];
        for (name, value) in values {
            if takes(name) {
                options.set(name, value);
            }
        }
        // The settings are typed and give every option a method requires.
        Method::from_options(method.name(), &options)
            .expect("the settings give every method what it needs")
    }
}

impl BenchArgs {
    /// The methods asked for, every one when `--methods` is left out.
    fn methods(&self) -> Vec<MethodName> {
        self.methods.clone().unwrap_or_else(MethodName::all)
    }

    fn method(&self, method: MethodName, seq: usize) -> Method {
        self.settings.method(method, seq, self.dim, self.heads)
    }

    /// The point of the sweep `method` at `seq` with elements of type `dtype`.
    fn case(&self, method: MethodName, seq: usize, dtype: &'static str) -> Case {
        Case {
            method: method.name(),
            gate: Gate::of(method.info(), self.gate),
            causal: self.causal,
            batch: self.batch,
            seq,
            heads: self.heads,
            dim: self.dim,
            dtype,
        }
    }

    /// `method` with the sweep's causality and memory cap.
    fn attention(&self, method: Method) -> Attention {
        let attention = Attention::new(method).causal(self.causal);
        match self.memory_limit {
            Some(limit) => attention.memory_limit(limit),
            None => attention,
        }
    }
}

/// A count that must be at least 1 (clap value parser): a length, batch, heads or dim.
pub fn positive(text: &str) -> Result<usize, String> {
    match text.trim().parse::<usize>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(_) => Err(format!("{text:?} is not a whole number of at least 1")),
    }
}

/// A time limit in seconds: finite and above zero (clap value parser).
pub fn positive_seconds(text: &str) -> Result<f64, String> {
    match text.trim().parse::<f64>() {
        Ok(x) if x.is_finite() && x > 0.0 => Ok(x),
        _ => Err(format!("{text:?} is not a number of seconds above 0")),
    }
}

impl BenchArgs {
    /// Refuses, before anything is measured, what `run` would refuse: options no method
    /// accepts (a chunk or feature count of 0, more local heads than heads, a gate for
    /// methods that read none), and a `--plot` directory that cannot be written. A method
    /// that has no form for the sweep (no causal form, say) is not an error: its cases are
    /// skipped with the reason.
    fn validate(&self) -> Result<(), CliError> {
        gates::check_read(self.gate, &self.methods())?;
        if let Some(local) = self.settings.local_heads
            && local > self.heads
        {
            return Err(CliError::Usage(format!(
                "--local-heads {local} is more than the {} heads",
                self.heads
            )));
        }
        for &seq in &self.seq {
            let shape = [self.batch, seq, self.heads, self.dim];
            for method in self.methods() {
                match self
                    .attention(self.method(method, seq))
                    .output_shape(shape, shape, shape)
                {
                    Ok(_) | Err(linattn::Error::CausalUnsupported { .. }) => {}
                    Err(error) => {
                        return Err(CliError::Usage(format!(
                            "{} at seq {seq}: {error}",
                            method.name()
                        )));
                    }
                }
            }
        }
        if let Some(dir) = &self.plot {
            crate::plot::prepare_directory(dir)?;
        }
        Ok(())
    }
}

/// Runs `linattn bench`.
pub fn bench(args: &BenchArgs) -> Result<(), CliError> {
    args.validate()?;
    let (mut records, ceilings, gpu_header) = if args.device == Device::Cuda {
        let (records, header) = gpu_sweep(args)?;
        (records, None, Some(header))
    } else {
        eprintln!("bench: measuring this machine's copy bandwidth and matmul rate ...");
        let ceilings = Ceilings::measure();
        let records = match args.dtype {
            Dtype::F32 => sweep::<f32>(args, &ceilings),
            Dtype::F64 => sweep::<f64>(args, &ceilings),
        };
        (records, Some(ceilings), None)
    };
    report::fit_exponents(&mut records);
    let mut stdout = io::stdout().lock();
    if args.json {
        if let Some(ceilings) = ceilings {
            records
                .iter_mut()
                .for_each(|r| r.ceilings = Some(ceilings.into()));
        }
        report::write_json(&records, &mut stdout).map_err(CliError::Stdout)?;
    } else {
        gpu_header
            .map_or(Ok(()), |header| writeln!(stdout, "{header}"))
            .and_then(|()| report::write_table(&records, ceilings, &mut stdout))
            .map_err(CliError::Stdout)?;
    }
    drop(stdout);
    // After the table: a chart that cannot be written loses the charts, not the figures.
    if let Some(dir) = &args.plot {
        crate::plot::write_charts(&records, dir)?;
    }
    if records.iter().all(|record| record.skipped.is_some()) {
        return Err(CliError::Usage(
            "every case was skipped (the reasons are in the table); nothing was measured".into(),
        ));
    }
    Ok(())
}

/// Every (seq, method) case, in order; a case that fails becomes a skipped record so
/// that one method's limits never end the sweep.
fn sweep<T: Element>(args: &BenchArgs, ceilings: &Ceilings) -> Vec<Record> {
    let methods = args.methods();
    let mut records = Vec::new();
    // Per method: the flops and seconds of its last measured length.
    let mut last_measured: HashMap<MethodName, (f64, f64)> = HashMap::new();
    let progress = progress_bar(args.seq.len() * methods.len());
    let log = |line: String| progress.suspend(|| eprintln!("{line}"));
    for &seq in &args.seq {
        let case = |method: MethodName| args.case(method, seq, T::NAME);
        let [q, k, v] = match random_inputs::<T>([args.batch, seq, args.heads, args.dim]) {
            Ok(inputs) => inputs,
            Err(error) => {
                log(format!("bench: no inputs at seq {seq}: {error}"));
                progress.inc(methods.len() as u64);
                records.extend(
                    methods
                        .iter()
                        .map(|&m| Record::skipped(case(m), error.to_string())),
                );
                continue;
            }
        };
        // Computed on the first measured method and shared by the rest.
        let exact = OnceCell::new();
        for &method in &methods {
            let label = format!("bench: {:<13} seq {seq:>6} ...", method.name());
            progress.set_message(label.clone());
            progress.inc(1);
            let attention = args.attention(args.method(method, seq));
            let flops = attention
                .cost(q.shape(), k.shape(), v.shape(), size_of::<T>())
                .map_or(0.0, |cost| cost.flops);
            if let Some(reason) = too_slow(last_measured.get(&method), flops, args.max_seconds) {
                log(format!("{label} skipped: {reason}"));
                records.push(Record::skipped(case(method), reason));
                continue;
            }
            let record = match measure(&attention, args.gate, &q, &k, &v) {
                Ok(measured) => {
                    last_measured.insert(method, (flops, measured.median.as_secs_f64()));
                    log(format!(
                        "{label} {:.3} ms (median of {})",
                        measured.median.as_secs_f64() * 1e3,
                        measured.runs
                    ));
                    let rel_err = exact
                        .get_or_init(|| reference(args, &q, &k, &v))
                        .as_ref()
                        .and_then(|exact| measured.output.relative_error(exact));
                    let floor = attention
                        .cost(q.shape(), k.shape(), v.shape(), size_of::<T>())
                        .ok()
                        .map(|cost| Duration::from_secs_f64(cost.floor_seconds(ceilings)));
                    Record::measured(
                        case(method),
                        measured.median,
                        measured.runs,
                        measured.extra_bytes,
                        rel_err,
                        floor,
                    )
                }
                Err(error) => {
                    log(format!("{label} skipped: {error}"));
                    Record::skipped(case(method), error.to_string())
                }
            };
            records.push(record);
        }
    }
    progress.finish_and_clear();
    records
}

/// A bar of `cases` steps on stderr, drawn only when stderr is a terminal.
fn progress_bar(cases: usize) -> ProgressBar {
    let bar = ProgressBar::new(cases as u64);
    if let Ok(style) = ProgressStyle::with_template("{bar:30} {pos}/{len} cases, {elapsed} {msg}") {
        bar.set_style(style);
    }
    bar
}

/// `bench --device cuda`: the same sweep on the GPU, its floor the inputs and output
/// moved once at the device's copy bandwidth measured in the same run. Returns the
/// records and the lines that say so above the table.
fn gpu_sweep(args: &BenchArgs) -> Result<(Vec<Record>, String), CliError> {
    if args.dtype != Dtype::F32 {
        return Err(CliError::Usage(
            "--dtype is the CPU's precision; on the GPU use --gpu-dtype".into(),
        ));
    }
    eprintln!("bench: opening the GPU and measuring its copy bandwidth ...");
    let gpu = gpu::Bench::open()?;
    let mut records = Vec::new();
    for &seq in &args.seq {
        let case = |method: MethodName| args.case(method, seq, args.gpu_dtype.name());
        let [q, k, v] = random_inputs::<f32>([args.batch, seq, args.heads, args.dim])?;
        let exact = OnceCell::new();
        for method in args.methods() {
            eprint!("bench: {:<13} seq {seq:>6} on the GPU ... ", method.name());
            let attention = args.attention(args.method(method, seq));
            let shape = q.shape();
            let measured = attention
                .supports(shape, shape, shape, linattn::Device::Cuda)
                .map_err(CliError::from)
                .and_then(|()| {
                    let call = (args.gpu_dtype, args.gate);
                    gpu.measure(case(method), &attention, [&q, &k, &v], call)
                });
            match measured {
                Ok((mut record, output)) => {
                    eprintln!("{:.3} ms", record.median_ms.unwrap_or(f64::NAN));
                    record.rel_err = exact
                        .get_or_init(|| reference(args, &q, &k, &v))
                        .as_ref()
                        .and_then(|exact| output.relative_error(exact));
                    records.push(record);
                }
                Err(error) => {
                    eprintln!("skipped: {error}");
                    records.push(Record::skipped(case(method), error.to_string()));
                }
            }
        }
    }
    let header = format!(
        "ceiling (measured now on {}): device copy {:.1} GB/s (read + write)\n\
         floor = inputs and output moved once at that bandwidth; times are medians of GPU time\n",
        gpu.name(),
        gpu.copy_bytes_per_second / 1e9
    );
    Ok((records, header))
}

/// Why a case of `flops` should be skipped, if its time predicted from the method's
/// last measured (flops, seconds) exceeds `max_seconds`.
pub fn too_slow(last: Option<&(f64, f64)>, flops: f64, max_seconds: f64) -> Option<String> {
    let &(last_flops, last_seconds) = last?;
    let predicted = last_seconds * flops / last_flops;
    (predicted > max_seconds).then(|| {
        format!(
            "predicted {predicted:.0} s from the last length, over the limit of {max_seconds} s"
        )
    })
}

pub fn random_inputs<T: Element>(shape: [usize; 4]) -> linattn::Result<[Tensor<T>; 3]> {
    let [q, k, v] = INPUT_SEEDS;
    Ok([
        Tensor::randn(shape, q)?,
        Tensor::randn(shape, k)?,
        Tensor::randn(shape, v)?,
    ])
}

/// Exact softmax in f64 (by the library's tiled kernel) of the problem `softmax`
/// describes, for the error figures: `None` where it would cost more than
/// `REFERENCE_WORK_LIMIT`, else its result.
pub fn exact_softmax<T: Element>(
    softmax: &Attention,
    q: &Tensor<T>,
    k: &Tensor<T>,
    v: &Tensor<T>,
) -> Option<linattn::Result<Tensor<f64>>> {
    let [batch, seq, heads, dim] = q.shape();
    let work = batch as u128 * heads as u128 * (seq as u128).pow(2) * dim as u128;
    (work <= REFERENCE_WORK_LIMIT).then(|| softmax.forward(&q.cast(), &k.cast(), &v.cast()))
}

/// [`exact_softmax`] for the sweep, saying on stderr what it computes or why it fails.
fn reference<T: Element>(
    args: &BenchArgs,
    q: &Tensor<T>,
    k: &Tensor<T>,
    v: &Tensor<T>,
) -> Option<Tensor<f64>> {
    let seq = q.seq_len();
    match exact_softmax(&args.attention(Method::softmax()), q, k, v)? {
        Ok(exact) => {
            eprintln!("bench: exact f64 softmax at seq {seq} for rel_err");
            Some(exact)
        }
        Err(error) => {
            eprintln!("bench: no rel_err at seq {seq}: {error}");
            None
        }
    }
}
