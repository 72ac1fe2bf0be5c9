//! The header of a .npy file: a Python dict literal such as
//! `{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }`.
//!
//! Parsed here, by a small recursive-descent parser with a nesting limit, because the
//! header is untrusted input: a general Python-literal parser (pest-based `py_literal`)
//! backtracks for minutes on a header of a few hundred nested brackets.

/// The header fields linattn reads.
#[derive(Debug, PartialEq, Eq)]
pub struct Header {
    /// The element type.
    pub descr: Descr,
    /// Whether the array is stored column-major.
    pub fortran_order: bool,
    /// Extent of each dimension.
    pub shape: Vec<u64>,
}

/// The `descr` field: a type string such as `'<f4'`, or a list of fields for a
/// structured array.
#[derive(Debug, PartialEq, Eq)]
pub enum Descr {
    /// A plain type string.
    Plain(String),
    /// A structured (record) dtype.
    Structured,
}

/// Deeper than any real header nests (a structured dtype of arrays of records).
const MAX_DEPTH: usize = 16;

/// A Python literal, as far as .npy headers use them.
#[derive(Debug)]
enum Literal {
    Str(String),
    Bool(bool),
    Int(i128),
    None,
    /// A tuple or a list.
    Sequence(Vec<Literal>),
    Dict(Vec<(Literal, Literal)>),
}

/// Parses the header text (without the preamble); the error says what is wrong.
pub fn parse(text: &[u8]) -> Result<Header, String> {
    let mut parser = Parser { text, pos: 0 };
    let literal = parser.value(0)?;
    parser.skip_space();
    if parser.pos != text.len() {
        return Err(format!(
            "unexpected text after the header dict at byte {}",
            parser.pos
        ));
    }
    let Literal::Dict(entries) = literal else {
        return Err("the header is not a dict".into());
    };
    let (mut descr, mut fortran_order, mut shape) = (None, None, None);
    for (key, value) in entries {
        let Literal::Str(key) = key else {
            return Err(format!("header key {key:?} is not a string"));
        };
        match (key.as_str(), value) {
            ("descr", Literal::Str(s)) => descr = Some(Descr::Plain(s)),
            ("descr", Literal::Sequence(_)) => descr = Some(Descr::Structured),
            ("fortran_order", Literal::Bool(b)) => fortran_order = Some(b),
            ("shape", Literal::Sequence(dims)) => shape = Some(dimensions(dims)?),
            ("descr" | "fortran_order" | "shape", value) => {
                return Err(format!(
                    "header field '{key}' has an invalid value {value:?}"
                ));
            }
            (other, _) => return Err(format!("unexpected header field '{other}'")),
        }
    }
    Ok(Header {
        descr: descr.ok_or("the header has no 'descr'")?,
        fortran_order: fortran_order.ok_or("the header has no 'fortran_order'")?,
        shape: shape.ok_or("the header has no 'shape'")?,
    })
}

fn dimensions(dims: Vec<Literal>) -> Result<Vec<u64>, String> {
    dims.into_iter()
        .map(|dim| match dim {
            Literal::Int(n) => {
                u64::try_from(n).map_err(|_| format!("shape has an invalid dimension {n}"))
            }
            other => Err(format!(
                "shape has a dimension {other:?} that is not an integer"
            )),
        })
        .collect()
}

struct Parser<'a> {
    text: &'a [u8],
    pos: usize,
}

impl Parser<'_> {
    fn skip_space(&mut self) {
        while self.peek().is_some_and(|b| b.is_ascii_whitespace()) {
            self.pos += 1;
        }
    }

    fn peek(&self) -> Option<u8> {
        self.text.get(self.pos).copied()
    }

    fn value(&mut self, depth: usize) -> Result<Literal, String> {
        if depth > MAX_DEPTH {
            return Err(format!(
                "the header nests more than {MAX_DEPTH} levels deep"
            ));
        }
        self.skip_space();
        match self.peek() {
            None => Err("the header ends in the middle of a value".into()),
            Some(quote @ (b'\'' | b'"')) => self.string(quote),
            Some(b'(') => self.sequence(b')', depth),
            Some(b'[') => self.sequence(b']', depth),
            Some(b'{') => self.dict(depth),
            Some(b'-' | b'0'..=b'9') => self.integer(),
            Some(b) if b.is_ascii_alphabetic() => self.word(),
            Some(b) => Err(format!(
                "unexpected character {:?} in the header at byte {}",
                b as char, self.pos
            )),
        }
    }

    fn string(&mut self, quote: u8) -> Result<Literal, String> {
        self.pos += 1;
        let mut bytes = Vec::new();
        loop {
            match self.peek() {
                None => return Err("a string in the header is not closed".into()),
                Some(b) if b == quote => break,
                Some(b'\\') => {
                    self.pos += 1;
                    bytes.extend(self.peek());
                }
                Some(b) => bytes.push(b),
            }
            self.pos += 1;
        }
        self.pos += 1;
        Ok(Literal::Str(String::from_utf8_lossy(&bytes).into_owned()))
    }

    fn integer(&mut self) -> Result<Literal, String> {
        let start = self.pos;
        if self.peek() == Some(b'-') {
            self.pos += 1;
        }
        while self.peek().is_some_and(|b| b.is_ascii_digit()) {
            self.pos += 1;
        }
        let digits = String::from_utf8_lossy(&self.text[start..self.pos]).into_owned();
        // Python 2 wrote long integers with an L suffix; NumPy still reads such headers.
        if matches!(self.peek(), Some(b'L' | b'l')) {
            self.pos += 1;
        }
        digits
            .parse()
            .map(Literal::Int)
            .map_err(|_| format!("the header holds an invalid integer {digits:?}"))
    }

    fn word(&mut self) -> Result<Literal, String> {
        let start = self.pos;
        while self.peek().is_some_and(|b| b.is_ascii_alphanumeric()) {
            self.pos += 1;
        }
        match &self.text[start..self.pos] {
            b"True" => Ok(Literal::Bool(true)),
            b"False" => Ok(Literal::Bool(false)),
            b"None" => Ok(Literal::None),
            other => Err(format!(
                "the header holds an unknown name {:?}",
                String::from_utf8_lossy(other)
            )),
        }
    }

    /// Comma-separated items up to `close`, a trailing comma allowed; `item` parses one.
    fn items(
        &mut self,
        close: u8,
        mut item: impl FnMut(&mut Self) -> Result<(), String>,
    ) -> Result<(), String> {
        self.pos += 1;
        loop {
            self.skip_space();
            if self.peek() == Some(close) {
                self.pos += 1;
                return Ok(());
            }
            item(self)?;
            self.skip_space();
            match self.peek() {
                Some(b',') => self.pos += 1,
                Some(b) if b == close => {}
                _ => {
                    return Err(format!(
                        "expected ',' or '{}' in the header at byte {}",
                        close as char, self.pos
                    ));
                }
            }
        }
    }

    fn sequence(&mut self, close: u8, depth: usize) -> Result<Literal, String> {
        let mut values = Vec::new();
        self.items(close, |parser| {
            values.push(parser.value(depth + 1)?);
            Ok(())
        })?;
        Ok(Literal::Sequence(values))
    }

    fn dict(&mut self, depth: usize) -> Result<Literal, String> {
        let mut entries = Vec::new();
        self.items(b'}', |parser| {
            let key = parser.value(depth + 1)?;
            parser.skip_space();
            if parser.peek() != Some(b':') {
                return Err(format!(
                    "expected ':' after a key in the header at byte {}",
                    parser.pos
                ));
            }
            parser.pos += 1;
            entries.push((key, parser.value(depth + 1)?));
            Ok(())
        })?;
        Ok(Literal::Dict(entries))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_numpy_headers() {
        let header =
            parse(b"{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3, 4, 5), }   \n")
                .unwrap();
        assert_eq!(
            header,
            Header {
                descr: Descr::Plain("<f4".into()),
                fortran_order: false,
                shape: vec![2, 3, 4, 5],
            }
        );
        let scalar = parse(br#"{"shape": (), "fortran_order": True, "descr": "<f8"}"#).unwrap();
        assert!(scalar.shape.is_empty() && scalar.fortran_order);
        let python2 = parse(b"{'descr': '<f8', 'fortran_order': False, 'shape': (3L,)}").unwrap();
        assert_eq!(python2.shape, [3]);
    }

    #[test]
    fn recognises_structured_dtypes() {
        let header = parse(
            b"{'descr': [('x', '<f4'), ('y', '<i4', (2,))], 'fortran_order': False, 'shape': (3,)}",
        )
        .unwrap();
        assert_eq!(header.descr, Descr::Structured);
    }

    #[test]
    fn rejects_bad_headers_quickly() {
        let deep = format!(
            "{{'descr': {}{}, 'fortran_order': False, 'shape': (1,)}}",
            "[".repeat(10_000),
            "]".repeat(10_000)
        );
        assert!(parse(deep.as_bytes()).unwrap_err().contains("levels deep"));
        for (text, problem) in [
            (
                &b"{'descr': '<f4', 'fortran_order': False}"[..],
                "no 'shape'",
            ),
            (
                b"{'descr': '<f4', 'fortran_order': False, 'shape': (-1,)}",
                "-1",
            ),
            (
                b"{'descr': '<f4', 'fortran_order': 0, 'shape': (1,)}",
                "fortran_order",
            ),
            (
                b"{'descr': '<f4', 'fortran_order': False, 'shape': (1,), 'x': 1}",
                "'x'",
            ),
            (
                b"{'descr': '<f4', 'fortran_order': False, 'shape': (1,)} junk",
                "after",
            ),
            (b"{'descr': '<f4", "not closed"),
            (b"[1, 2]", "not a dict"),
        ] {
            let error = parse(text).unwrap_err();
            assert!(error.contains(problem), "{error}");
        }
    }
}
