//! Benchmark records and their two renderings: one JSON array for programs, a table for
//! people.
//!
//! The table is written as sections in order (the rows, then a note per skipped case),
//! and its columns are one list: measured machine ceilings are meant to become one more
//! section before the rows, and a fraction-of-floor figure one more column.

use crate::gates::{self, Gate};
use crate::table::{self, Align};
use linattn::ByteSize;
use serde::Serialize;
use std::io::{self, Write};
use std::time::Duration;

/// One point of the sweep: which method on which problem.
#[derive(Clone, Debug, Serialize)]
pub struct Case {
    /// The method as `--methods` spells it.
    pub method: &'static str,
    /// The gate its random g was drawn with, for a method that reads g (`null` for the
    /// others).
    pub gate: Option<Gate>,
    /// Whether the attention is causal.
    pub causal: bool,
    /// Batch size.
    pub batch: usize,
    /// Sequence length of q, k and v.
    pub seq: usize,
    /// Heads of q, k and v.
    pub heads: usize,
    /// Head dimension.
    pub dim: usize,
    /// Element type (`float32`, `float64`).
    pub dtype: &'static str,
}

impl Case {
    /// The method as the table names it, with its gate: `gla (channel gate)`.
    pub fn label(&self) -> String {
        gates::label(self.method, self.gate)
    }
}

/// What was measured for a [`Case`], or why it was skipped; `None` is JSON `null`.
#[derive(Clone, Debug, Serialize)]
pub struct Record {
    /// The point of the sweep.
    #[serde(flatten)]
    pub case: Case,
    /// Median time of one call, in milliseconds.
    pub median_ms: Option<f64>,
    /// Number of timed calls.
    pub runs: Option<usize>,
    /// batch · seq tokens per second of the median call.
    pub tokens_per_s: Option<f64>,
    /// Peak bytes a call allocated beyond its inputs and output.
    pub extra_bytes: Option<u64>,
    /// ‖o − o_exact‖ / ‖o_exact‖ (Frobenius) against exact f64 softmax, where affordable.
    pub rel_err: Option<f64>,
    /// The least time this call can take on this machine (see [`linattn::Cost`]).
    pub floor_ms: Option<f64>,
    /// `floor_ms / median_ms`: 1 is the machine's limit.
    pub fraction_of_floor: Option<f64>,
    /// The exponent e of the fit time ∝ seqᵉ over this method's measured lengths.
    pub time_exponent: Option<f64>,
    /// The ceilings the floor was computed from, measured in the same run.
    #[serde(flatten)]
    pub ceilings: Option<CeilingsRecord>,
    /// Why the case was not measured.
    pub skipped: Option<String>,
}

/// The machine's ceilings as records carry them.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct CeilingsRecord {
    /// Parallel copy bandwidth, bytes read plus bytes written per second.
    pub copy_bytes_per_s: f64,
    /// f32 matrix-product rate with every thread.
    pub matmul_flops_per_s: f64,
}

impl From<linattn::Ceilings> for CeilingsRecord {
    fn from(c: linattn::Ceilings) -> Self {
        Self {
            copy_bytes_per_s: c.copy_bytes_per_second,
            matmul_flops_per_s: c.matmul_flops_per_second,
        }
    }
}

impl Record {
    /// A measured case.
    pub fn measured(
        case: Case,
        median: Duration,
        runs: usize,
        extra_bytes: usize,
        rel_err: Option<f64>,
        floor: Option<Duration>,
    ) -> Self {
        let seconds = median.as_secs_f64();
        Self {
            median_ms: Some(seconds * 1e3),
            runs: Some(runs),
            tokens_per_s: Some((case.batch * case.seq) as f64 / seconds),
            extra_bytes: Some(extra_bytes as u64),
            rel_err,
            floor_ms: floor.map(|f| f.as_secs_f64() * 1e3),
            fraction_of_floor: floor.map(|f| f.as_secs_f64() / seconds),
            time_exponent: None,
            ceilings: None,
            skipped: None,
            case,
        }
    }

    /// A case the method rejected or that did not fit in memory.
    pub fn skipped(case: Case, reason: String) -> Self {
        Self {
            case,
            median_ms: None,
            runs: None,
            tokens_per_s: None,
            extra_bytes: None,
            rel_err: None,
            floor_ms: None,
            fraction_of_floor: None,
            time_exponent: None,
            ceilings: None,
            skipped: Some(reason),
        }
    }
}

/// Fills each record's `time_exponent`: the slope of ln(time) against ln(seq) over the
/// measured lengths of its method and causality (least squares; two lengths at least).
pub fn fit_exponents(records: &mut [Record]) {
    let keys: Vec<(&'static str, bool)> = records
        .iter()
        .map(|r| (r.case.method, r.case.causal))
        .collect();
    for (method, causal) in keys {
        let points: Vec<(f64, f64)> = records
            .iter()
            .filter(|r| r.case.method == method && r.case.causal == causal)
            .filter_map(|r| Some(((r.case.seq as f64).ln(), r.median_ms?.ln())))
            .collect();
        let exponent = slope(&points);
        for record in records
            .iter_mut()
            .filter(|r| r.case.method == method && r.case.causal == causal)
        {
            record.time_exponent = exponent;
        }
    }
}

/// Least-squares slope of y on x; `None` below two distinct x.
fn slope(points: &[(f64, f64)]) -> Option<f64> {
    let n = points.len() as f64;
    let (mean_x, mean_y) = points
        .iter()
        .fold((0.0, 0.0), |(a, b), &(x, y)| (a + x / n, b + y / n));
    let (covariance, variance) = points.iter().fold((0.0, 0.0), |(c, v), &(x, y)| {
        (c + (x - mean_x) * (y - mean_y), v + (x - mean_x).powi(2))
    });
    (points.len() >= 2 && variance > 0.0).then(|| covariance / variance)
}

/// Writes the records as one JSON array on one line.
pub fn write_json(records: &[Record], mut out: impl Write) -> io::Result<()> {
    serde_json::to_writer(&mut out, records)?;
    writeln!(out)
}

/// One column of the table: its header and how a record fills its cell.
struct Column {
    header: &'static str,
    align: Align,
    cell: fn(&Record) -> String,
}

/// Written where a skipped case has no value.
const NONE: &str = "-";

const COLUMNS: &[Column] = &[
    Column {
        header: "method",
        align: Align::Left,
        cell: |r| r.case.label(),
    },
    Column {
        header: "causal",
        align: Align::Left,
        cell: |r| if r.case.causal { "yes" } else { "no" }.to_string(),
    },
    Column {
        header: "batch",
        align: Align::Right,
        cell: |r| r.case.batch.to_string(),
    },
    Column {
        header: "seq",
        align: Align::Right,
        cell: |r| r.case.seq.to_string(),
    },
    Column {
        header: "heads",
        align: Align::Right,
        cell: |r| r.case.heads.to_string(),
    },
    Column {
        header: "dim",
        align: Align::Right,
        cell: |r| r.case.dim.to_string(),
    },
    Column {
        header: "median_ms",
        align: Align::Right,
        cell: |r| match (r.median_ms, &r.skipped) {
            (Some(ms), _) => format!("{ms:.3}"),
            (None, Some(_)) => "skipped".to_string(),
            (None, None) => NONE.to_string(),
        },
    },
    Column {
        header: "tokens/s",
        align: Align::Right,
        cell: |r| r.tokens_per_s.map_or(NONE.to_string(), si),
    },
    Column {
        header: "extra memory",
        align: Align::Right,
        cell: |r| {
            r.extra_bytes
                .map_or(NONE.to_string(), |b| ByteSize(b as u128).to_string())
        },
    },
    Column {
        header: "rel_err",
        align: Align::Right,
        cell: |r| r.rel_err.map_or(NONE.to_string(), |e| format!("{e:.2e}")),
    },
    Column {
        header: "floor_ms",
        align: Align::Right,
        cell: |r| r.floor_ms.map_or(NONE.to_string(), |f| format!("{f:.3}")),
    },
    Column {
        header: "of floor",
        align: Align::Right,
        cell: |r| {
            r.fraction_of_floor
                .map_or(NONE.to_string(), |f| format!("{f:.2}"))
        },
    },
];

/// A count with an SI prefix: 1.23M.
fn si(value: f64) -> String {
    [(1e9, "G"), (1e6, "M"), (1e3, "k")]
        .into_iter()
        .find(|&(scale, _)| value >= scale)
        .map_or_else(
            || format!("{value:.0}"),
            |(scale, prefix)| format!("{:.2}{prefix}", value / scale),
        )
}

/// Writes the table for people: the ceilings, one row per record, how time grows with
/// the sequence for each method, then why each skipped case was skipped.
pub fn write_table(
    records: &[Record],
    ceilings: Option<linattn::Ceilings>,
    mut out: impl Write,
) -> io::Result<()> {
    if let Some(c) = ceilings {
        writeln!(
            out,
            "ceilings (measured now): memory copy {:.1} GB/s (read + write), f32 matmul {:.1} GFLOP/s",
            c.copy_bytes_per_second / 1e9,
            c.matmul_flops_per_second / 1e9
        )?;
        writeln!(
            out,
            "floor = max(bytes / copy bandwidth, flops / matmul rate); times are medians of \
             forward_into an output allocated once"
        )?;
        writeln!(out)?;
    }
    write_rows(records, &mut out)?;
    write_exponents(records, &mut out)?;
    write_skip_notes(records, &mut out)
}

fn write_exponents(records: &[Record], out: &mut impl Write) -> io::Result<()> {
    let mut seen: Vec<(&str, bool)> = Vec::new();
    for record in records {
        let key = (record.case.method, record.case.causal);
        if seen.contains(&key) {
            continue;
        }
        seen.push(key);
        if let Some(exponent) = record.time_exponent {
            if seen.len() == 1 {
                writeln!(out)?;
            }
            let causal = if key.1 { " (causal)" } else { "" };
            let label = record.case.label();
            writeln!(out, "time ∝ seq^{exponent:.2} for {label}{causal}")?;
        }
    }
    Ok(())
}

fn write_rows(records: &[Record], out: &mut impl Write) -> io::Result<()> {
    let headers: Vec<(&str, Align)> = COLUMNS.iter().map(|c| (c.header, c.align)).collect();
    let rows: Vec<Vec<String>> = records
        .iter()
        .map(|record| COLUMNS.iter().map(|c| (c.cell)(record)).collect())
        .collect();
    table::write(out, &headers, &rows)
}

fn write_skip_notes(records: &[Record], out: &mut impl Write) -> io::Result<()> {
    let skipped: Vec<(&Case, &String)> = records
        .iter()
        .filter_map(|r| Some((&r.case, r.skipped.as_ref()?)))
        .collect();
    if !skipped.is_empty() {
        writeln!(out)?;
    }
    for (case, reason) in skipped {
        writeln!(
            out,
            "skipped {} at seq {}: {reason}",
            case.label(),
            case.seq
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn case(method: &'static str) -> Case {
        Case {
            method,
            gate: None,
            causal: false,
            batch: 1,
            seq: 1024,
            heads: 8,
            dim: 64,
            dtype: "float32",
        }
    }

    #[test]
    fn table_lines_up_and_explains_skips() {
        let records = [
            Record::measured(
                case("linear"),
                Duration::from_millis(2),
                10,
                3 << 20,
                Some(0.25),
                Some(Duration::from_millis(1)),
            ),
            Record::skipped(case("softmax-naive"), "needs 9 GiB".into()),
        ];
        let mut table = Vec::new();
        write_table(&records, None, &mut table).unwrap();
        let table = String::from_utf8(table).unwrap();
        let lines: Vec<&str> = table.lines().collect();
        assert!(lines[0].starts_with("method"), "{table}");
        assert!(
            lines[2].contains("512.00k") && lines[2].contains("3.00 MiB"),
            "{table}"
        );
        assert!(lines[2].contains("2.50e-1"), "{table}");
        assert!(lines[3].contains("skipped"), "{table}");
        let header_end = lines[0].find("median_ms").unwrap() + "median_ms".len();
        assert_eq!(lines[2].find("2.000").unwrap() + "2.000".len(), header_end);
        assert_eq!(lines[5], "skipped softmax-naive at seq 1024: needs 9 GiB");
    }

    #[test]
    fn exponents_are_least_squares_slopes_in_log_log() {
        let mut records: Vec<Record> = [1024, 2048, 4096]
            .into_iter()
            .map(|seq| {
                let time = Duration::from_secs_f64(1e-9 * (seq as f64).powi(2));
                Record::measured(
                    Case {
                        seq,
                        ..case("softmax")
                    },
                    time,
                    3,
                    0,
                    None,
                    None,
                )
            })
            .collect();
        records.push(Record::skipped(
            Case {
                seq: 8192,
                ..case("softmax")
            },
            "no".into(),
        ));
        fit_exponents(&mut records);
        let exponent = records[0].time_exponent.unwrap();
        assert!((exponent - 2.0).abs() < 1e-9, "{exponent}");
        assert_eq!(slope(&[(1.0, 2.0)]), None);
    }

    #[test]
    fn si_prefixes() {
        assert_eq!(si(999.0), "999");
        assert_eq!(si(1234.0), "1.23k");
        assert_eq!(si(5.5e9), "5.50G");
    }
}
