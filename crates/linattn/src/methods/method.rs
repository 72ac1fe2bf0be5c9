//! What every method implements, and what a decoder asks of it.

use super::info::MethodInfo;
use crate::base::{CausalForm, Element, Error, Problem, Result, Tensor};
use crate::engine::{Kernel, KernelPass};
use std::ops::Range;
use std::sync::Arc;

/// What a method builds once for a problem and element type and reads on every call
/// ([`Plan`](crate::Plan)): nothing of it depends on the inputs' values.
pub(crate) struct Prepared<T> {
    /// The kernel of the kernelized heads, its feature map built (Performer's ω drawn).
    pub kernel: Option<Kernel<T>>,
    /// FNet's FFT plans: along the hidden dims, then along the sequence.
    pub fft: Option<[Arc<dyn rustfft::Fft<T>>; 2]>,
    /// Linformer's projections E and F, `len_k × k` row-major, in `T`.
    pub projections: Option<(Vec<T>, Vec<T>)>,
}

impl<T> Prepared<T> {
    /// Nothing prepared but the kernel (or not even that).
    pub fn with_kernel(kernel: Option<Kernel<T>>) -> Self {
        Self {
            kernel,
            fft: None,
            projections: None,
        }
    }

    /// The kernel, for the methods that have one.
    pub fn kernel(&self) -> Result<&Kernel<T>> {
        self.kernel.as_ref().ok_or_else(no_kernel)
    }
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

    /// What the calls of `problem` in `T` share: the kernel, unless the method says
    /// otherwise.
    fn prepare<T: Element>(&self, problem: &Problem) -> Result<Prepared<T>> {
        self.kernel(problem).map(Prepared::with_kernel)
    }

    /// Computes the query heads `heads` into `out`, writing every element of them; a
    /// kernelized method's kernel runs on the engine unless the method says otherwise.
    #[allow(clippy::too_many_arguments)]
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
        Ok(prepared.kernel()?.forward(problem, [q, k, v], out, heads))
    }

    /// Adds the gradients into `grads` (zeroed by the caller); returns Linformer's
    /// projection gradients. A kernelized method's kernel runs on the engine unless the
    /// method says otherwise.
    fn backward<T: Element>(
        &self,
        problem: &Problem,
        prepared: &Prepared<T>,
        inputs: [&Tensor<T>; 4],
        grads: [&mut Tensor<T>; 3],
    ) -> Result<Option<(Vec<f64>, Vec<f64>)>> {
        prepared
            .kernel()?
            .backward(problem, inputs, grads, 0..problem.heads_q);
        Ok(None)
    }

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

/// Whether the kernelized methods' causal form reads its inputs in row blocks (and so
/// checks them itself): every form but the parallel one.
pub(crate) fn reads_in_blocks(problem: &Problem) -> bool {
    !(problem.causal && problem.causal_form == CausalForm::Parallel)
}

/// A method that computes neither through its own kernels nor through the engine's.
fn no_kernel() -> Error {
    Error::Unsupported("the method has no kernel to compute with".into())
}
