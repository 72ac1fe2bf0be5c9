//! The public API of one attention call: [`Attention`] validates the request, checks it
//! against the memory limit and hands it to its [`Method`].

use crate::api::device::DeviceTensor;
use crate::base::{CausalForm, Element, Error, Problem, Result, Tensor};
use crate::engine::FinalStates;
use crate::methods::{
    AttentionMethod, Device, GateInputs, GatedGradients, GatedOutput, HeadLayout, Method,
};

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

    /// Whether this call runs on `device`: the shapes and options are valid (as for
    /// [`Attention::output_shape`]), the method has the form (full or causal) there, as
    /// the catalogue says, and the device's kernels take these shapes (the GPU's head
    /// dims, say; nothing runs on the GPU without the `cuda` feature); otherwise why not.
    ///
    /// ```
    /// use linattn::{Attention, Device, Error, Method, Performer};
    /// let shape = [1, 128, 4, 64];
    /// let favor = Attention::new(Method::Performer(Performer::new(64, 0))).causal(true);
    /// assert!(favor.supports(shape, shape, shape, Device::Cpu).is_ok());
    /// assert!(matches!(favor.supports(shape, shape, shape, Device::Cuda), Err(Error::Unsupported(_))));
    /// ```
    pub fn supports(
        &self,
        q: [usize; 4],
        k: [usize; 4],
        v: [usize; 4],
        device: Device,
    ) -> Result<()> {
        self.output_shape(q, k, v)?;
        let info = self.method.info();
        let forms = info.forms(device);
        let (has, form) = if self.causal {
            (forms.causal, "causal form")
        } else {
            (forms.full, "full form")
        };
        if !has {
            return Err(Error::Unsupported(format!(
                "{}'s {form} does not run on the {}",
                info.name,
                device.name()
            )));
        }
        match device {
            Device::Cpu => Ok(()),
            #[cfg(feature = "cuda")]
            Device::Cuda => crate::api::cuda::gpu_supports(self, q, k, v),
            #[cfg(not(feature = "cuda"))]
            Device::Cuda => Err(Error::Unsupported(
                "this linattn was built without the `cuda` feature".into(),
            )),
        }
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
        let mut problem = match self.method.info().layout {
            HeadLayout::SharedKeysValues => Problem::new(q, k, v, self.causal)?,
            HeadLayout::GroupedValues => Problem::grouped_values(q, k, v, self.causal)?,
        };
        problem.causal_form = self.causal_form;
        self.method.validate(&problem)?;
        Ok(problem)
    }

    /// Computes the attention of queries `q` over keys `k` and values `v`, on the device
    /// they are on (host [`Tensor`]s or GPU tensors, see [`DeviceTensor`]).
    ///
    /// Fails with a typed [`Error`] for shapes that do not fit, empty or non-finite
    /// inputs, options the method does not allow, forms the device does not have
    /// ([`Attention::supports`]), and requests larger than the memory limit; never
    /// panics on bad input.
    pub fn forward<X: DeviceTensor>(&self, q: &X, k: &X, v: &X) -> Result<X> {
        X::forward(self, q, k, v)
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
        let plan = self.plan_checked(q.shape(), k.shape(), v.shape(), false)?;
        plan.forward_into(q, k, v, out)
    }

    /// [`Attention::forward`], also returning the final state of every kv head the
    /// chunked causal form computed (at `b · heads_kv + g`), for the decoder.
    /// A call of the gated and delta-rule family (`retention`, `gla`, `delta-rule`,
    /// `gated-delta-rule`) with its per-token inputs and initial state, returning the final
    /// state beside the output: flash-linear-attention's `chunk_*` functions with
    /// `initial_state` and `output_final_state`. q and k are `[B, T, H, d_k]`, v `[B, T,
    /// HV, d_v]` with HV a multiple of H. A missing input the method reads, an input it
    /// does not read, a positive log decay or a β out of range is a typed error naming
    /// the tensor and the first bad position. A call of one token runs the recurrent form
    /// (a decode step); longer ones the chunked form, or the parallel form where
    /// [`Attention::causal_form`] asks for it.
    ///
    /// ```
    /// use linattn::{Attention, GateInputs, Gla, Method, Tensor};
    /// let attention = Attention::new(Method::Gla(Gla::default())).causal(true);
    /// let x = Tensor::<f64>::randn([1, 60, 2, 8], 0)?;
    /// let g = Tensor::from_vec(vec![-0.2; 60 * 2], [1, 60, 2, 1])?;
    /// let whole = attention.forward_gated(&x, &x, &x, &GateInputs { g: Some(&g), ..GateInputs::default() })?;
    /// // The same sequence in two calls, the second from the first's final state.
    /// let (first, rest) = (|x: &Tensor<f64>| x.slice_seq(0..25).unwrap(), |x: &Tensor<f64>| x.slice_seq(25..60).unwrap());
    /// let head = attention.forward_gated(&first(&x), &first(&x), &first(&x), &GateInputs { g: Some(&first(&g)), ..GateInputs::default() })?;
    /// let tail_inputs = GateInputs { g: Some(&rest(&g)), initial_state: Some(&head.final_state), ..GateInputs::default() };
    /// let tail = attention.forward_gated(&rest(&x), &rest(&x), &rest(&x), &tail_inputs)?;
    /// let error = (tail.final_state.as_slice().iter().zip(whole.final_state.as_slice()))
    ///     .map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
    /// assert!(error < 1e-12);
    /// # Ok::<(), linattn::Error>(())
    /// ```
    pub fn forward_gated<T: Element>(
        &self,
        q: &Tensor<T>,
        k: &Tensor<T>,
        v: &Tensor<T>,
        inputs: &GateInputs<'_, T>,
    ) -> Result<GatedOutput<T>> {
        let plan = self.plan_checked(q.shape(), k.shape(), v.shape(), true)?;
        plan.forward_gated(q, k, v, inputs)
    }

    /// [`Attention::forward_gated`] into an output the caller already holds (of the
    /// output's shape, `[B, T, HV, d_v]`); returns the final state.
    ///
    /// ```
    /// use linattn::{Attention, GateInputs, Method, Retention, Tensor};
    /// let attention = Attention::new(Method::Retention(Retention::default())).causal(true);
    /// let x = Tensor::<f32>::randn([1, 64, 2, 16], 0)?;
    /// let mut out = Tensor::zeros(x.shape())?;
    /// let state = attention.forward_gated_into(&x, &x, &x, &GateInputs::default(), &mut out)?;
    /// assert_eq!(state.shape(), [1, 2, 16, 16]);
    /// # Ok::<(), linattn::Error>(())
    /// ```
    pub fn forward_gated_into<T: Element>(
        &self,
        q: &Tensor<T>,
        k: &Tensor<T>,
        v: &Tensor<T>,
        inputs: &GateInputs<'_, T>,
        out: &mut Tensor<T>,
    ) -> Result<Tensor<T>> {
        let plan = self.plan_checked(q.shape(), k.shape(), v.shape(), false)?;
        plan.forward_gated_into(q, k, v, inputs, out)
    }

    /// Gradients of `Σ d_out ∘ out + Σ d_final_state ∘ final_state` of a
    /// [`forward_gated`](Self::forward_gated) call with respect to q, k, v, g, β and the
    /// initial state. Recomputes what it needs of the forward.
    ///
    /// ```
    /// use linattn::{Attention, GateInputs, GatedDeltaRule, Method, Tensor};
    /// let attention = Attention::new(Method::GatedDeltaRule(GatedDeltaRule { l2norm_qk: true, ..GatedDeltaRule::default() })).causal(true);
    /// let x = Tensor::<f64>::randn([1, 30, 2, 8], 0)?;
    /// let g = Tensor::from_vec(vec![-0.1; 60], [1, 30, 2, 1])?;
    /// let beta = Tensor::from_vec(vec![0.5; 60], [1, 30, 2, 1])?;
    /// let inputs = GateInputs { g: Some(&g), beta: Some(&beta), ..GateInputs::default() };
    /// let grads = attention.backward_gated(&x, &x, &x, &inputs, &x, None)?;
    /// assert_eq!(grads.dbeta.unwrap().shape(), beta.shape());
    /// # Ok::<(), linattn::Error>(())
    /// ```
    pub fn backward_gated<T: Element>(
        &self,
        q: &Tensor<T>,
        k: &Tensor<T>,
        v: &Tensor<T>,
        inputs: &GateInputs<'_, T>,
        d_out: &Tensor<T>,
        d_final_state: Option<&Tensor<T>>,
    ) -> Result<GatedGradients<T>> {
        let plan = self.plan_unchecked(q.shape(), k.shape(), v.shape())?;
        plan.backward_gated(q, k, v, inputs, d_out, d_final_state)
    }

    pub(crate) fn forward_with_states<T: Element>(
        &self,
        q: &Tensor<T>,
        k: &Tensor<T>,
        v: &Tensor<T>,
    ) -> Result<(Tensor<T>, FinalStates<T>)> {
        let plan = self.plan_checked(q.shape(), k.shape(), v.shape(), true)?;
        plan.forward_with_states(q, k, v)
    }
}

impl Attention {
    /// Gradients of `Σ d_out ∘ forward(q, k, v)` with respect to q, k, v (and Linformer's
    /// E and F). Recomputes what it needs of the forward pass; causal linear methods
    /// never hold an n × n matrix, exact attention holds one only when naive.
    ///
    /// On the device the tensors are on ([`DeviceTensor`]).
    ///
    /// ```
    /// use linattn::{Attention, Method, Tensor};
    /// let q = Tensor::<f32>::randn([2, 33, 4, 16], 0).unwrap();
    /// let kv = Tensor::<f32>::randn([2, 33, 2, 16], 1).unwrap();
    /// let d_out = Tensor::<f32>::randn([2, 33, 4, 16], 2).unwrap();
    /// let grads = Attention::new(Method::softmax()).causal(true).backward(&q, &kv, &kv, &d_out).unwrap();
    /// assert_eq!(grads.dk.shape(), kv.shape());
    /// ```
    pub fn backward<X: DeviceTensor>(
        &self,
        q: &X,
        k: &X,
        v: &X,
        d_out: &X,
    ) -> Result<X::Gradients> {
        X::backward(self, q, k, v, d_out)
    }

    /// [`Attention::backward`] of host tensors.
    pub(crate) fn backward_on_host<T: Element>(
        &self,
        q: &Tensor<T>,
        k: &Tensor<T>,
        v: &Tensor<T>,
        d_out: &Tensor<T>,
    ) -> Result<Gradients<T>> {
        // The backward decides its own memory; the forward's does not apply.
        let plan = self.plan_unchecked(q.shape(), k.shape(), v.shape())?;
        plan.backward(q, k, v, d_out)
    }
}
