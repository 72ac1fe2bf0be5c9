//! A method's options given by name, as text or matrices: what the command line's flags
//! and the explorer's fields become. Each method reads its own from here (its catalogue
//! entry's `build`), so nothing above the methods needs to know a method's options.

use super::info::MethodInfo;
use crate::base::{Error, Result};
use std::collections::BTreeMap;

/// Options by name for [`Method::from_options`](super::Method::from_options), with what
/// a method needs to know of its inputs to check and draw them.
///
/// ```
/// use linattn::{Method, MethodOptions};
/// let mut options = MethodOptions::new(64, 4096);
/// options.set("features", "128").set("seed", "7");
/// let performer = Method::from_options("performer", &options).unwrap();
/// assert_eq!(performer.name(), "performer");
/// // An option the method does not take is refused, not ignored.
/// options.set("window", "8,0");
/// assert!(Method::from_options("performer", &options).is_err());
/// ```
#[derive(Clone, Debug, Default, PartialEq)]
pub struct MethodOptions {
    given: BTreeMap<String, String>,
    defaults: BTreeMap<String, String>,
    matrices: BTreeMap<String, (Vec<f64>, [usize; 2])>,
    /// q's (and k's) head_dim.
    pub head_dim: usize,
    /// k's sequence length.
    pub key_len: usize,
}

impl MethodOptions {
    /// No options, for inputs of head dim `head_dim` and `key_len` keys.
    pub fn new(head_dim: usize, key_len: usize) -> Self {
        Self {
            head_dim,
            key_len,
            ..Self::default()
        }
    }

    /// Sets option `name` to `value` (as the command line spells both).
    pub fn set(&mut self, name: &str, value: impl ToString) -> &mut Self {
        self.given.insert(name.to_string(), value.to_string());
        self
    }

    /// Sets option `name` for every method that takes it and was not given it: the
    /// defaults of a command that compares several methods at once.
    pub fn fallback(&mut self, name: &str, value: impl ToString) -> &mut Self {
        self.defaults.insert(name.to_string(), value.to_string());
        self
    }

    /// Sets a matrix-valued option (Performer's ω, Linformer's E and F), row-major.
    pub fn set_matrix(&mut self, name: &str, values: Vec<f64>, shape: [usize; 2]) -> &mut Self {
        self.matrices.insert(name.to_string(), (values, shape));
        self
    }

    /// The options given (not defaults) that `info`'s method does not take.
    pub(crate) fn foreign(&self, info: &MethodInfo) -> Vec<String> {
        self.given
            .keys()
            .chain(self.matrices.keys())
            .filter(|name| !info.options.iter().any(|o| o.name == name.as_str()))
            .cloned()
            .collect()
    }

    /// Whether option `name` was given (a value or a matrix).
    pub(crate) fn has(&self, name: &str) -> bool {
        self.given.contains_key(name) || self.matrices.contains_key(name)
    }

    /// The text of option `name`: given, else the command's default.
    pub(crate) fn text(&self, name: &str) -> Option<&str> {
        self.given
            .get(name)
            .or_else(|| self.defaults.get(name))
            .map(String::as_str)
    }

    /// Option `name` parsed as `T`, or `None` when neither given nor defaulted.
    pub(crate) fn parse<T: std::str::FromStr>(&self, name: &str, what: &str) -> Result<Option<T>> {
        self.text(name)
            .map(|text| {
                text.trim().parse().map_err(|_| {
                    Error::InvalidConfig(format!("--{name} takes {what}, not {text:?}"))
                })
            })
            .transpose()
    }

    /// Option `name` parsed as `T`; an error saying what to give when it is missing.
    pub(crate) fn required<T: std::str::FromStr>(
        &self,
        method: &str,
        name: &str,
        what: &str,
    ) -> Result<T> {
        self.parse(name, what)?
            .ok_or_else(|| Error::InvalidConfig(format!("{method} needs --{name} ({what})")))
    }

    /// The matrix option `name`, if given.
    pub(crate) fn matrix(&self, name: &str) -> Option<&(Vec<f64>, [usize; 2])> {
        self.matrices.get(name)
    }

    /// A window `L,R` (each side a number of keys or -1, unbounded), if given.
    pub(crate) fn window(&self, name: &str) -> Result<Option<(Option<usize>, Option<usize>)>> {
        let Some(text) = self.text(name) else {
            return Ok(None);
        };
        let bad = || {
            Error::InvalidConfig(format!(
                "--{name} takes L,R: keys before and after each query, -1 for unbounded; not {text:?}"
            ))
        };
        let (left, right) = text.split_once(',').ok_or_else(bad)?;
        let side = |s: &str| match s.trim() {
            "-1" => Ok(None),
            s => s.parse().map(Some).map_err(|_| bad()),
        };
        Ok(Some((side(left)?, side(right)?)))
    }
}
