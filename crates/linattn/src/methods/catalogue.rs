//! The catalogue: every method with its name, what it is, its options and defaults, its
//! cost in theory and the forms it has on each device. The command line's choices, the
//! explorer's `/api/info`, the test suites and the benches read their lists from here.

use super::{cosformer, fnet, hybrid, linear, linformer, performer, softmax, window};

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

/// A method as everything that lists methods sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
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

/// Every method, in the order the command line and the explorer list them.
///
/// ```
/// let names: Vec<&str> = linattn::catalogue().iter().map(|m| m.name).collect();
/// assert_eq!(names[0], "softmax");
/// assert!(names.contains(&"performer"));
/// ```
pub fn catalogue() -> &'static [MethodInfo] {
    &CATALOGUE
}

static CATALOGUE: [MethodInfo; 8] = [
    softmax::INFO,
    window::INFO,
    linear::INFO,
    performer::INFO,
    cosformer::INFO,
    linformer::INFO,
    fnet::INFO,
    hybrid::INFO,
];
