//! The child side of a sweep: `linattn explore-worker` (hidden) reads one [`Cases`] as
//! JSON on stdin, measures each method at that length in order, and prints one
//! [`Event`] per line on stdout as it goes, so that the server knows which case is
//! running and keeps every result that finished before it stopped the child.

use super::uploads::model_inputs;
use crate::bench::{MethodSettings, exact_softmax, random_inputs};
use crate::error::CliError;
use crate::gates::Gate;
use crate::measure::measure;
use crate::method_options::MethodName;
use crate::npy::{self, Elements};
use linattn::{Attention, ByteSize, Method, Tensor};
use serde::{Deserialize, Serialize};
use std::cell::OnceCell;
use std::io::{Read, Write};
use std::path::PathBuf;

/// Every method of a sweep at one sequence length.
#[derive(Debug, Serialize, Deserialize)]
pub struct Cases {
    pub methods: Vec<MethodName>,
    pub seq: usize,
    pub heads: usize,
    pub dim: usize,
    pub causal: bool,
    pub features: usize,
    pub k_proj: usize,
    pub window: usize,
    /// The gate of gla's and gated-delta-rule's random g (each one's own if `None`).
    pub gate: Option<Gate>,
    pub inputs: Inputs,
    /// Bytes the worker may allocate: inputs, outputs, scratch and the f64 reference.
    pub memory_limit: u64,
}

/// Where q, k and v come from (their first `seq` positions are measured).
#[derive(Debug, Serialize, Deserialize)]
pub enum Inputs {
    Random,
    /// The bundled all-MiniLM-L6-v2 layer.
    Model,
    /// Uploaded tensors, saved as float32 .npy files by the server.
    Files([PathBuf; 3]),
}

/// One line of the worker's output.
#[derive(Debug, Serialize, Deserialize)]
pub enum Event {
    /// The method's case starts now.
    Start(MethodName),
    /// It was measured.
    Measured {
        method: MethodName,
        median_s: f64,
        runs: usize,
        extra_bytes: usize,
        rel_err: Option<f64>,
    },
    /// It could not be: the library refused it, or it did not fit.
    Skipped { method: MethodName, reason: String },
}

/// Runs `linattn explore-worker`.
pub fn work() -> Result<(), CliError> {
    let mut text = String::new();
    std::io::stdin()
        .read_to_string(&mut text)
        .map_err(|source| CliError::Read {
            path: "standard input".into(),
            source,
        })?;
    let cases: Cases = serde_json::from_str(&text)
        .map_err(|e| CliError::Usage(format!("explore-worker takes its cases as JSON: {e}")))?;
    let mut out = std::io::stdout().lock();
    let mut emit = |event: &Event| {
        serde_json::to_writer(&mut out, event)
            .map_err(std::io::Error::from)
            .and_then(|()| writeln!(out))
            .and_then(|()| out.flush())
            .map_err(CliError::Stdout)
    };
    let inputs = match load(&cases) {
        Ok(inputs) => inputs,
        Err(reason) => {
            for &method in &cases.methods {
                emit(&Event::Skipped {
                    method,
                    reason: reason.clone(),
                })?;
            }
            return Ok(());
        }
    };
    let [q, k, v] = &inputs;
    let input_bytes = inputs.iter().map(|t| t.size_bytes() as u64).sum::<u64>();
    if input_bytes > cases.memory_limit {
        for &method in &cases.methods {
            emit(&Event::Skipped {
                method,
                reason: over_budget(input_bytes, cases.memory_limit),
            })?;
        }
        return Ok(());
    }
    let limit = cases.memory_limit - input_bytes;
    let settings =
        MethodSettings::symmetric(cases.features, cases.k_proj, cases.window, cases.causal);
    let exact = OnceCell::new();
    for &method in &cases.methods {
        emit(&Event::Start(method))?;
        let attention = Attention::new(settings.method(method, cases.seq, cases.dim, cases.heads))
            .causal(cases.causal)
            .memory_limit(limit);
        let event = match measure(&attention, cases.gate, q, k, v) {
            Ok(measured) => {
                let output_bytes = measured.output.size_bytes() as u64;
                let rel_err = exact
                    .get_or_init(|| {
                        let softmax = Attention::new(Method::softmax())
                            .causal(cases.causal)
                            .memory_limit(limit.saturating_sub(output_bytes));
                        exact_softmax(&softmax, q, k, v).and_then(Result::ok)
                    })
                    .as_ref()
                    .and_then(|exact| measured.output.relative_error(exact));
                Event::Measured {
                    method,
                    median_s: measured.median.as_secs_f64(),
                    runs: measured.runs,
                    extra_bytes: measured.extra_bytes,
                    rel_err,
                }
            }
            Err(error) => Event::Skipped {
                method,
                reason: error.to_string(),
            },
        };
        emit(&event)?;
    }
    Ok(())
}

/// The first `seq` positions of the inputs the cases name, within the memory limit.
fn load(cases: &Cases) -> Result<[Tensor<f32>; 3], String> {
    let shape = [1, cases.seq, cases.heads, cases.dim];
    let bytes = 3 * shape.iter().product::<usize>() as u64 * 4;
    if bytes > cases.memory_limit {
        return Err(over_budget(bytes, cases.memory_limit));
    }
    let prefixes = |[q, k, v]: [&Tensor<f32>; 3]| -> linattn::Result<[Tensor<f32>; 3]> {
        let seq = cases.seq.min(q.seq_len());
        Ok([
            q.slice_seq(0..seq)?,
            k.slice_seq(0..seq)?,
            v.slice_seq(0..seq)?,
        ])
    };
    let loaded = match &cases.inputs {
        Inputs::Random => random_inputs::<f32>(shape),
        Inputs::Model => {
            let model = model_inputs();
            prefixes([&model.q, &model.k, &model.v])
        }
        Inputs::Files(paths) => {
            let mut tensors = Vec::new();
            for path in paths {
                let array = npy::read(path).map_err(|e| e.to_string())?;
                let shape = array
                    .dims::<4>("an uploaded tensor", "4-D")
                    .map_err(|e| e.to_string())?;
                let Elements::F32(values) = array.elements else {
                    return Err(format!("{} is not float32", path.display()));
                };
                tensors.push(Tensor::from_vec(values, shape).map_err(|e| e.to_string())?);
            }
            prefixes([&tensors[0], &tensors[1], &tensors[2]])
        }
    };
    loaded.map_err(|e| e.to_string())
}

fn over_budget(inputs: u64, budget: u64) -> String {
    format!(
        "inputs of {} are over the server's memory budget of {}",
        ByteSize(inputs as u128),
        ByteSize(budget as u128)
    )
}
