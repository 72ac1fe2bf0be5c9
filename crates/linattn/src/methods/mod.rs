//! One folder per method: its options and their validation, how it runs on the engine
//! and the backends, its f64 reference, and its entry in the [`catalogue`]. Every method
//! implements [`AttentionMethod`]; [`Method`] dispatches to them in one place
//! ([`each_method!`]).

mod catalogue;
mod cosformer;
mod fnet;
mod hybrid;
mod linear;
mod linformer;
mod options;
mod performer;
pub(crate) mod reference;
mod softmax;
mod window;

pub use catalogue::{Device, Forms, MethodInfo, OptionInfo, Variant, catalogue, find_method};
pub use cosformer::Cosformer;
pub use fnet::Fnet;
pub use hybrid::{GlobalHeads, Hybrid};
pub use linear::Linear;
pub use linformer::{Linformer, Projections, linformer_projections};
pub use options::MethodOptions;
pub use performer::{DEFAULT_FEATURES, Performer, RandomFeatures};
pub(crate) use softmax::resolve_scale;
pub use softmax::{Softmax, SoftmaxAlgorithm};
pub use window::Window;

use crate::base::{CausalForm, Element, Error, Problem, Result, Tensor};
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
}

/// What every method provides. Generic over the element type, so [`Method`] dispatches
/// with [`each_method!`] rather than through a trait object.
pub(crate) trait AttentionMethod {
    /// Checks the options against the problem's shapes.
    fn validate(&self, problem: &Problem) -> Result<()>;

    /// The output's shape (v's rows for every query head, unless the method says
    /// otherwise).
    fn out_shape(&self, problem: &Problem) -> [usize; 4] {
        problem.out_shape()
    }

    /// Scratch bytes of a forward call beyond inputs and output: an upper bound.
    fn workspace_bytes(&self, problem: &Problem, element: usize) -> u128;

    /// Scratch bytes of a backward call beyond inputs and gradients: an upper bound.
    fn backward_workspace_bytes(&self, problem: &Problem, element: usize) -> u128;

    /// Whether the forward checks every input and output for NaN and infinity itself,
    /// while they are in cache.
    fn checks_while_reading(&self, _problem: &Problem) -> bool {
        false
    }

    /// Computes the query heads `heads` into `out`, writing every element of them.
    fn forward<T: Element>(
        &self,
        problem: &Problem,
        q: &Tensor<T>,
        k: &Tensor<T>,
        v: &Tensor<T>,
        out: &mut Tensor<T>,
        heads: Range<usize>,
    ) -> Result<KernelPass<T>>;

    /// Adds the gradients into `grads` (zeroed by the caller); returns Linformer's
    /// projection gradients.
    fn backward<T: Element>(
        &self,
        problem: &Problem,
        inputs: [&Tensor<T>; 4],
        grads: [&mut Tensor<T>; 3],
    ) -> Result<Option<(Vec<f64>, Vec<f64>)>>;

    /// Floating-point operations of the products, the least any form can do.
    fn flops(&self, problem: &Problem) -> f64;

    /// The output computed from the definition in f64 (see [`reference`]).
    fn reference(
        &self,
        problem: &Problem,
        q: &Tensor<f64>,
        k: &Tensor<f64>,
        v: &Tensor<f64>,
    ) -> Result<Tensor<f64>>;

    /// How the method decodes token by token with `heads_q` query heads of `dim_qk`
    /// dims, or why it cannot.
    fn recurrent(&self, heads_q: usize, dim_qk: usize) -> Result<Recurrent>;

    /// The kernel of the kernelized heads, if the method has any.
    fn kernel<T: Element>(&self, _problem: &Problem) -> Result<Option<Kernel<T>>> {
        Ok(None)
    }

    /// The method's entry in the [`catalogue`].
    fn info(&self) -> &'static MethodInfo;
}

/// What a decoder keeps for a method: exact heads over a (ring) cache of keys and
/// values, kernelized heads over a state, or both (hybrid).
pub(crate) struct Recurrent {
    /// Query heads below this attend exactly over the cache; the others read states.
    pub exact_heads: usize,
    /// The exact heads' score scale.
    pub scale: f64,
    /// Keys the exact heads keep (`None`: all of them).
    pub capacity: Option<usize>,
    /// The features m of the kernelized heads' m × d_v states, known before their kernel
    /// is built (drawing Performer's ω is the costly part); `None` without such heads.
    pub state_features: Option<usize>,
    /// Tokens past which the method cannot continue a sequence (cosFormer's fixed M).
    pub max_len: Option<usize>,
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

    /// The method (or [`Variant`]) called `name` in the [`catalogue`], configured by
    /// `options`; an option it does not take is an error, as is one it needs and lacks.
    ///
    /// ```
    /// use linattn::{Method, MethodOptions};
    /// let options = MethodOptions::new(64, 1024);
    /// let naive = Method::from_options("softmax-naive", &options).unwrap();
    /// assert_eq!(naive.name(), "softmax");
    /// assert!(Method::from_options("nope", &options).is_err());
    /// ```
    pub fn from_options(name: &str, options: &MethodOptions) -> Result<Method> {
        let (info, variant) = catalogue::find_method(name).ok_or_else(|| {
            let names: Vec<&str> = catalogue().iter().map(|m| m.name).collect();
            Error::InvalidConfig(format!(
                "no method {name:?}; the methods are {}",
                names.join(", ")
            ))
        })?;
        info.check_options(options)?;
        match variant {
            None => (info.build)(options),
            Some(variant) => {
                let mut options = options.clone();
                for (option, value) in variant.options {
                    options.set(option, value);
                }
                (info.build)(&options)
            }
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
    fn forward<T: Element>(
        &self,
        problem: &Problem,
        q: &Tensor<T>,
        k: &Tensor<T>,
        v: &Tensor<T>,
        out: &mut Tensor<T>,
        heads: Range<usize>,
    ) -> Result<KernelPass<T>> {
        each_method!(self, m => m.forward(problem, q, k, v, out, heads))
    }
    fn backward<T: Element>(
        &self,
        problem: &Problem,
        inputs: [&Tensor<T>; 4],
        grads: [&mut Tensor<T>; 3],
    ) -> Result<Option<(Vec<f64>, Vec<f64>)>> {
        each_method!(self, m => m.backward(problem, inputs, grads))
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

/// Whether the kernelized methods' causal form reads its inputs in row blocks (and so
/// checks them itself): every form but the parallel one.
pub(crate) fn reads_in_blocks(problem: &Problem) -> bool {
    !(problem.causal && problem.causal_form == CausalForm::Parallel)
}
