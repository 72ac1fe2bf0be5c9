//! What the catalogue says of a method: its name, what it is, its options and defaults,
//! its cost in theory, and the forms it has on each device.

use super::options::MethodOptions;
use crate::base::{Error, Result};

/// Which forms a method has on one device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Forms {
    /// Every query sees every key.
    pub full: bool,
    /// Query i sees keys j ≤ i, in one call.
    pub causal: bool,
    /// Token by token from a state (a decoder).
    pub recurrent: bool,
}

impl Forms {
    /// No form at all: the method does not run on the device.
    pub const NONE: Forms = Forms {
        full: false,
        causal: false,
        recurrent: false,
    };
}

/// Where a computation runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Device {
    /// The CPU, every core through rayon.
    Cpu,
    /// An NVIDIA GPU (the `cuda` feature).
    Cuda,
}

impl Device {
    /// The device as messages name it.
    pub fn name(self) -> &'static str {
        match self {
            Device::Cpu => "CPU",
            Device::Cuda => "GPU",
        }
    }
}

/// An option of a method, as the catalogue describes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OptionInfo {
    /// Its name (the command line's flag without `--`).
    pub name: &'static str,
    /// Its default, as text.
    pub default: &'static str,
    /// What it does.
    pub what: &'static str,
}

/// A named setting of a method that benchmarks and the explorer list beside the methods
/// (exact softmax with its whole score matrix, say).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Variant {
    /// Its name.
    pub name: &'static str,
    /// What it is, in one line.
    pub summary: &'static str,
    /// Its memory beyond q, k and v, in theory.
    pub memory: &'static str,
    /// The options that make it, as (name, value).
    pub options: &'static [(&'static str, &'static str)],
}

/// How a method's heads pair up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HeadLayout {
    /// Groups of query heads share a key and value head (GQA, MQA): k and v have as many
    /// heads, q a multiple of them.
    SharedKeysValues,
    /// Query and key heads pair up, and groups of value heads share one pair (the gated
    /// family, as flash-linear-attention has it): v has a multiple of q's heads, and so
    /// has the output.
    GroupedValues,
}

/// An input beside q, k and v that a method reads one of per token (and value head).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenInput {
    /// `g`, the log decay of the state (≤ 0): `[B, T, HV, 1]`, or `[B, T, HV, d_k]` per
    /// key channel.
    LogDecay,
    /// `beta`, the delta rule's step size: `[B, T, HV, 1]`.
    StepSize,
}

impl TokenInput {
    /// The input's name, as flash-linear-attention (and the command line) names it.
    pub fn name(self) -> &'static str {
        match self {
            TokenInput::LogDecay => "g",
            TokenInput::StepSize => "beta",
        }
    }
}

/// A method as everything that lists methods sees it.
#[derive(Clone, Copy, Debug)]
pub struct MethodInfo {
    /// The name the command line and the explorer use.
    pub name: &'static str,
    /// What it is, in one line.
    pub summary: &'static str,
    /// Its time in theory, for n tokens of head dim d.
    pub time: &'static str,
    /// Its memory beyond q, k and v, in theory.
    pub memory: &'static str,
    /// Its options and their defaults.
    pub options: &'static [OptionInfo],
    /// Its forms on the CPU.
    pub cpu: Forms,
    /// Its forms on an NVIDIA GPU.
    pub cuda: Forms,
    /// How its heads pair up.
    pub layout: HeadLayout,
    /// What it reads per token beside q, k and v.
    pub token_inputs: &'static [TokenInput],
    /// Whether each output row is a weighted sum of v's rows, one weight per query and
    /// key (FNet mixes tokens and features without such weights): the explorer draws them.
    pub weights: bool,
    /// Named settings listed beside the method.
    pub variants: &'static [Variant],
    /// The method's own trained tensors whose gradients the backward pass also returns
    /// (Linformer's E and F), by name.
    pub parameters: &'static [&'static str],
    /// Option sets the test suites run the method with: small chunks, feature counts and
    /// windows, so that short inputs cross several blocks of every form.
    pub examples: &'static [&'static [(&'static str, &'static str)]],
}

impl MethodInfo {
    /// The method's forms on `device`.
    pub fn forms(&self, device: Device) -> Forms {
        match device {
            Device::Cpu => self.cpu,
            Device::Cuda => self.cuda,
        }
    }
}

impl MethodInfo {
    /// Fails on an option given that the method does not take: a mistyped method name
    /// should not quietly compute something else.
    pub fn check_options(&self, options: &MethodOptions) -> Result<()> {
        let Some(foreign) = options.foreign(self).into_iter().next() else {
            return Ok(());
        };
        let takes: Vec<String> = self
            .options
            .iter()
            .map(|o| format!("--{}", o.name))
            .collect();
        let takes = if takes.is_empty() {
            "no options".to_string()
        } else {
            takes.join(", ")
        };
        Err(Error::InvalidConfig(format!(
            "--{foreign} does not apply to {}, which takes {takes}",
            self.name
        )))
    }
}
