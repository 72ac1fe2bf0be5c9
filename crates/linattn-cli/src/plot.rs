//! `bench --plot DIR`: the explorer's charts as SVG files, one line per method (and
//! causality) against the sequence length on log-log axes.

use crate::error::CliError;
use crate::report::Record;
use plotters::prelude::*;
use std::path::Path;

/// How a chart reads its quantity from a record.
type Quantity = fn(&Record) -> Option<f64>;

/// The quantities charted: file name, axis label, and how to read one from a record.
const CHARTS: [(&str, &str, Quantity); 3] = [
    ("time.svg", "median time (ms)", |r| r.median_ms),
    ("memory.svg", "extra memory (bytes)", |r| {
        r.extra_bytes.map(|b| b as f64)
    }),
    ("error.svg", "error against exact softmax", |r| r.rel_err),
];

/// Writes `time.svg`, `memory.svg` and `error.svg` into `dir` (created if missing).
pub fn write_charts(records: &[Record], dir: &Path) -> Result<(), CliError> {
    prepare_directory(dir)?;
    for (file, label, value) in CHARTS {
        let path = dir.join(file);
        chart(records, &path, label, value).map_err(|error| CliError::Write {
            path: path.clone(),
            source: std::io::Error::other(error.to_string()),
        })?;
    }
    Ok(())
}

/// Creates `dir` if needed and checks that a file can be written there, so that a
/// sweep of many minutes does not end in a chart it cannot save.
pub fn prepare_directory(dir: &Path) -> Result<(), CliError> {
    let write_error = |source| CliError::Write {
        path: dir.to_path_buf(),
        source,
    };
    std::fs::create_dir_all(dir).map_err(write_error)?;
    tempfile::tempfile_in(dir).map(drop).map_err(write_error)
}

/// The (label, points) of each method and causality, positive values only (log axes).
fn series(records: &[Record], value: Quantity) -> Vec<(String, Vec<(f64, f64)>)> {
    let mut lines: Vec<(String, Vec<(f64, f64)>)> = Vec::new();
    for record in records {
        let Some(y) = value(record).filter(|y| *y > 0.0) else {
            continue;
        };
        let mut label = record.case.method.to_string();
        if record.case.causal {
            label.push_str(" (causal)");
        }
        if let Some(exponent) = record.time_exponent {
            label.push_str(&format!(", time ∝ n^{exponent:.2}"));
        }
        let point = (record.case.seq as f64, y);
        match lines.iter_mut().find(|(l, _)| *l == label) {
            Some((_, points)) => points.push(point),
            None => lines.push((label, vec![point])),
        }
    }
    lines
}

/// Every length measured, for the ticks of the x axis.
fn lengths(lines: &[(String, Vec<(f64, f64)>)]) -> Vec<f64> {
    let mut lengths: Vec<f64> = lines
        .iter()
        .flat_map(|(_, p)| p.iter().map(|&(x, _)| x))
        .collect();
    lengths.sort_by(f64::total_cmp);
    lengths.dedup();
    lengths
}

fn chart(
    records: &[Record],
    path: &Path,
    label: &str,
    value: Quantity,
) -> Result<(), Box<dyn std::error::Error>> {
    let lines = series(records, value);
    let points = || lines.iter().flat_map(|(_, p)| p.iter().copied());
    let bounds = |pick: fn((f64, f64)) -> f64| {
        points()
            .map(pick)
            .fold((f64::INFINITY, 0.0f64), |(lo, hi), v| {
                (lo.min(v), hi.max(v))
            })
    };
    let (x_low, x_high) = bounds(|p| p.0);
    let (y_low, y_high) = bounds(|p| p.1);
    let root = SVGBackend::new(path, (900, 540)).into_drawing_area();
    root.fill(&WHITE)?;
    if lines.is_empty() {
        root.titled(&format!("{label}: nothing measured"), ("sans-serif", 20))?;
        return Ok(root.present()?);
    }
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!("{label} against sequence length"),
            ("sans-serif", 22),
        )
        .margin(16)
        .x_label_area_size(48)
        .y_label_area_size(80)
        .build_cartesian_2d(
            (x_low * 0.8..x_high * 1.25)
                .log_scale()
                .with_key_points(lengths(&lines)),
            (y_low * 0.7..y_high * 1.4).log_scale(),
        )?;
    chart
        .configure_mesh()
        .x_desc("sequence length (tokens)")
        .y_desc(label)
        .x_label_formatter(&|&x| tokens(x))
        .y_label_formatter(&|&y| compact(y))
        .light_line_style(BLACK.mix(0.03))
        .draw()?;
    for (index, (name, points)) in lines.iter().enumerate() {
        let color = Palette99::pick(index).to_rgba();
        chart
            .draw_series(LineSeries::new(
                points.iter().copied(),
                color.stroke_width(2),
            ))?
            .label(name.as_str())
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 18, y)], color.stroke_width(2)));
        chart.draw_series(points.iter().map(|&p| Circle::new(p, 3, color.filled())))?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}

/// A token count as people write it: 512, 4k, 1M.
fn tokens(x: f64) -> String {
    match x {
        x if x >= (1 << 20) as f64 => format!("{}M", trimmed(x / (1 << 20) as f64)),
        x if x >= 1024.0 => format!("{}k", trimmed(x / 1024.0)),
        x => trimmed(x),
    }
}

/// A value with about three significant digits, in scientific notation when small or large.
fn compact(y: f64) -> String {
    if (1e-3..1e5).contains(&y.abs()) {
        trimmed(y)
    } else {
        format!("{y:.1e}")
    }
}

fn trimmed(x: f64) -> String {
    let digits = if x.abs() >= 100.0 { 0 } else { 3 };
    let text = format!("{x:.digits$}");
    if text.contains('.') {
        text.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_read_like_numbers() {
        assert_eq!(tokens(512.0), "512");
        assert_eq!(tokens(4096.0), "4k");
        assert_eq!(tokens(1536.0), "1.5k");
        assert_eq!(tokens(1048576.0), "1M");
        assert_eq!(compact(0.7000000000000001), "0.7");
        assert_eq!(compact(123.456), "123");
        assert_eq!(compact(2.5e-7), "2.5e-7");
    }
}
