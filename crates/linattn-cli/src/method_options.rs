//! The options of `linattn run` that choose a method and configure it, and their
//! translation into a [`linattn::Method`].

use crate::error::CliError;
use crate::npy;
use crate::window_span::{WindowSpan, parse_window};
use clap::{Args, ValueEnum};
use linattn::{
    Cosformer, DEFAULT_CHUNK, DEFAULT_FEATURES, Fnet, GlobalHeads, Hybrid, Linear, Linformer,
    Method, Performer, Softmax, SoftmaxAlgorithm,
};
use std::path::{Path, PathBuf};

/// The methods `run` computes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum MethodName {
    /// Exact softmax attention.
    Softmax,
    /// Exact softmax over a sliding window.
    Window,
    /// Linear Transformer (elu + 1 features).
    Linear,
    /// Performer (FAVOR+ random features).
    Performer,
    /// cosFormer (ReLU features, cosine reweighting).
    Cosformer,
    /// Linformer (keys and values projected along the sequence).
    Linformer,
    /// FNet (real part of a 2-D DFT of v).
    Fnet,
    /// Window heads beside linear or performer heads.
    Hybrid,
}

impl MethodName {
    /// The name as `--method` spells it.
    pub fn name(self) -> &'static str {
        match self {
            MethodName::Softmax => "softmax",
            MethodName::Window => "window",
            MethodName::Linear => "linear",
            MethodName::Performer => "performer",
            MethodName::Cosformer => "cosformer",
            MethodName::Linformer => "linformer",
            MethodName::Fnet => "fnet",
            MethodName::Hybrid => "hybrid",
        }
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

/// Options of the methods; each method accepts only its own.
#[derive(Debug, Args)]
#[command(next_help_heading = "Method options")]
pub struct MethodOptions {
    /// softmax, window, hybrid: score scale [default: 1/√head_dim]
    #[arg(long)]
    scale: Option<f64>,
    /// softmax: how to compute it [default: tiled]
    #[arg(long, value_enum)]
    algorithm: Option<Algorithm>,
    /// window, hybrid: keys seen before and after each query; -1 is unbounded
    #[arg(long, value_name = "L,R", value_parser = parse_window, allow_hyphen_values = true)]
    window: Option<WindowSpan>,
    /// linear, performer, cosformer, hybrid: tokens per chunk of the causal form [default: 64]
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
    /// hybrid: how many leading query heads use the window
    #[arg(long, value_name = "N")]
    local_heads: Option<usize>,
    /// hybrid: method of the other heads [default: linear]
    #[arg(long, value_enum)]
    global: Option<GlobalKind>,
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
    /// cosformer: `--max-len`, the fixed M.
    pub cosformer_max_len: Option<usize>,
}

impl MethodOptions {
    /// The flags given on the command line.
    fn given(&self) -> Vec<&'static str> {
        [
            ("--scale", self.scale.is_some()),
            ("--algorithm", self.algorithm.is_some()),
            ("--window", self.window.is_some()),
            ("--chunk", self.chunk.is_some()),
            ("--omega", self.omega.is_some()),
            ("--features", self.features.is_some()),
            ("--seed", self.seed.is_some()),
            ("--proj-k", self.proj_k.is_some()),
            ("--proj-v", self.proj_v.is_some()),
            ("--k-proj", self.k_proj.is_some()),
            ("--max-len", self.max_len.is_some()),
            ("--local-heads", self.local_heads.is_some()),
            ("--global", self.global.is_some()),
        ]
        .into_iter()
        .filter_map(|(flag, given)| given.then_some(flag))
        .collect()
    }

    /// Fails on a flag that none of `methods` takes: a typo'd method name should not
    /// quietly compute something else.
    fn reject_foreign(&self, methods: &[MethodName]) -> Result<(), CliError> {
        let global = self.global.unwrap_or(GlobalKind::Linear);
        let accepts =
            |method: MethodName, flag: &str| accepted_flags(method, global).contains(&flag);
        let Some(flag) = self
            .given()
            .into_iter()
            .find(|flag| !methods.iter().any(|&method| accepts(method, flag)))
        else {
            return Ok(());
        };
        let describe = |method: MethodName| match method {
            MethodName::Hybrid => format!("hybrid with --global {}", global.name()),
            _ => method.name().to_string(),
        };
        Err(CliError::Usage(match methods {
            [method] => {
                let accepted = accepted_flags(*method, global);
                let takes = if accepted.is_empty() {
                    "no options".to_string()
                } else {
                    accepted.join(", ")
                };
                format!(
                    "{flag} does not apply to {}, which takes {takes}",
                    describe(*method)
                )
            }
            _ => {
                let names: Vec<String> = methods.iter().map(|&m| describe(m)).collect();
                format!("{flag} applies to none of {}", names.join(", "))
            }
        }))
    }

    /// The configured method for inputs of `dims`; reads ω, E and F where given.
    /// The files these options read (ω, Linformer's E and F).
    pub fn input_files(&self) -> impl Iterator<Item = &Path> {
        [&self.omega, &self.proj_k, &self.proj_v]
            .into_iter()
            .flatten()
            .map(PathBuf::as_path)
    }

    pub fn method(&self, name: MethodName, dims: InputDims) -> Result<Method, CliError> {
        self.reject_foreign(&[name])?;
        self.configure(name, dims, Fallbacks::default())
    }

    /// Each of `names` configured for inputs of `dims`, with `fallbacks` for the options
    /// left out; a flag is accepted when at least one of the methods takes it.
    pub fn methods(
        &self,
        names: &[MethodName],
        dims: InputDims,
        fallbacks: Fallbacks,
    ) -> Result<Vec<Method>, CliError> {
        self.reject_foreign(names)?;
        names
            .iter()
            .map(|&name| self.configure(name, dims, fallbacks))
            .collect()
    }

    fn configure(
        &self,
        name: MethodName,
        dims: InputDims,
        fallbacks: Fallbacks,
    ) -> Result<Method, CliError> {
        let chunk = self.chunk.unwrap_or(DEFAULT_CHUNK);
        let window = || {
            self.window.or(fallbacks.window).ok_or_else(|| {
                CliError::Usage(format!(
                    "{} needs --window L,R (keys before and after each query, -1 for unbounded)",
                    name.name()
                ))
            })
        };
        Ok(match name {
            MethodName::Softmax => Method::Softmax(Softmax {
                scale: self.scale,
                algorithm: match self.algorithm.unwrap_or(Algorithm::Tiled) {
                    Algorithm::Tiled => SoftmaxAlgorithm::Tiled,
                    Algorithm::Naive => SoftmaxAlgorithm::Naive,
                },
            }),
            MethodName::Window => Method::Window(window()?.window(self.scale)),
            MethodName::Linear => Method::Linear(Linear { chunk }),
            MethodName::Performer => Method::Performer(self.performer(chunk, dims)?),
            MethodName::Cosformer => Method::Cosformer(Cosformer {
                chunk,
                max_len: self.max_len.or(fallbacks.cosformer_max_len),
            }),
            MethodName::Linformer => Method::Linformer(self.linformer(dims, fallbacks)?),
            MethodName::Fnet => Method::Fnet(Fnet),
            MethodName::Hybrid => Method::Hybrid(Hybrid {
                local_heads: self
                    .local_heads
                    .or(fallbacks.local_heads)
                    .ok_or_else(|| CliError::Usage("hybrid needs --local-heads N".into()))?,
                window: window()?.window(self.scale),
                global: match self.global.unwrap_or(GlobalKind::Linear) {
                    GlobalKind::Linear => GlobalHeads::Linear(Linear { chunk }),
                    GlobalKind::Performer => GlobalHeads::Performer(self.performer(chunk, dims)?),
                },
            }),
        })
    }

    fn performer(&self, chunk: usize, dims: InputDims) -> Result<Performer, CliError> {
        let Some(path) = &self.omega else {
            return Ok(Performer {
                chunk,
                ..Performer::new(
                    self.features.unwrap_or(DEFAULT_FEATURES),
                    self.seed.unwrap_or(0),
                )
            });
        };
        let (omega, [features, dim]) = read_matrix(path, "omega", "2-D [features, head_dim]")?;
        if dim != dims.head_dim {
            return Err(CliError::Usage(format!(
                "{} has shape [{features}, {dim}], but q's head_dim is {}; omega must be [features, head_dim]",
                path.display(),
                dims.head_dim
            )));
        }
        Ok(Performer {
            chunk,
            ..Performer::with_omega(omega, features)
        })
    }

    fn linformer(&self, dims: InputDims, fallbacks: Fallbacks) -> Result<Linformer, CliError> {
        if let (Some(e_path), Some(f_path)) = (&self.proj_k, &self.proj_v) {
            let (e, e_shape) = read_matrix(e_path, "E", "2-D [max_len, k]")?;
            let (f, f_shape) = read_matrix(f_path, "F", "2-D [max_len, k]")?;
            if e_shape != f_shape {
                return Err(CliError::Usage(format!(
                    "E ({}) has shape {e_shape:?} but F ({}) has shape {f_shape:?}; they must match",
                    e_path.display(),
                    f_path.display()
                )));
            }
            let [max_len, k] = e_shape;
            return Ok(Linformer::with_projections(e, f, max_len, k));
        }
        let k = self.k_proj.or(fallbacks.k_proj).ok_or_else(|| {
            CliError::Usage(
                "linformer needs --k-proj K (drawn projections) or --proj-k E.npy --proj-v F.npy"
                    .into(),
            )
        })?;
        Ok(Linformer::new(
            self.max_len.unwrap_or(dims.key_len),
            k,
            self.seed.unwrap_or(0),
        ))
    }
}

/// The flags `method` takes (hybrid's depend on its global heads).
fn accepted_flags(method: MethodName, global: GlobalKind) -> &'static [&'static str] {
    match (method, global) {
        (MethodName::Softmax, _) => &["--scale", "--algorithm"],
        (MethodName::Window, _) => &["--window", "--scale"],
        (MethodName::Linear, _) => &["--chunk"],
        (MethodName::Cosformer, _) => &["--chunk", "--max-len"],
        (MethodName::Performer, _) => &["--omega", "--features", "--seed", "--chunk"],
        (MethodName::Linformer, _) => &["--proj-k", "--proj-v", "--k-proj", "--max-len", "--seed"],
        (MethodName::Fnet, _) => &[],
        (MethodName::Hybrid, GlobalKind::Linear) => &[
            "--window",
            "--scale",
            "--local-heads",
            "--global",
            "--chunk",
        ],
        (MethodName::Hybrid, GlobalKind::Performer) => &[
            "--window",
            "--scale",
            "--local-heads",
            "--global",
            "--chunk",
            "--omega",
            "--features",
            "--seed",
        ],
    }
}

/// A 2-D array from `path`, widened to f64, with its shape.
fn read_matrix(
    path: &Path,
    role: &'static str,
    expected: &'static str,
) -> Result<(Vec<f64>, [usize; 2]), CliError> {
    let array = npy::read(path)?;
    let shape = array.dims::<2>(role, expected)?;
    Ok((array.elements.into_f64(), shape))
}
