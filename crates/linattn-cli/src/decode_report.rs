//! What `linattn decode` measured, and its two renderings: one JSON object for programs,
//! tables for people.

use crate::gates::{self, Gate};
use crate::measure::median;
use crate::table::{self, Align};
use linattn::ByteSize;
use serde::Serialize;
use std::io::{self, Write};
use std::time::Duration;

/// The problem every method decoded.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Settings {
    /// Tokens prefilled.
    pub prompt_len: usize,
    /// Tokens generated one at a time.
    pub tokens: usize,
    /// Sequences decoded together.
    pub batch: usize,
    /// Query heads.
    pub heads: usize,
    /// Key and value heads.
    pub kv_heads: usize,
    /// Head dimension.
    pub dim: usize,
    /// Element type (`float32`, `float64`).
    pub dtype: &'static str,
    /// Steps per sample.
    pub every: usize,
}

/// One generated token.
#[derive(Clone, Copy, Debug)]
pub struct Step {
    /// Tokens seen once this one was fed.
    pub context: usize,
    /// Time the step took.
    pub latency: Duration,
    /// `Decoder::memory().state_bytes` after it.
    pub state_bytes: usize,
}

/// A window of steps reduced to one table row.
#[derive(Debug, Serialize)]
pub struct Sample {
    /// Tokens seen at the window's last step.
    pub context: usize,
    /// Median latency of the window's steps, in microseconds.
    pub step_us: f64,
    /// State bytes after the window's last step.
    pub state_bytes: usize,
}

/// How the state's memory behaves as the context grows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Growth {
    /// The same bytes at every length (kernel states, bounded windows).
    Constant,
    /// More bytes with every token (a KV cache).
    Growing,
}

impl Growth {
    fn name(self) -> &'static str {
        match self {
            Growth::Constant => "constant",
            Growth::Growing => "growing",
        }
    }
}

/// One method's decoding at a glance.
#[derive(Debug, Serialize)]
pub struct Summary {
    /// Median latency over all steps, in microseconds.
    pub median_step_us: f64,
    /// State bytes after the last step.
    pub state_bytes: usize,
    /// Bytes each further token adds.
    pub bytes_per_token: usize,
    /// Whether those are zero.
    pub memory: Growth,
}

/// What one method showed, or why it was skipped; `None` is JSON `null`.
#[derive(Debug, Serialize)]
pub struct MethodTrace {
    /// The method as `--method` spells it.
    pub method: &'static str,
    /// The gate its random g was drawn with, for a method that reads g (`null` for the
    /// others).
    pub gate: Option<Gate>,
    /// Time of the prefill, in milliseconds.
    pub prefill_ms: Option<f64>,
    /// One per `every` steps, and one for the last.
    pub samples: Vec<Sample>,
    /// Over all steps.
    pub summary: Option<Summary>,
    /// Why the method did not decode.
    pub skipped: Option<String>,
}

impl MethodTrace {
    /// A method that decoded: its `steps` sampled every `settings.every`.
    pub fn measured(
        method: &'static str,
        prefill: Duration,
        steps: &[Step],
        bytes_per_token: usize,
        settings: &Settings,
    ) -> Self {
        let samples = steps
            .chunks(settings.every)
            .map(|window| {
                let last = window.last().expect("chunks are never empty");
                Sample {
                    context: last.context,
                    step_us: micros(median_latency(window)),
                    state_bytes: last.state_bytes,
                }
            })
            .collect();
        let summary = steps.last().map(|last| Summary {
            median_step_us: micros(median_latency(steps)),
            state_bytes: last.state_bytes,
            bytes_per_token,
            memory: if bytes_per_token == 0 {
                Growth::Constant
            } else {
                Growth::Growing
            },
        });
        Self {
            method,
            gate: None,
            prefill_ms: Some(prefill.as_secs_f64() * 1e3),
            samples,
            summary,
            skipped: None,
        }
    }

    /// The method as the summary names it, with its gate: `gla (channel gate)`.
    pub fn label(&self) -> String {
        gates::label(self.method, self.gate)
    }

    /// A method the library refused.
    pub fn skipped(method: &'static str, reason: String) -> Self {
        Self {
            method,
            gate: None,
            prefill_ms: None,
            samples: Vec::new(),
            summary: None,
            skipped: Some(reason),
        }
    }
}

/// The median latency of `steps`, which must not be empty.
fn median_latency(steps: &[Step]) -> Duration {
    median(&mut steps.iter().map(|s| s.latency).collect::<Vec<_>>())
}

fn micros(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1e6
}

/// Everything `linattn decode` prints.
#[derive(Debug, Serialize)]
pub struct DecodeReport {
    /// The problem.
    #[serde(flatten)]
    pub settings: Settings,
    /// One per method, in the order asked for.
    pub methods: Vec<MethodTrace>,
}

impl DecodeReport {
    /// Writes the report as one JSON object on one line.
    pub fn write_json(&self, mut out: impl Write) -> io::Result<()> {
        serde_json::to_writer(&mut out, self)?;
        writeln!(out)
    }

    /// Writes for people: what was decoded, latency and state memory side by side by
    /// context length, a summary per method, then why each skipped method was skipped.
    pub fn write_tables(&self, mut out: impl Write) -> io::Result<()> {
        let s = &self.settings;
        writeln!(
            out,
            "prompt {} + {} tokens one at a time; batch {}, heads {} (kv {}), dim {}, {}; \
             a row every {} tokens, step_us the median step since the row before",
            s.prompt_len, s.tokens, s.batch, s.heads, s.kv_heads, s.dim, s.dtype, s.every
        )?;
        let measured: Vec<&MethodTrace> = self
            .methods
            .iter()
            .filter(|m| m.skipped.is_none())
            .collect();
        if !measured.is_empty() {
            writeln!(out)?;
            write_samples(&measured, &mut out)?;
            writeln!(out)?;
            write_summary(&measured, &mut out)?;
        }
        let skipped: Vec<(&str, &String)> = self
            .methods
            .iter()
            .filter_map(|m| Some((m.method, m.skipped.as_ref()?)))
            .collect();
        if !skipped.is_empty() {
            writeln!(out)?;
        }
        for (method, reason) in skipped {
            writeln!(out, "skipped {method}: {reason}")?;
        }
        Ok(())
    }
}

/// One row per sampled context length, two columns per method under its name.
fn write_samples(methods: &[&MethodTrace], out: &mut impl Write) -> io::Result<()> {
    let mut headers = vec![("context", Align::Right)];
    for _ in methods {
        headers.extend([("step_us", Align::Right), ("state", Align::Right)]);
    }
    // Every method took the same steps, so their samples line up row by row.
    let rows: Vec<Vec<String>> = (0..methods[0].samples.len())
        .map(|row| {
            let mut cells = vec![methods[0].samples[row].context.to_string()];
            for method in methods {
                let sample = &method.samples[row];
                cells.push(format!("{:.1}", sample.step_us));
                cells.push(ByteSize(sample.state_bytes as u128).to_string());
            }
            cells
        })
        .collect();
    let widths = table::widths(&headers, &rows);
    let mut names = " ".repeat(widths[0]);
    for (method, pair) in methods.iter().zip(widths[1..].chunks(2)) {
        // A method's name is centred over its two columns and the gap between them.
        let span = pair[0] + 2 + pair[1];
        names.push_str(&format!("  {:^span$}", method.method));
    }
    writeln!(out, "{}", names.trim_end())?;
    table::write(out, &headers, &rows)
}

fn write_summary(methods: &[&MethodTrace], out: &mut impl Write) -> io::Result<()> {
    let headers = [
        ("method", Align::Left),
        ("prefill_ms", Align::Right),
        ("median step_us", Align::Right),
        ("state at end", Align::Right),
        ("bytes/token", Align::Right),
        ("memory", Align::Left),
    ];
    let rows: Vec<Vec<String>> = methods
        .iter()
        .filter_map(|m| {
            let summary = m.summary.as_ref()?;
            Some(vec![
                m.label(),
                format!("{:.3}", m.prefill_ms?),
                format!("{:.1}", summary.median_step_us),
                ByteSize(summary.state_bytes as u128).to_string(),
                ByteSize(summary.bytes_per_token as u128).to_string(),
                summary.memory.name().to_string(),
            ])
        })
        .collect();
    table::write(out, &headers, &rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(every: usize) -> Settings {
        Settings {
            prompt_len: 4,
            tokens: 5,
            batch: 1,
            heads: 2,
            kv_heads: 2,
            dim: 8,
            dtype: "float32",
            every,
        }
    }

    fn step(context: usize, micros: u64) -> Step {
        Step {
            context,
            latency: Duration::from_micros(micros),
            state_bytes: 100 * context,
        }
    }

    #[test]
    fn samples_every_k_steps_and_the_last() {
        let steps = [step(5, 9), step(6, 1), step(7, 3), step(8, 5), step(9, 7)];
        let trace = MethodTrace::measured("softmax", Duration::ZERO, &steps, 100, &settings(2));
        let contexts: Vec<usize> = trace.samples.iter().map(|s| s.context).collect();
        assert_eq!(contexts, [6, 8, 9]);
        let latencies: Vec<f64> = trace.samples.iter().map(|s| s.step_us).collect();
        assert_eq!(latencies, [5.0, 4.0, 7.0]);
        let summary = trace.summary.unwrap();
        assert_eq!((summary.median_step_us, summary.state_bytes), (5.0, 900));
        assert_eq!(summary.memory, Growth::Growing);
    }
}
