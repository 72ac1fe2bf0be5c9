//! The options that choose methods and configure them. The names are the library's
//! catalogue's; the flags become the library's named options, which each method reads
//! for itself, so a new method needs nothing here.

use crate::error::CliError;
use crate::npy;
use crate::window_span::{WindowSpan, parse_window};
use clap::{Args, ValueEnum};
use linattn::{Method, MethodInfo, find_method};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::path::{Path, PathBuf};

/// A method of the catalogue, or one of its variants, by the name the command line and
/// the explorer use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct MethodName(&'static str);

impl MethodName {
    /// The name.
    pub fn name(self) -> &'static str {
        self.0
    }

    /// The catalogue entry of the method (of a variant: of its method).
    pub fn info(self) -> &'static MethodInfo {
        find_method(self.0)
            .expect("names come from the catalogue")
            .0
    }

    /// Every method (no variants) whose catalogue entry `keep` accepts.
    pub fn methods_where(keep: impl Fn(&MethodInfo) -> bool) -> Vec<MethodName> {
        linattn::catalogue()
            .filter(|info| keep(info))
            .map(|info| MethodName(info.name))
            .collect()
    }

    /// Every method and variant, in the catalogue's order.
    pub fn all() -> Vec<MethodName> {
        linattn::catalogue()
            .flat_map(|info| std::iter::once(info.name).chain(info.variants.iter().map(|v| v.name)))
            .map(MethodName)
            .collect()
    }
}

impl std::str::FromStr for MethodName {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let text = text.trim();
        Self::all()
            .into_iter()
            .find(|m| m.0 == text)
            .ok_or_else(|| {
                let names: Vec<&str> = Self::all().iter().map(|m| m.0).collect();
                format!("no method {text:?}; choose from {}", names.join(", "))
            })
    }
}

/// clap's value parser of a method name (clap shows the catalogue's names as choices).
pub fn method_name_parser() -> impl clap::builder::TypedValueParser<Value = MethodName> {
    use clap::builder::TypedValueParser;
    let names: Vec<&'static str> = MethodName::all().iter().map(|m| m.0).collect();
    clap::builder::PossibleValuesParser::new(names)
        .map(|name: String| name.parse::<MethodName>().expect("a possible value"))
}

impl Serialize for MethodName {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.0)
    }
}

impl<'de> Deserialize<'de> for MethodName {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// How softmax computes: tiled or naive.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Algorithm {
    /// Online softmax over key blocks, O(n) memory.
    Tiled,
    /// The whole score matrix, O(n²) memory.
    Naive,
}

impl Algorithm {
    /// The name as `--algorithm` spells it.
    fn name(self) -> &'static str {
        match self {
            Algorithm::Tiled => "tiled",
            Algorithm::Naive => "naive",
        }
    }
}

/// The method of hybrid's global heads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum GlobalKind {
    /// Linear Transformer heads.
    Linear,
    /// Performer heads (takes performer's options).
    Performer,
}

impl GlobalKind {
    /// The name as `--global` spells it.
    fn name(self) -> &'static str {
        match self {
            GlobalKind::Linear => "linear",
            GlobalKind::Performer => "performer",
        }
    }
}

/// Options of the methods; each method accepts only its own (`linattn::catalogue` says
/// which).
#[derive(Debug, Args)]
#[command(next_help_heading = "Method options")]
pub struct MethodOptions {
    /// softmax, window, hybrid: score scale [default: 1/√head_dim]; the gated family
    /// (retention, gla, delta-rule, gated-delta-rule): output scale [default: 1/√head_dim]
    #[arg(long)]
    scale: Option<f64>,
    /// softmax: how to compute it [default: tiled]
    #[arg(long, value_enum)]
    algorithm: Option<Algorithm>,
    /// window, hybrid: keys seen before and after each query; -1 is unbounded
    #[arg(long, value_name = "L,R", value_parser = parse_window, allow_hyphen_values = true)]
    window: Option<WindowSpan>,
    /// linear, performer, cosformer, hybrid and the gated family: tokens per chunk of the
    /// causal form [default: 64]
    #[arg(long)]
    chunk: Option<usize>,
    /// performer: the projection ω, a 2-D [features, head_dim] .npy file
    #[arg(long, value_name = "FILE", conflicts_with_all = ["features", "seed"])]
    omega: Option<PathBuf>,
    /// performer: number of random features to draw [default: 256]
    #[arg(long, value_name = "M")]
    features: Option<usize>,
    /// performer, linformer: seed of the random draw [default: 0]
    #[arg(long)]
    seed: Option<u64>,
    /// linformer: key projection E, a 2-D [max_len, k] .npy file
    #[arg(long, value_name = "FILE", requires = "proj_v", conflicts_with_all = ["k_proj", "max_len", "seed"])]
    proj_k: Option<PathBuf>,
    /// linformer: value projection F, of E's shape
    #[arg(long, value_name = "FILE", requires = "proj_k")]
    proj_v: Option<PathBuf>,
    /// linformer: projected length k of drawn projections
    #[arg(long, value_name = "K")]
    k_proj: Option<usize>,
    /// linformer: rows of drawn projections, the longest key sequence [default: k's length];
    /// cosformer: M of the cosine reweighting, fixed [default: each call's longest sequence]
    #[arg(long, value_name = "M")]
    max_len: Option<usize>,
    /// retention: the decay per value head, comma-separated, or one for every head
    /// [default: 1 − 2^(−5−h)]
    #[arg(long, value_name = "G[,G...]")]
    gamma: Option<String>,
    /// delta-rule, gated-delta-rule: L2-normalise q and k inside [default: false]
    #[arg(long, value_name = "BOOL")]
    l2norm_qk: Option<bool>,
    /// gated-delta-rule: allow β up to 2 (negative eigenvalues) [default: false]
    #[arg(long, value_name = "BOOL")]
    negative_eigenvalues: Option<bool>,
    /// hybrid: how many leading query heads use the window
    #[arg(long, value_name = "N")]
    local_heads: Option<usize>,
    /// hybrid: method of the other heads [default: linear]
    #[arg(long, value_enum)]
    global: Option<GlobalKind>,
    /// Any method's option by the library's name (see `linattn::catalogue`), for options
    /// without a flag of their own; repeatable
    #[arg(long, value_name = "NAME=VALUE", value_parser = parse_option)]
    option: Vec<(String, String)>,
}

/// `NAME=VALUE` (clap value parser).
fn parse_option(text: &str) -> Result<(String, String), String> {
    let (name, value) = text
        .split_once('=')
        .ok_or_else(|| format!("expected NAME=VALUE, got {text:?}"))?;
    Ok((name.trim().to_string(), value.trim().to_string()))
}

/// What the method needs to know about the inputs to check and draw its options.
#[derive(Clone, Copy, Debug)]
pub struct InputDims {
    /// q's (and k's) head_dim.
    pub head_dim: usize,
    /// k's sequence length.
    pub key_len: usize,
}

/// Values a command supplies for options left out: `run` supplies none (the option is
/// required, or the library's default holds), `decode` compares several methods at once
/// and so cannot ask for each one's options.
#[derive(Clone, Copy, Debug, Default)]
pub struct Fallbacks {
    /// window, hybrid: the span of `--window`.
    pub window: Option<WindowSpan>,
    /// hybrid: `--local-heads`.
    pub local_heads: Option<usize>,
    /// linformer: `--k-proj`.
    pub k_proj: Option<usize>,
    /// cosformer, linformer: `--max-len`, the longest sequence (cosFormer's fixed M).
    pub max_len: Option<usize>,
    /// delta-rule, gated-delta-rule: `--l2norm-qk`.
    pub l2norm_qk: Option<bool>,
}

impl MethodOptions {
    /// The options given, by the library's names, as text.
    fn given(&self) -> Vec<(String, String)> {
        let mut given: Vec<(String, String)> = [
            ("scale", self.scale.map(|s| s.to_string())),
            ("algorithm", self.algorithm.map(|a| a.name().to_string())),
            ("window", self.window.map(|w| w.to_string())),
            ("chunk", self.chunk.map(|c| c.to_string())),
            ("features", self.features.map(|f| f.to_string())),
            ("seed", self.seed.map(|s| s.to_string())),
            ("k-proj", self.k_proj.map(|k| k.to_string())),
            ("max-len", self.max_len.map(|m| m.to_string())),
            ("local-heads", self.local_heads.map(|l| l.to_string())),
            ("global", self.global.map(|g| g.name().to_string())),
            ("gamma", self.gamma.clone()),
            ("l2norm-qk", self.l2norm_qk.map(|b| b.to_string())),
            (
                "negative-eigenvalues",
                self.negative_eigenvalues.map(|b| b.to_string()),
            ),
        ]
        .into_iter()
        .filter_map(|(name, value)| Some((name.to_string(), value?)))
        .collect();
        given.extend(self.option.iter().cloned());
        for (name, path) in self.matrix_files() {
            given.push((name.to_string(), path.display().to_string()));
        }
        given
    }

    /// The matrix options given as files, by the library's names.
    fn matrix_files(&self) -> Vec<(&'static str, &Path)> {
        [
            ("omega", &self.omega),
            ("proj-k", &self.proj_k),
            ("proj-v", &self.proj_v),
        ]
        .into_iter()
        .filter_map(|(name, path)| Some((name, path.as_deref()?)))
        .collect()
    }

    /// The files these options read (ω, Linformer's E and F).
    pub fn input_files(&self) -> impl Iterator<Item = &Path> {
        self.matrix_files().into_iter().map(|(_, path)| path)
    }

    /// The library's options for inputs of `dims`, keeping those `info`'s method takes
    /// (all of them when `None`), with the command's `fallbacks`.
    fn library(
        &self,
        dims: InputDims,
        info: Option<&MethodInfo>,
        fallbacks: Fallbacks,
    ) -> Result<linattn::MethodOptions, CliError> {
        let takes = |name: &str| info.is_none_or(|i| i.options.iter().any(|o| o.name == name));
        let mut options = linattn::MethodOptions::new(dims.head_dim, dims.key_len);
        for (name, value) in self.given() {
            if takes(&name) && !self.matrix_files().iter().any(|(m, _)| *m == name) {
                options.set(&name, value);
            }
        }
        for (name, path) in self.matrix_files() {
            if takes(name) {
                let (values, shape) = read_matrix(path, name)?;
                options.set_matrix(name, values, shape);
            }
        }
        let fallback_values = [
            ("window", fallbacks.window.map(|w| w.to_string())),
            ("local-heads", fallbacks.local_heads.map(|l| l.to_string())),
            ("k-proj", fallbacks.k_proj.map(|k| k.to_string())),
            ("max-len", fallbacks.max_len.map(|m| m.to_string())),
            ("l2norm-qk", fallbacks.l2norm_qk.map(|b| b.to_string())),
        ];
        for (name, value) in fallback_values {
            if let Some(value) = value {
                options.fallback(name, value);
            }
        }
        Ok(options)
    }

    /// The configured method called `name` for inputs of `dims`; reads ω, E and F where
    /// given. An option the method does not take is an error.
    pub fn method(&self, name: MethodName, dims: InputDims) -> Result<Method, CliError> {
        let options = self.library(dims, None, Fallbacks::default())?;
        Ok(Method::from_options(name.name(), &options)?)
    }

    /// Each of `names` configured for inputs of `dims`, with `fallbacks` for the options
    /// left out; an option is accepted when at least one of the methods takes it.
    pub fn methods(
        &self,
        names: &[MethodName],
        dims: InputDims,
        fallbacks: Fallbacks,
    ) -> Result<Vec<Method>, CliError> {
        if let Some((flag, _)) = self.given().into_iter().find(|(flag, _)| {
            !names
                .iter()
                .any(|m| m.info().options.iter().any(|o| o.name == flag.as_str()))
        }) {
            let names: Vec<&str> = names.iter().map(|m| m.name()).collect();
            return Err(CliError::Usage(format!(
                "--{flag} applies to none of {}",
                names.join(", ")
            )));
        }
        names
            .iter()
            .map(|&name| {
                let options = self.library(dims, Some(name.info()), fallbacks)?;
                Ok(Method::from_options(name.name(), &options)?)
            })
            .collect()
    }
}

/// A 2-D array from `path`, widened to f64, with its shape.
fn read_matrix(path: &Path, role: &'static str) -> Result<(Vec<f64>, [usize; 2]), CliError> {
    let array = npy::read(path)?;
    let shape = array.dims::<2>(role, "a 2-D matrix")?;
    Ok((array.elements.into_f64(), shape))
}
