//! `linattn bench`: methods over a sweep of sequence lengths, each timed, its extra
//! memory counted and its output compared with exact f64 softmax.

use crate::dtype::Dtype;
use crate::error::CliError;
use crate::measure::measure;
use crate::report::{self, Case, Record};
use crate::window_span::{WindowSpan, parse_window};
use clap::{Args, ValueEnum};
use linattn::{
    Attention, Ceilings, Cosformer, DEFAULT_CHUNK, DEFAULT_FEATURES, Element, Fnet, GlobalHeads,
    Hybrid, Linear, Linformer, Method, Performer, Softmax, SoftmaxAlgorithm, Tensor,
};
use std::cell::OnceCell;
use std::io;
use std::time::Duration;

/// The methods `bench` measures, as `--methods` spells them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum BenchMethod {
    /// Exact softmax, tiled.
    Softmax,
    /// Exact softmax with the whole score matrix in memory.
    SoftmaxNaive,
    /// Exact softmax over a sliding window.
    Window,
    /// Linear Transformer.
    Linear,
    /// Performer.
    Performer,
    /// cosFormer.
    Cosformer,
    /// Linformer.
    Linformer,
    /// FNet.
    Fnet,
    /// Window heads beside linear heads.
    Hybrid,
}

impl BenchMethod {
    fn name(self) -> &'static str {
        match self {
            BenchMethod::Softmax => "softmax",
            BenchMethod::SoftmaxNaive => "softmax-naive",
            BenchMethod::Window => "window",
            BenchMethod::Linear => "linear",
            BenchMethod::Performer => "performer",
            BenchMethod::Cosformer => "cosformer",
            BenchMethod::Linformer => "linformer",
            BenchMethod::Fnet => "fnet",
            BenchMethod::Hybrid => "hybrid",
        }
    }
}

/// Arguments of `linattn bench`.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Methods to measure, comma-separated [default: all]
    #[arg(long, value_enum, value_delimiter = ',')]
    methods: Option<Vec<BenchMethod>>,
    /// Sequence lengths, comma-separated
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "1024,2048,4096,8192,16384,32768,65536"
    )]
    seq: Vec<usize>,
    /// Batch size
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Heads of q, k and v
    #[arg(long, default_value_t = 8)]
    heads: usize,
    /// Head dimension
    #[arg(long, default_value_t = 64)]
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
    /// performer: number of random features
    #[arg(long, value_name = "M", default_value_t = DEFAULT_FEATURES)]
    features: usize,
    /// linformer: projected length k
    #[arg(long, value_name = "K", default_value_t = 256)]
    k_proj: usize,
    /// window, hybrid: keys seen before and after each query; -1 is unbounded
    #[arg(long, value_name = "L,R", default_value = "256,256", value_parser = parse_window, allow_hyphen_values = true)]
    window: WindowSpan,
    /// hybrid: how many leading heads use the window [default: heads / 2]
    #[arg(long, value_name = "N")]
    local_heads: Option<usize>,
    /// linear, performer, cosformer, hybrid: tokens per chunk of the causal form
    #[arg(long, default_value_t = DEFAULT_CHUNK)]
    chunk: usize,
    /// Caps the bytes each call may allocate (to exercise the out-of-memory path)
    #[arg(long, value_name = "BYTES", hide = true)]
    memory_limit: Option<u64>,
}

/// Seeds of q, k and v: every method sees the same inputs.
const INPUT_SEEDS: [u64; 3] = [1, 2, 3];
/// Seed of performer's features and linformer's projections.
const METHOD_SEED: u64 = 0;
/// Largest batch · heads · seq² · dim for which exact f64 softmax is computed for
/// rel_err: about a minute of f64 work on a small machine.
const REFERENCE_WORK_LIMIT: u128 = 1 << 33;

impl BenchArgs {
    fn method(&self, method: BenchMethod, seq: usize) -> Method {
        let chunk = self.chunk;
        match method {
            BenchMethod::Softmax => Method::softmax(),
            BenchMethod::SoftmaxNaive => Method::Softmax(Softmax {
                algorithm: SoftmaxAlgorithm::Naive,
                ..Softmax::default()
            }),
            BenchMethod::Window => Method::Window(self.window.window(None)),
            BenchMethod::Linear => Method::Linear(Linear { chunk }),
            BenchMethod::Performer => Method::Performer(Performer {
                chunk,
                ..Performer::new(self.features, METHOD_SEED)
            }),
            BenchMethod::Cosformer => Method::Cosformer(Cosformer {
                chunk,
                ..Cosformer::default()
            }),
            BenchMethod::Linformer => {
                Method::Linformer(Linformer::new(seq, self.k_proj, METHOD_SEED))
            }
            BenchMethod::Fnet => Method::Fnet(Fnet),
            BenchMethod::Hybrid => Method::Hybrid(Hybrid {
                local_heads: self.local_heads.unwrap_or(self.heads / 2),
                window: self.window.window(None),
                global: GlobalHeads::Linear(Linear { chunk }),
            }),
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

/// Runs `linattn bench`.
pub fn bench(args: &BenchArgs) -> Result<(), CliError> {
    eprintln!("bench: measuring this machine's copy bandwidth and matmul rate ...");
    let ceilings = Ceilings::measure();
    let mut records = match args.dtype {
        Dtype::F32 => sweep::<f32>(args, &ceilings),
        Dtype::F64 => sweep::<f64>(args, &ceilings),
    };
    report::fit_exponents(&mut records);
    let stdout = io::stdout().lock();
    if args.json {
        records
            .iter_mut()
            .for_each(|r| r.ceilings = Some(ceilings.into()));
        report::write_json(&records, stdout)
    } else {
        report::write_table(&records, Some(ceilings), stdout)
    }
    .map_err(CliError::Stdout)
}

/// Every (seq, method) case, in order; a case that fails becomes a skipped record so
/// that one method's limits never end the sweep.
fn sweep<T: Element>(args: &BenchArgs, ceilings: &Ceilings) -> Vec<Record> {
    let methods = args
        .methods
        .clone()
        .unwrap_or_else(|| BenchMethod::value_variants().to_vec());
    let mut records = Vec::new();
    for &seq in &args.seq {
        let case = |method: BenchMethod| Case {
            method: method.name(),
            causal: args.causal,
            batch: args.batch,
            seq,
            heads: args.heads,
            dim: args.dim,
            dtype: T::NAME,
        };
        let [q, k, v] = match random_inputs::<T>([args.batch, seq, args.heads, args.dim]) {
            Ok(inputs) => inputs,
            Err(error) => {
                eprintln!("bench: no inputs at seq {seq}: {error}");
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
            eprint!("bench: {:<13} seq {seq:>6} ... ", method.name());
            let attention = args.attention(args.method(method, seq));
            let record = match measure(&attention, &q, &k, &v) {
                Ok(measured) => {
                    eprintln!(
                        "{:.3} ms (median of {})",
                        measured.median.as_secs_f64() * 1e3,
                        measured.runs
                    );
                    let rel_err = exact
                        .get_or_init(|| exact_softmax(args, &q, &k, &v))
                        .as_ref()
                        .and_then(|exact| relative_error(&measured.output, exact));
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
                    eprintln!("skipped: {error}");
                    Record::skipped(case(method), error.to_string())
                }
            };
            records.push(record);
        }
    }
    records
}

fn random_inputs<T: Element>(shape: [usize; 4]) -> linattn::Result<[Tensor<T>; 3]> {
    let [q, k, v] = INPUT_SEEDS;
    Ok([
        Tensor::randn(shape, q)?,
        Tensor::randn(shape, k)?,
        Tensor::randn(shape, v)?,
    ])
}

/// Exact softmax attention in f64 by the library's tiled kernel, where affordable.
fn exact_softmax<T: Element>(
    args: &BenchArgs,
    q: &Tensor<T>,
    k: &Tensor<T>,
    v: &Tensor<T>,
) -> Option<Tensor<f64>> {
    let [batch, seq, heads, dim] = q.shape();
    let work = batch as u128 * heads as u128 * (seq as u128).pow(2) * dim as u128;
    if work > REFERENCE_WORK_LIMIT {
        return None;
    }
    eprintln!("bench: exact f64 softmax at seq {seq} for rel_err");
    let attention = args.attention(Method::softmax());
    match attention.forward(&q.cast(), &k.cast(), &v.cast()) {
        Ok(exact) => Some(exact),
        Err(error) => {
            eprintln!("bench: no rel_err at seq {seq}: {error}");
            None
        }
    }
}

/// ‖output − exact‖ / ‖exact‖ in the Frobenius norm; `None` when the shapes differ.
fn relative_error<T: Element>(output: &Tensor<T>, exact: &Tensor<f64>) -> Option<f64> {
    if output.shape() != exact.shape() {
        return None;
    }
    let (difference, norm) = output
        .as_slice()
        .iter()
        .zip(exact.as_slice())
        .fold((0.0, 0.0), |(difference, norm), (&o, &e)| {
            (difference + (o.as_f64() - e).powi(2), norm + e * e)
        });
    Some((difference / norm).sqrt())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_error_is_frobenius() {
        let exact = Tensor::from_vec(vec![3.0, 4.0], [1, 1, 1, 2]).unwrap();
        let output = Tensor::from_vec(vec![3.0f32, 3.0], [1, 1, 1, 2]).unwrap();
        assert_eq!(relative_error(&output, &exact), Some(0.2));
        let other = Tensor::from_vec(vec![3.0f32, 3.0], [1, 2, 1, 1]).unwrap();
        assert_eq!(relative_error(&other, &exact), None);
    }
}
