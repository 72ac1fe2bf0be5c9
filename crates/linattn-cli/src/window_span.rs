//! The `--window L,R` option: how many keys each query sees before and after itself.

/// Keys visible before and after each query; `None` is unbounded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WindowSpan {
    /// Keys before the query.
    pub left: Option<usize>,
    /// Keys after the query.
    pub right: Option<usize>,
}

/// `L,R` as `--window` takes it (-1 for an unbounded side).
impl std::fmt::Display for WindowSpan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let side = |s: Option<usize>| s.map_or("-1".to_string(), |n| n.to_string());
        write!(f, "{},{}", side(self.left), side(self.right))
    }
}

/// Parses `L,R`, each side a number of keys or -1 for unbounded (clap value parser).
pub fn parse_window(text: &str) -> Result<WindowSpan, String> {
    let (left, right) = text
        .split_once(',')
        .ok_or_else(|| format!("expected L,R (-1 for an unbounded side), got {text:?}"))?;
    Ok(WindowSpan {
        left: parse_side(left)?,
        right: parse_side(right)?,
    })
}

fn parse_side(text: &str) -> Result<Option<usize>, String> {
    match text.trim() {
        "-1" => Ok(None),
        side => side.parse().map(Some).map_err(|_| {
            format!("window side {side:?} is neither a number of keys nor -1 (unbounded)")
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_sides() {
        let span = parse_window("-1,0").unwrap();
        assert_eq!((span.left, span.right), (None, Some(0)));
        assert_eq!(parse_window("256, 3").unwrap().right, Some(3));
        for bad in ["5", "-2,1", "a,1", "1,2,3"] {
            assert!(parse_window(bad).is_err(), "{bad}");
        }
    }
}
