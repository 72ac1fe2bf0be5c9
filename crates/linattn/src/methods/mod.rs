//! One folder per method: its options and their validation, how it runs on the engine
//! and the backends, its f64 reference, and its entry in the [`catalogue`]. Every method
//! implements [`AttentionMethod`]; [`Method`] dispatches to them in one place
//! ([`each_method!`]).

mod catalogue;
mod cosformer;
mod delta_rule;
mod fnet;
pub(crate) mod gated;
mod gated_delta_rule;
mod gla;
mod hybrid;
mod info;
mod linear;
mod linformer;
mod method;
mod options;
mod performer;
pub(crate) mod reference;
mod retention;
mod softmax;
mod window;

pub use catalogue::{catalogue, find_method};
pub use cosformer::Cosformer;
pub use delta_rule::DeltaRule;
pub use fnet::Fnet;
pub use gated::{GateInputs, GatedGradients, GatedOutput, RawGate, RawGateGradients};
pub use gated_delta_rule::GatedDeltaRule;
pub use gla::Gla;
pub use hybrid::{GlobalHeads, Hybrid};
pub use info::{Device, Forms, HeadLayout, MethodInfo, OptionInfo, TokenInput, Variant};
#[cfg(feature = "cuda")]
pub(crate) use linear::LINEAR_EPSILON;
pub use linear::Linear;
pub use linformer::{Linformer, Projections, linformer_projections};
pub(crate) use method::{AttentionMethod, Prepared, Recurrent};
pub use options::MethodOptions;
pub use performer::{DEFAULT_FEATURES, Performer, RandomFeatures};
pub use retention::Retention;
#[cfg(feature = "cuda")]
pub(crate) use softmax::resolve_scale;
pub use softmax::{Softmax, SoftmaxAlgorithm};
pub use window::Window;

use crate::base::{Element, Problem, Result, Tensor};
use crate::engine::{Kernel, KernelPass};
use std::ops::Range;

/// Which attention to compute, with the method's own options.
///
/// ```
/// use linattn::{Method, Performer};
/// let exact = Method::softmax();
/// let favor = Method::Performer(Performer::new(128, 7));
/// assert_eq!(favor.name(), "performer");
/// assert_ne!(exact, favor);
/// ```
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub enum Method {
    /// Exact softmax attention, naive or tiled.
    Softmax(Softmax),
    /// Exact softmax over a sliding window of keys.
    Window(Window),
    /// Linear Transformer, φ = elu + 1.
    Linear(Linear),
    /// Performer's FAVOR+ random features.
    Performer(Performer),
    /// cosFormer: ReLU features with cosine reweighting.
    Cosformer(Cosformer),
    /// Linformer: softmax over keys and values projected along the sequence.
    Linformer(Linformer),
    /// FNet: token mixing by the real part of a 2-D DFT.
    Fnet(Fnet),
    /// Sliding-window heads beside linear global heads.
    Hybrid(Hybrid),
    /// RetNet's retention: a fixed decay per head.
    Retention(Retention),
    /// Gated linear attention: a decay per token (per key channel).
    Gla(Gla),
    /// DeltaNet's delta rule.
    DeltaRule(DeltaRule),
    /// Gated DeltaNet (per key channel: Kimi Delta Attention).
    GatedDeltaRule(GatedDeltaRule),
}

/// Runs `$body` with `$m` bound to the method's options, whichever method it is: the
/// one place that lists every method.
macro_rules! each_method {
    ($method:expr, $m:ident => $body:expr) => {
        match $method {
            Method::Softmax($m) => $body,
            Method::Window($m) => $body,
            Method::Linear($m) => $body,
            Method::Performer($m) => $body,
            Method::Cosformer($m) => $body,
            Method::Linformer($m) => $body,
            Method::Fnet($m) => $body,
            Method::Hybrid($m) => $body,
            Method::Retention($m) => $body,
            Method::Gla($m) => $body,
            Method::DeltaRule($m) => $body,
            Method::GatedDeltaRule($m) => $body,
        }
    };
}

impl Method {
    /// Exact tiled softmax with scale 1/√d.
    pub fn softmax() -> Self {
        Method::Softmax(Softmax::default())
    }

    /// Linear Transformer with default chunking.
    pub fn linear() -> Self {
        Method::Linear(Linear::default())
    }

    /// The method's name as the command line spells it.
    pub fn name(&self) -> &'static str {
        self.info().name
    }

    /// The method's entry in the [`catalogue`].
    pub fn info(&self) -> &'static MethodInfo {
        AttentionMethod::info(self)
    }

    /// The state update of a method of the gated family; `None` for the others.
    pub(crate) fn gated_rule(&self, problem: &Problem) -> Option<gated::Rule> {
        match self {
            Method::Retention(m) => Some(m.rule(problem)),
            Method::Gla(m) => Some(m.rule(problem)),
            Method::DeltaRule(m) => Some(m.rule(problem)),
            Method::GatedDeltaRule(m) => Some(m.rule(problem)),
            _ => None,
        }
    }
}

impl AttentionMethod for Method {
    fn validate(&self, problem: &Problem) -> Result<()> {
        each_method!(self, m => m.validate(problem))
    }
    fn out_shape(&self, problem: &Problem) -> [usize; 4] {
        each_method!(self, m => m.out_shape(problem))
    }
    fn workspace_bytes(&self, problem: &Problem, element: usize) -> u128 {
        each_method!(self, m => m.workspace_bytes(problem, element))
    }
    fn backward_workspace_bytes(&self, problem: &Problem, element: usize) -> u128 {
        each_method!(self, m => m.backward_workspace_bytes(problem, element))
    }
    fn checks_while_reading(&self, problem: &Problem) -> bool {
        each_method!(self, m => m.checks_while_reading(problem))
    }
    fn prepare<T: Element>(&self, problem: &Problem) -> Result<Prepared<T>> {
        each_method!(self, m => m.prepare(problem))
    }
    fn forward<T: Element>(
        &self,
        problem: &Problem,
        prepared: &Prepared<T>,
        q: &Tensor<T>,
        k: &Tensor<T>,
        v: &Tensor<T>,
        out: &mut Tensor<T>,
        heads: Range<usize>,
    ) -> Result<KernelPass<T>> {
        each_method!(self, m => m.forward(problem, prepared, q, k, v, out, heads))
    }
    fn backward<T: Element>(
        &self,
        problem: &Problem,
        prepared: &Prepared<T>,
        inputs: [&Tensor<T>; 4],
        grads: [&mut Tensor<T>; 3],
    ) -> Result<Option<(Vec<f64>, Vec<f64>)>> {
        each_method!(self, m => m.backward(problem, prepared, inputs, grads))
    }
    fn flops(&self, problem: &Problem) -> f64 {
        each_method!(self, m => m.flops(problem))
    }
    fn reference(
        &self,
        problem: &Problem,
        q: &Tensor<f64>,
        k: &Tensor<f64>,
        v: &Tensor<f64>,
    ) -> Result<Tensor<f64>> {
        each_method!(self, m => m.reference(problem, q, k, v))
    }
    fn recurrent(&self, heads_q: usize, dim_qk: usize) -> Result<Recurrent> {
        each_method!(self, m => m.recurrent(heads_q, dim_qk))
    }
    fn kernel<T: Element>(&self, problem: &Problem) -> Result<Option<Kernel<T>>> {
        each_method!(self, m => m.kernel(problem))
    }
    fn info(&self) -> &'static MethodInfo {
        each_method!(self, m => m.info())
    }
}
