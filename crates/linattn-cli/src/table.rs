//! Plain-text tables for people: a header line, a rule, then rows whose cells line up.

use std::io::{self, Write};

/// How the cells of a column line up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Align {
    /// Names line up on the left.
    Left,
    /// Numbers line up on the right.
    Right,
}

/// Writes `headers` (each with its column's alignment), a rule of dashes under each, and
/// `rows`; every column is as wide as its widest cell, two spaces from the next.
pub fn write(
    out: &mut impl Write,
    headers: &[(&str, Align)],
    rows: &[Vec<String>],
) -> io::Result<()> {
    let widths = widths(headers, rows);
    let line = |cells: Vec<&str>| -> String {
        let padded: Vec<String> = cells
            .iter()
            .zip(headers)
            .zip(&widths)
            .map(|((cell, (_, align)), &width)| match align {
                Align::Right => format!("{cell:>width$}"),
                Align::Left => format!("{cell:<width$}"),
            })
            .collect();
        padded.join("  ").trim_end().to_string()
    };
    writeln!(out, "{}", line(headers.iter().map(|(h, _)| *h).collect()))?;
    let rule: Vec<String> = widths.iter().map(|&w| "-".repeat(w)).collect();
    writeln!(out, "{}", line(rule.iter().map(String::as_str).collect()))?;
    for row in rows {
        writeln!(out, "{}", line(row.iter().map(String::as_str).collect()))?;
    }
    Ok(())
}

/// Each column's width in characters: its widest cell, or its header.
pub fn widths(headers: &[(&str, Align)], rows: &[Vec<String>]) -> Vec<usize> {
    headers
        .iter()
        .enumerate()
        .map(|(i, (header, _))| {
            rows.iter()
                .map(|row| row[i].chars().count())
                .fold(header.chars().count(), usize::max)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pads_to_the_widest_cell() {
        let mut out = Vec::new();
        let rows = vec![vec!["linear".to_string(), "1.5".to_string()]];
        write(
            &mut out,
            &[("method", Align::Left), ("ms", Align::Right)],
            &rows,
        )
        .unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "method   ms\n------  ---\nlinear  1.5\n"
        );
    }
}
