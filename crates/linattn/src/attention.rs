//! The problem description every backend shares, its validation, and the dispatch from a
//! [`Method`] to its kernels.

use crate::cosformer::Cosformer;
use crate::error::{Error, Result};
use crate::fnet::Fnet;
use crate::hybrid::Hybrid;
use crate::kernels::cpu::kernelized::{FinalStates, KernelPass};
use crate::linear::{CausalForm, Linear};
use crate::linformer::Linformer;
use crate::memory;
use crate::performer::Performer;
use crate::softmax::Softmax;
use crate::tensor::{Element, Tensor};
use crate::window::Window;
use std::ops::Range;

/// Shapes of one attention call, validated: q is `[batch, len_q, heads_q, dim_qk]`,
/// k is `[batch, len_k, heads_kv, dim_qk]`, v is `[batch, len_k, heads_kv, dim_v]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Problem {
    pub batch: usize,
    pub len_q: usize,
    pub len_k: usize,
    pub heads_q: usize,
    pub heads_kv: usize,
    pub dim_qk: usize,
    pub dim_v: usize,
    pub causal: bool,
    /// The algorithm of causal kernelized attention.
    pub causal_form: CausalForm,
}

impl Problem {
    /// Checks that the shapes fit together (GQA/MQA: q heads a multiple of k/v heads).
    pub fn new(q: [usize; 4], k: [usize; 4], v: [usize; 4], causal: bool) -> Result<Self> {
        for (name, shape) in [("q", q), ("k", k), ("v", v)] {
            if shape.contains(&0) {
                return Err(Error::Empty {
                    tensor: name,
                    shape: shape.to_vec(),
                });
            }
        }
        let mismatch = |detail: String| Err(Error::ShapeMismatch { detail });
        if q[0] != k[0] || k[0] != v[0] {
            return mismatch(format!(
                "batch sizes differ: q {}, k {}, v {}",
                q[0], k[0], v[0]
            ));
        }
        if k[1] != v[1] {
            return mismatch(format!(
                "k has {} positions but v has {}; they must be the same",
                k[1], v[1]
            ));
        }
        if k[2] != v[2] {
            return mismatch(format!(
                "k has {} heads but v has {}; they must be the same",
                k[2], v[2]
            ));
        }
        if q[3] != k[3] {
            return mismatch(format!(
                "q head_dim {} differs from k head_dim {}",
                q[3], k[3]
            ));
        }
        if !q[2].is_multiple_of(k[2]) {
            return Err(Error::HeadMismatch {
                q_heads: q[2],
                kv_heads: k[2],
            });
        }
        if causal && q[1] != k[1] {
            return mismatch(format!(
                "causal attention needs as many queries as keys (q has {}, k has {}); \
                 continue a sequence through the recurrent state instead",
                q[1], k[1]
            ));
        }
        Ok(Self {
            batch: q[0],
            len_q: q[1],
            len_k: k[1],
            heads_q: q[2],
            heads_kv: k[2],
            dim_qk: q[3],
            dim_v: v[3],
            causal,
            causal_form: CausalForm::Chunked,
        })
    }

    /// The k/v head that query head `h` reads (GQA: consecutive q heads share one).
    #[inline]
    pub fn kv_head(&self, h: usize) -> usize {
        h / (self.heads_q / self.heads_kv)
    }

    /// Shape of the output of every method but FNet: one d_v row per query and head.
    pub fn out_shape(&self) -> [usize; 4] {
        [self.batch, self.len_q, self.heads_q, self.dim_v]
    }
}

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
        match self {
            Method::Softmax(_) => "softmax",
            Method::Window(_) => "window",
            Method::Linear(_) => "linear",
            Method::Performer(_) => "performer",
            Method::Cosformer(_) => "cosformer",
            Method::Linformer(_) => "linformer",
            Method::Fnet(_) => "fnet",
            Method::Hybrid(_) => "hybrid",
        }
    }

    fn validate(&self, problem: &Problem) -> Result<()> {
        match self {
            Method::Softmax(m) => m.validate(problem),
            Method::Window(m) => m.validate(problem),
            Method::Linear(m) => m.validate(problem),
            Method::Performer(m) => m.validate(problem),
            Method::Cosformer(m) => m.validate(problem),
            Method::Linformer(m) => m.validate(problem),
            Method::Fnet(m) => m.validate(problem),
            Method::Hybrid(m) => m.validate(problem),
        }
    }

    fn out_shape(&self, problem: &Problem) -> [usize; 4] {
        match self {
            Method::Fnet(_) => Fnet::out_shape(problem),
            _ => problem.out_shape(),
        }
    }

    fn workspace_bytes(&self, problem: &Problem, element: usize) -> u128 {
        match self {
            Method::Softmax(m) => m.workspace_bytes(problem, element),
            Method::Window(m) => m.workspace_bytes(problem, element),
            Method::Linear(m) => m.workspace_bytes(problem, element),
            Method::Performer(m) => m.workspace_bytes(problem, element),
            Method::Cosformer(m) => m.workspace_bytes(problem, element),
            Method::Linformer(m) => m.workspace_bytes(problem, element),
            Method::Fnet(m) => m.workspace_bytes(problem, element),
            Method::Hybrid(m) => m.workspace_bytes(problem, element),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn run<T: Element>(
        &self,
        problem: &Problem,
        q: &Tensor<T>,
        k: &Tensor<T>,
        v: &Tensor<T>,
        out: &mut Tensor<T>,
        heads: Range<usize>,
    ) -> Result<KernelPass<T>> {
        let inputs = [q, k, v];
        Ok(match self {
            Method::Softmax(m) => {
                m.forward(problem, q, k, v, out, heads);
                KernelPass::unchecked()
            }
            Method::Window(m) => {
                m.forward(problem, q, k, v, out, heads);
                KernelPass::unchecked()
            }
            Method::Linear(m) => m.kernel(problem).forward(problem, inputs, out, heads),
            Method::Performer(m) => m.kernel(problem)?.forward(problem, inputs, out, heads),
            Method::Cosformer(m) => m.kernel(problem).forward(problem, inputs, out, heads),
            Method::Linformer(m) => {
                m.forward(problem, q, k, v, out, heads)?;
                KernelPass::unchecked()
            }
            Method::Fnet(m) => {
                m.forward(v, out);
                KernelPass::unchecked()
            }
            Method::Hybrid(m) => m.forward(problem, q, k, v, out)?,
        })
    }

    /// Whether the method's forward checks every input and output for NaN and infinity
    /// itself, while they are in cache (the kernelized ones that read in row blocks).
    fn checks_while_reading(&self, problem: &Problem) -> bool {
        let parallel = problem.causal && problem.causal_form == CausalForm::Parallel;
        matches!(
            self,
            Method::Linear(_) | Method::Performer(_) | Method::Cosformer(_)
        ) && !parallel
    }
}

impl Method {
    fn backward_workspace_bytes(&self, problem: &Problem, element: usize) -> u128 {
        match self {
            Method::Softmax(m) => m.backward_workspace_bytes(problem, element),
            Method::Window(m) => m.backward_workspace_bytes(problem, element),
            Method::Linear(m) => m.backward_workspace_bytes(problem, element),
            Method::Performer(m) => m.backward_workspace_bytes(problem, element),
            Method::Cosformer(m) => m.backward_workspace_bytes(problem, element),
            Method::Linformer(m) => m.backward_workspace_bytes(problem, element),
            Method::Fnet(m) => m.workspace_bytes(problem, element),
            Method::Hybrid(m) => m.backward_workspace_bytes(problem, element),
        }
    }

    /// Adds the gradients into `grads` (zeroed by the caller); returns Linformer's
    /// projection gradients.
    fn backward<T: Element>(
        &self,
        problem: &Problem,
        inputs: [&Tensor<T>; 4],
        grads: [&mut Tensor<T>; 3],
    ) -> Result<Option<(Vec<f64>, Vec<f64>)>> {
        let heads = 0..problem.heads_q;
        match self {
            Method::Softmax(m) => m.backward(problem, inputs, grads, heads),
            Method::Window(m) => m.backward(problem, inputs, grads, heads),
            Method::Linear(m) => m.kernel(problem).backward(problem, inputs, grads, heads),
            Method::Performer(m) => m.kernel(problem)?.backward(problem, inputs, grads, heads),
            Method::Cosformer(m) => m.kernel(problem).backward(problem, inputs, grads, heads),
            Method::Linformer(m) => return m.backward(problem, inputs, grads).map(Some),
            Method::Fnet(m) => {
                // Re(DFT₂) is its own adjoint on real inputs; q and k get no gradient.
                let [_, _, _, d_out] = inputs;
                let [_, _, dv] = grads;
                m.forward(d_out, dv);
            }
            Method::Hybrid(m) => m.backward(problem, inputs, grads)?,
        }
        Ok(None)
    }
}

/// Gradients of a scalar loss with respect to the inputs of an attention call, given
/// the loss's gradient with respect to its output.
///
/// ```
/// use linattn::{Attention, Method, Tensor};
/// let x = Tensor::<f64>::randn([1, 6, 2, 4], 0).unwrap();
/// let d_out = Tensor::<f64>::randn([1, 6, 2, 4], 1).unwrap();
/// let grads = Attention::new(Method::linear()).causal(true).backward(&x, &x, &x, &d_out).unwrap();
/// assert_eq!(grads.dq.shape(), x.shape());
/// assert!(grads.projections.is_none());
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct Gradients<T> {
    /// ∂loss/∂q.
    pub dq: Tensor<T>,
    /// ∂loss/∂k.
    pub dk: Tensor<T>,
    /// ∂loss/∂v.
    pub dv: Tensor<T>,
    /// Linformer only: ∂loss/∂E and ∂loss/∂F, `max_len × k` row-major (rows past the
    /// sequence are zero).
    pub projections: Option<(Vec<f64>, Vec<f64>)>,
}

/// An attention computation: a [`Method`], causal or not, and a memory limit.
///
/// ```
/// use linattn::{Attention, Method, Tensor};
/// let q = Tensor::<f32>::randn([2, 37, 4, 16], 1).unwrap();
/// let k = Tensor::<f32>::randn([2, 37, 2, 16], 2).unwrap(); // GQA: 2 k/v heads for 4 q heads
/// let v = Tensor::<f32>::randn([2, 37, 2, 8], 3).unwrap();
/// let out = Attention::new(Method::linear()).causal(true).forward(&q, &k, &v).unwrap();
/// assert_eq!(out.shape(), [2, 37, 4, 8]);
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct Attention {
    pub(crate) method: Method,
    causal: bool,
    causal_form: CausalForm,
    memory_limit: Option<u128>,
}

impl Attention {
    /// Non-causal attention by `method`, limited by the memory available.
    pub fn new(method: Method) -> Self {
        Self {
            method,
            causal: false,
            causal_form: CausalForm::Chunked,
            memory_limit: None,
        }
    }

    /// Sets whether query i may only see keys j ≤ i.
    pub fn causal(mut self, causal: bool) -> Self {
        self.causal = causal;
        self
    }

    /// Chooses the algorithm of causal kernelized attention (chunked by default).
    pub fn causal_form(mut self, form: CausalForm) -> Self {
        self.causal_form = form;
        self
    }

    /// Caps the memory one call may allocate (output and scratch), instead of the memory
    /// the system has available.
    ///
    /// ```
    /// use linattn::{Attention, Error, Method, Softmax, SoftmaxAlgorithm, Tensor};
    /// let x = Tensor::<f32>::zeros([1, 4096, 1, 1]).unwrap();
    /// let naive = Method::Softmax(Softmax { algorithm: SoftmaxAlgorithm::Naive, ..Softmax::default() });
    /// let err = Attention::new(naive).memory_limit(1 << 20).forward(&x, &x, &x).unwrap_err();
    /// assert!(matches!(err, Error::OutOfMemory { .. }));
    /// ```
    pub fn memory_limit(mut self, bytes: u64) -> Self {
        self.memory_limit = Some(bytes as u128);
        self
    }

    /// The memory limit set with [`Attention::memory_limit`], if any.
    pub(crate) fn limit(&self) -> Option<u128> {
        self.memory_limit
    }

    /// The method.
    pub fn method(&self) -> &Method {
        &self.method
    }

    /// Whether the attention is causal.
    pub fn is_causal(&self) -> bool {
        self.causal
    }

    /// Validates the shapes and the method's options without computing anything; returns
    /// the output shape.
    ///
    /// ```
    /// use linattn::{Attention, Method};
    /// let shape = Attention::new(Method::linear())
    ///     .output_shape([1, 10, 8, 64], [1, 10, 2, 64], [1, 10, 2, 32])
    ///     .unwrap();
    /// assert_eq!(shape, [1, 10, 8, 32]);
    /// ```
    pub fn output_shape(&self, q: [usize; 4], k: [usize; 4], v: [usize; 4]) -> Result<[usize; 4]> {
        let problem = self.problem(q, k, v)?;
        Ok(self.method.out_shape(&problem))
    }

    /// Bytes of scratch memory a call allocates beyond its inputs and output (an upper
    /// bound, for f32 when `element_bytes` is 4).
    ///
    /// ```
    /// use linattn::{Attention, Method};
    /// let attention = Attention::new(Method::linear()).causal(true);
    /// let small = attention.workspace_bytes([1, 1024, 8, 64], [1, 1024, 8, 64], [1, 1024, 8, 64], 4).unwrap();
    /// let large = attention.workspace_bytes([1, 65536, 8, 64], [1, 65536, 8, 64], [1, 65536, 8, 64], 4).unwrap();
    /// assert_eq!(small, large); // causal linear attention needs constant scratch
    /// ```
    pub fn workspace_bytes(
        &self,
        q: [usize; 4],
        k: [usize; 4],
        v: [usize; 4],
        element_bytes: usize,
    ) -> Result<u128> {
        let problem = self.problem(q, k, v)?;
        Ok(self.method.workspace_bytes(&problem, element_bytes))
    }

    /// Bytes of scratch memory [`Attention::backward`] allocates beyond its inputs and the
    /// gradients it returns (an upper bound).
    ///
    /// ```
    /// use linattn::{Attention, Method};
    /// let shape = [1, 4096, 8, 64];
    /// let linear = Attention::new(Method::linear()).causal(true);
    /// let exact = Attention::new(Method::softmax()).causal(true);
    /// let linear_bytes = linear.backward_workspace_bytes(shape, shape, shape, 4).unwrap();
    /// assert!(linear_bytes < exact.backward_workspace_bytes(shape, shape, shape, 4).unwrap());
    /// ```
    pub fn backward_workspace_bytes(
        &self,
        q: [usize; 4],
        k: [usize; 4],
        v: [usize; 4],
        element_bytes: usize,
    ) -> Result<u128> {
        let problem = self.problem(q, k, v)?;
        Ok(self
            .method
            .backward_workspace_bytes(&problem, element_bytes))
    }

    pub(crate) fn problem(&self, q: [usize; 4], k: [usize; 4], v: [usize; 4]) -> Result<Problem> {
        let mut problem = Problem::new(q, k, v, self.causal)?;
        problem.causal_form = self.causal_form;
        self.method.validate(&problem)?;
        Ok(problem)
    }

    /// Computes the attention of queries `q` over keys `k` and values `v`.
    ///
    /// Fails with a typed [`Error`] for shapes that do not fit, empty or non-finite
    /// inputs, options the method does not allow, and requests larger than the memory
    /// limit; never panics on bad input.
    pub fn forward<T: Element>(
        &self,
        q: &Tensor<T>,
        k: &Tensor<T>,
        v: &Tensor<T>,
    ) -> Result<Tensor<T>> {
        self.forward_with_states(q, k, v).map(|(out, _)| out)
    }

    /// [`Attention::forward`] into a tensor the caller already holds (of the output's
    /// shape), which saves allocating and first touching the output on every call.
    ///
    /// ```
    /// use linattn::{Attention, Method, Tensor};
    /// let x = Tensor::<f32>::randn([1, 64, 2, 16], 0).unwrap();
    /// let attention = Attention::new(Method::linear());
    /// let mut out = Tensor::zeros([1, 64, 2, 16]).unwrap();
    /// attention.forward_into(&x, &x, &x, &mut out).unwrap();
    /// assert_eq!(out, attention.forward(&x, &x, &x).unwrap());
    /// ```
    pub fn forward_into<T: Element>(
        &self,
        q: &Tensor<T>,
        k: &Tensor<T>,
        v: &Tensor<T>,
        out: &mut Tensor<T>,
    ) -> Result<()> {
        let problem = self.problem(q.shape(), k.shape(), v.shape())?;
        let expected = self.method.out_shape(&problem);
        if out.shape() != expected {
            return Err(Error::ShapeMismatch {
                detail: format!(
                    "the output tensor has shape {:?} but the output is {expected:?}",
                    out.shape()
                ),
            });
        }
        self.compute_fits(&problem, q, k, v, 0)?;
        self.compute(&problem, q, k, v, out).map(|_| ())
    }

    /// [`Attention::forward`], also returning the final state of every kv head the
    /// chunked causal form computed (at `b · heads_kv + g`), for the decoder.
    pub(crate) fn forward_with_states<T: Element>(
        &self,
        q: &Tensor<T>,
        k: &Tensor<T>,
        v: &Tensor<T>,
    ) -> Result<(Tensor<T>, FinalStates<T>)> {
        let problem = self.problem(q.shape(), k.shape(), v.shape())?;
        let out_shape = self.method.out_shape(&problem);
        let out_bytes = out_shape
            .iter()
            .fold(size_of::<T>() as u128, |a, &x| a * x as u128);
        // Refuse before allocating: the output counts against the memory limit too.
        self.compute_fits(&problem, q, k, v, out_bytes)?;
        let mut out = Tensor::zeros(out_shape)?;
        let states = self.compute(&problem, q, k, v, &mut out)?;
        Ok((out, states))
    }

    /// Fails when `out_bytes` of output plus the method's scratch exceed the limit.
    fn compute_fits<T: Element>(
        &self,
        problem: &Problem,
        q: &Tensor<T>,
        k: &Tensor<T>,
        v: &Tensor<T>,
        out_bytes: u128,
    ) -> Result<()> {
        let needed = out_bytes + self.method.workspace_bytes(problem, size_of::<T>());
        memory::ensure_fits(
            &format!(
                "{}{} attention with q {:?}, k {:?}, v {:?} ({})",
                if self.causal { "causal " } else { "" },
                self.method.name(),
                q.shape(),
                k.shape(),
                v.shape(),
                T::NAME
            ),
            needed,
            self.memory_limit,
        )
    }

    /// Checks the inputs, computes into `out` (writing every element) and checks the
    /// result.
    fn compute<T: Element>(
        &self,
        problem: &Problem,
        q: &Tensor<T>,
        k: &Tensor<T>,
        v: &Tensor<T>,
        out: &mut Tensor<T>,
    ) -> Result<FinalStates<T>> {
        let checked_in_pass = self.method.checks_while_reading(problem);
        if !checked_in_pass {
            check_inputs([q, k, v])?;
        }
        let pass = self.method.run(problem, q, k, v, out, 0..problem.heads_q)?;
        if pass.finite != Some(true) {
            // The pass saw a NaN or infinity somewhere, or did not look: find it.
            if checked_in_pass {
                check_inputs([q, k, v])?;
            }
            if let Some((index, _)) = out.first_non_finite() {
                return Err(Error::NonFiniteOutput {
                    method: self.method.name(),
                    tensor: "output",
                    index,
                });
            }
        }
        Ok(pass.states)
    }
}

impl Attention {
    /// Gradients of `Σ d_out ∘ forward(q, k, v)` with respect to q, k, v (and Linformer's
    /// E and F). Recomputes what it needs of the forward pass; causal linear methods
    /// never hold an n × n matrix, exact attention holds one only when naive.
    ///
    /// ```
    /// use linattn::{Attention, Method, Tensor};
    /// let q = Tensor::<f32>::randn([2, 33, 4, 16], 0).unwrap();
    /// let kv = Tensor::<f32>::randn([2, 33, 2, 16], 1).unwrap();
    /// let d_out = Tensor::<f32>::randn([2, 33, 4, 16], 2).unwrap();
    /// let grads = Attention::new(Method::softmax()).causal(true).backward(&q, &kv, &kv, &d_out).unwrap();
    /// assert_eq!(grads.dk.shape(), kv.shape());
    /// ```
    pub fn backward<T: Element>(
        &self,
        q: &Tensor<T>,
        k: &Tensor<T>,
        v: &Tensor<T>,
        d_out: &Tensor<T>,
    ) -> Result<Gradients<T>> {
        let problem = self.problem(q.shape(), k.shape(), v.shape())?;
        let out_shape = self.method.out_shape(&problem);
        if d_out.shape() != out_shape {
            return Err(Error::ShapeMismatch {
                detail: format!(
                    "the output gradient has shape {:?} but the output has shape {out_shape:?}",
                    d_out.shape()
                ),
            });
        }
        for (name, tensor) in [("q", q), ("k", k), ("v", v), ("d_out", d_out)] {
            if let Some((index, value)) = tensor.first_non_finite() {
                return Err(Error::NonFinite {
                    tensor: name,
                    index,
                    value,
                });
            }
        }
        let grads_bytes = [q, k, v]
            .iter()
            .map(|t| t.size_bytes() as u128)
            .sum::<u128>();
        let needed = grads_bytes
            + self
                .method
                .backward_workspace_bytes(&problem, size_of::<T>());
        memory::ensure_fits(
            &format!(
                "the backward of {} attention with q {:?}",
                self.method.name(),
                q.shape()
            ),
            needed,
            self.memory_limit,
        )?;
        let (mut dq, mut dk, mut dv) = (
            Tensor::zeros(q.shape())?,
            Tensor::zeros(k.shape())?,
            Tensor::zeros(v.shape())?,
        );
        let projections =
            self.method
                .backward(&problem, [q, k, v, d_out], [&mut dq, &mut dk, &mut dv])?;
        for (name, tensor) in [("dq", &dq), ("dk", &dk), ("dv", &dv)] {
            if let Some((index, _)) = tensor.first_non_finite() {
                return Err(Error::NonFiniteOutput {
                    method: self.method.name(),
                    tensor: name,
                    index,
                });
            }
        }
        Ok(Gradients {
            dq,
            dk,
            dv,
            projections,
        })
    }
}

/// [`Error::NonFinite`] for the first NaN or infinity in q, k or v.
fn check_inputs<T: Element>(inputs: [&Tensor<T>; 3]) -> Result<()> {
    for (name, tensor) in ["q", "k", "v"].into_iter().zip(inputs) {
        if let Some((index, value)) = tensor.first_non_finite() {
            return Err(Error::NonFinite {
                tensor: name,
                index,
                value,
            });
        }
    }
    Ok(())
}

/// Scratch that every one of `tasks` parallel tasks holds at once, bounded by the
/// number of threads.
pub(crate) fn per_thread(tasks: usize, bytes_each: u128) -> u128 {
    tasks.min(rayon::current_num_threads()) as u128 * bytes_each
}
