//! [`Attention`] on GPU tensors: [`GpuPlan`] reads the method (its scale, window, random
//! features and constants) once and calls the CUDA backend's launches, [`DeviceTensor`]
//! for [`GpuTensor`] goes through it, and [`GpuDecoder`] continues causal calls from their
//! state.

use crate::api::attention::Attention;
use crate::api::cuda_gated::GpuGateInputs;
use crate::api::decode::{BlockSizes, DecoderMemory};
use crate::api::device::DeviceTensor;
use crate::backend::cuda::{
    ExactMask, Gpu, GpuElement, GpuForward, GpuGradients, GpuKvCache, GpuLinearState, GpuTensor,
    PerformerOmega, linear_backward, linear_causal, linear_decode, linear_forward_training,
    linear_full, linear_prefill, performer_full, performer_supported, softmax_forward,
    softmax_supported,
};
use crate::base::{Error, Problem, Result};
use crate::engine::feature_map::FAVOR_EPSILON;
use crate::methods::{Device, LINEAR_EPSILON, Method, Performer, resolve_scale};
use half::bf16;
use std::any::Any;
use std::sync::Arc;

impl<T: GpuElement> DeviceTensor for GpuTensor<T> {
    type Decoder = GpuDecoder<T>;
    type Gradients = GpuGradients<T>;

    fn shape(&self) -> [usize; 4] {
        GpuTensor::shape(self)
    }

    fn device(&self) -> Device {
        Device::Cuda
    }

    /// Runs `linear` attention (full, and causal in the chunked form), non-causal
    /// `performer` (head dims multiples of 16 up to 128, up to 256 features) and exact
    /// attention (`softmax`, `window`: full, causal or windowed, head dims up to 256)
    /// through a [`GpuPlan`], and the gated family's causal form through
    /// [`Attention::forward_gated_gpu`] without per-token inputs (as the CPU's `forward`
    /// runs it: retention needs none, the others say which they miss); other methods and
    /// forms are [`Error::Unsupported`] on the GPU for now.
    fn forward(attention: &Attention, q: &Self, k: &Self, v: &Self) -> Result<Self> {
        let gpu = same_gpu([q, k, v])?;
        let problem = attention.problem(q.shape(), k.shape(), v.shape())?;
        if attention.method.gated_rule(&problem).is_some() {
            let inputs = GpuGateInputs::default();
            return Ok(attention.forward_gated_gpu(q, k, v, &inputs)?.out);
        }
        GpuPlan::new(gpu, attention, q.shape(), k.shape(), v.shape())?.forward(q, k, v)
    }

    /// Runs [`Attention::forward_training`] and [`Attention::backward_with`]: bf16 causal
    /// linear attention.
    fn backward(
        attention: &Attention,
        q: &Self,
        k: &Self,
        v: &Self,
        d_out: &Self,
    ) -> Result<GpuGradients<T>> {
        fn as_bf16<T: GpuElement>(x: &GpuTensor<T>) -> Option<&GpuTensor<bf16>> {
            (x as &dyn Any).downcast_ref()
        }
        let (Some(q), Some(k), Some(v), Some(d_out)) =
            (as_bf16(q), as_bf16(k), as_bf16(v), as_bf16(d_out))
        else {
            return Err(Error::Unsupported(format!(
                "the GPU backward takes bf16 tensors, not {}; Attention::backward on the CPU \
                 takes every type",
                T::NAME
            )));
        };
        let forward = attention.forward_training(q, k, v)?;
        let gradients: Box<dyn Any> = Box::new(attention.backward_with(&forward, q, k, v, d_out)?);
        Ok(*gradients
            .downcast::<GpuGradients<T>>()
            .expect("T is bf16: its tensors were"))
    }

    fn prefill(
        attention: &Attention,
        q: &Self,
        k: &Self,
        v: &Self,
    ) -> Result<(Self, GpuDecoder<T>)> {
        let gpu = same_gpu([q, k, v])?;
        let [batch, _, heads_q, dim_qk] = q.shape();
        let [_, _, heads_kv, dim_v] = v.shape();
        let mut decoder = GpuDecoder::new(gpu, attention, batch, heads_q, heads_kv, dim_qk, dim_v)?;
        let out = decoder.prefill(q, k, v)?;
        Ok((out, decoder))
    }
}

/// Which kernels compute a call on the GPU.
enum Route<'a> {
    /// Non-causal FAVOR+, mapped inside the kernels.
    Performer(&'a Performer, Problem),
    /// Exact attention under a mask.
    Exact(ExactMask, Problem),
    /// Linear attention.
    Linear(Problem),
}

/// The kernels that compute `attention` on `problem` (validated as on the CPU), or why
/// the GPU does not take it: rules of shapes alone, known before any launch.
fn route(attention: &Attention, problem: Problem) -> Result<Route<'_>> {
    if attention.method.gated_rule(&problem).is_some() {
        return Err(Error::Unsupported(format!(
            "{} reads per-token inputs: on the GPU, Attention::forward_gated_gpu runs it and \
             Attention::gpu_gated_decoder decodes it",
            attention.method.name()
        )));
    }
    if let Method::Performer(performer) = &attention.method {
        performer_supported(&problem, performer.num_features())?;
        return Ok(Route::Performer(performer, problem));
    }
    match exact_mask(&attention.method, &problem)? {
        Some(mask) => {
            softmax_supported(&problem, mask)?;
            Ok(Route::Exact(mask, problem))
        }
        None => attention.linear_problem(problem).map(Route::Linear),
    }
}

/// An [`Attention`] prepared for GPU tensors of given shapes and element type `T`, the
/// counterpart of the host's [`Plan`](crate::Plan): the shapes and options validated, the
/// kernels chosen, and what the method builds before computing (Performer's ω, drawn and
/// uploaded) kept on the GPU, so that calls through it redo none of that.
///
/// ```no_run
/// use linattn::{Attention, Method, Performer, Tensor, cuda::{Gpu, GpuPlan, GpuTensor}};
/// let gpu = Gpu::open(0)?;
/// let attention = Attention::new(Method::Performer(Performer::new(256, 0)));
/// let shape = [4, 8192, 16, 128];
/// let plan = GpuPlan::<half::bf16>::new(&gpu, &attention, shape, shape, shape)?;
/// for seed in 0..3 {
///     let x = GpuTensor::upload(&gpu, &Tensor::randn(shape, seed)?)?;
///     assert_eq!(plan.forward(&x, &x, &x)?.shape(), shape);
/// }
/// # Ok::<(), linattn::Error>(())
/// ```
pub struct GpuPlan<T> {
    gpu: Arc<Gpu>,
    problem: Problem,
    shapes: [[usize; 4]; 3],
    kernels: PlannedKernels<T>,
}

/// What a [`GpuPlan`] launches, with what it prepared for the launch.
enum PlannedKernels<T> {
    Performer(PerformerOmega<T>),
    Exact(ExactMask),
    Linear,
}

impl<T: GpuElement> GpuPlan<T> {
    /// Prepares calls of `attention` on `gpu` for q, k and v of these shapes; fails as
    /// [`Attention::forward`] would for anything but the inputs' values.
    pub fn new(
        gpu: &Gpu,
        attention: &Attention,
        q: [usize; 4],
        k: [usize; 4],
        v: [usize; 4],
    ) -> Result<Self> {
        let (kernels, problem) = match route(attention, attention.problem(q, k, v)?)? {
            Route::Performer(performer, problem) => {
                let omega = performer.omega(problem.dim_qk)?;
                let omega = PerformerOmega::upload(gpu, &omega, problem.dim_qk)?;
                (PlannedKernels::Performer(omega), problem)
            }
            Route::Exact(mask, problem) => (PlannedKernels::Exact(mask), problem),
            Route::Linear(problem) => (PlannedKernels::Linear, problem),
        };
        Ok(Self {
            gpu: gpu.handle(),
            problem,
            shapes: [q, k, v],
            kernels,
        })
    }

    /// The output's shape.
    pub fn output_shape(&self) -> [usize; 4] {
        self.problem.out_shape()
    }

    /// [`Attention::forward`] through the plan; the inputs must have the planned shapes
    /// and be on the plan's GPU.
    pub fn forward(
        &self,
        q: &GpuTensor<T>,
        k: &GpuTensor<T>,
        v: &GpuTensor<T>,
    ) -> Result<GpuTensor<T>> {
        let gpu = same_gpu([q, k, v])?;
        if gpu.ordinal() != self.gpu.ordinal() {
            return Err(Error::Unsupported(
                "the tensors are on another GPU than the plan's".into(),
            ));
        }
        let shapes = [q.shape(), k.shape(), v.shape()];
        if shapes != self.shapes {
            return Err(Error::ShapeMismatch {
                detail: format!(
                    "the plan is for q, k, v of shapes {:?}, not {shapes:?}",
                    self.shapes
                ),
            });
        }
        let problem = &self.problem;
        match &self.kernels {
            PlannedKernels::Performer(omega) => {
                performer_full(gpu, problem, omega, FAVOR_EPSILON, [q, k, v])
            }
            PlannedKernels::Exact(mask) => {
                let mut out = GpuTensor::for_output(gpu, problem.out_shape())?;
                softmax_forward(gpu, problem, *mask, [q, k, v], &mut out)?;
                Ok(out)
            }
            PlannedKernels::Linear => {
                let mut out = GpuTensor::for_output(gpu, problem.out_shape())?;
                let epsilon = LINEAR_EPSILON as f32;
                if problem.causal {
                    linear_causal(gpu, problem, [q, k, v], epsilon, &mut out, None, None, None)?;
                } else {
                    linear_full(gpu, problem, q, k, v, epsilon, &mut out)?;
                }
                Ok(out)
            }
        }
    }
}

/// Whether the GPU takes `attention` on these shapes: what [`Attention::supports`]
/// asks for [`Device::Cuda`] once the catalogue has said the form runs there.
pub(crate) fn gpu_supports(
    attention: &Attention,
    q: [usize; 4],
    k: [usize; 4],
    v: [usize; 4],
) -> Result<()> {
    let problem = attention.problem(q, k, v)?;
    if attention.method.gated_rule(&problem).is_some() {
        return Ok(());
    }
    route(attention, problem).map(drop)
}

/// The GPU the tensors are all on, or an error if they are not on one.
fn same_gpu<T: GpuElement>(tensors: [&GpuTensor<T>; 3]) -> Result<&Arc<Gpu>> {
    let gpu = tensors[0].gpu();
    if tensors.iter().all(|x| x.gpu().ordinal() == gpu.ordinal()) {
        Ok(gpu)
    } else {
        Err(Error::Unsupported(
            "q, k and v are on different GPUs; copy them to one".into(),
        ))
    }
}

impl Attention {
    /// Causal linear attention on the GPU as [`forward`](Self::forward), keeping what
    /// [`backward_with`](Self::backward_with) needs: the output and each row's
    /// denominator (4 bytes per row and head), so that the backward need not recompute
    /// the forward as [`backward`](Self::backward) does. Takes what `backward_with` takes.
    ///
    /// ```no_run
    /// use half::bf16;
    /// use linattn::{Attention, Method, Tensor, cuda::{Gpu, GpuTensor}};
    /// let gpu = Gpu::open(0)?;
    /// let x = GpuTensor::<bf16>::upload(&gpu, &Tensor::randn([1, 256, 2, 64], 0)?)?;
    /// let attention = Attention::new(Method::linear()).causal(true);
    /// let forward = attention.forward_training(&x, &x, &x)?;
    /// assert_eq!(forward.out.shape(), [1, 256, 2, 64]);
    /// # Ok::<(), linattn::Error>(())
    /// ```
    pub fn forward_training(
        &self,
        q: &GpuTensor<bf16>,
        k: &GpuTensor<bf16>,
        v: &GpuTensor<bf16>,
    ) -> Result<GpuForward> {
        let gpu = same_gpu([q, k, v])?;
        let problem = self.backward_problem(q, k, v)?;
        linear_forward_training(gpu, &problem, [q, k, v], LINEAR_EPSILON as f32)
    }

    /// Gradients of causal linear attention on the GPU: ∂loss/∂q, ∂loss/∂k, ∂loss/∂v
    /// from ∂loss/∂out and what [`forward_training`](Self::forward_training) kept of the
    /// same call, for bf16 heads with `D_k = D_v` in {64, 128} and as many kv heads as
    /// query heads (other cases are refused with [`Error::Unsupported`]; the CPU's
    /// [`Attention::backward`] takes them all). The gradients are three passes of the
    /// causal tensor-core kernel without feature map or denominator (one causal, two
    /// walking the sequence backwards) and prefix sums for the denominator's terms.
    ///
    /// ```no_run
    /// use half::bf16;
    /// use linattn::{Attention, Method, Tensor, cuda::{Gpu, GpuTensor}};
    /// let gpu = Gpu::open(0)?;
    /// let x = GpuTensor::<bf16>::upload(&gpu, &Tensor::randn([1, 256, 2, 64], 0)?)?;
    /// let attention = Attention::new(Method::linear()).causal(true);
    /// let forward = attention.forward_training(&x, &x, &x)?;
    /// let gradients = attention.backward_with(&forward, &x, &x, &x, &x)?;
    /// assert_eq!(gradients.dq.shape(), [1, 256, 2, 64]);
    /// # Ok::<(), linattn::Error>(())
    /// ```
    pub fn backward_with(
        &self,
        forward: &GpuForward,
        q: &GpuTensor<bf16>,
        k: &GpuTensor<bf16>,
        v: &GpuTensor<bf16>,
        d_out: &GpuTensor<bf16>,
    ) -> Result<GpuGradients<bf16>> {
        let gpu = same_gpu([q, k, v])?;
        same_gpu([q, d_out, &forward.out])?;
        let problem = self.backward_problem(q, k, v)?;
        linear_backward(gpu, &problem, [q, k, v], forward, d_out)
    }

    /// The problem of a training call on the GPU, and whether the backward kernels take it.
    fn backward_problem(
        &self,
        q: &GpuTensor<bf16>,
        k: &GpuTensor<bf16>,
        v: &GpuTensor<bf16>,
    ) -> Result<Problem> {
        let problem = self.gpu_problem(q, k, v)?;
        let supported = problem.causal
            && problem.heads_q == problem.heads_kv
            && problem.dim_qk == problem.dim_v
            && matches!(problem.dim_qk, 64 | 128);
        if !supported {
            return Err(Error::Unsupported(format!(
                "the GPU backward takes causal linear attention with head dims 64 or 128 (k's = \
                 v's) and as many kv heads as query heads, not causal = {}, dims {} and {}, \
                 {} query and {} kv heads; Attention::backward on the CPU takes it",
                problem.causal, problem.dim_qk, problem.dim_v, problem.heads_q, problem.heads_kv
            )));
        }
        Ok(problem)
    }

    /// The problem of a linear call on the GPU: shapes checked as on the CPU, then what
    /// the linear kernels take (lengths of k and v equal to q's).
    fn gpu_problem<T: GpuElement>(
        &self,
        q: &GpuTensor<T>,
        k: &GpuTensor<T>,
        v: &GpuTensor<T>,
    ) -> Result<Problem> {
        self.linear_problem(self.problem(q.shape(), k.shape(), v.shape())?)
    }

    /// `problem` (checked as on the CPU) if the linear kernels take it.
    fn linear_problem(&self, problem: Problem) -> Result<Problem> {
        if !matches!(self.method, Method::Linear(_)) {
            return Err(Error::Unsupported(format!(
                "{} has no recurrent form on the GPU (linear does)",
                self.method.name()
            )));
        }
        if problem.len_q != problem.len_k {
            return Err(Error::ShapeMismatch {
                detail: format!(
                    "on the GPU q and k must have the same length, not {} and {}",
                    problem.len_q, problem.len_k
                ),
            });
        }
        Ok(problem)
    }
}

/// Decoding state on the GPU for a batch of sequences, the counterpart of the host's
/// [`Decoder`](crate::Decoder): [`step`](Self::step) feeds one token per sequence,
/// [`prefill`](Self::prefill) a block of them, both from the state so far (the initial
/// state of a causal call) and leaving the state after them in place. Linear attention
/// keeps [`GpuLinearState`], of constant size; exact attention (`softmax`, `window`) keeps
/// the keys and values its later queries see.
///
/// ```no_run
/// use linattn::{Attention, Method, Tensor, cuda::{Gpu, GpuTensor}};
/// let gpu = Gpu::open(0)?;
/// let attention = Attention::new(Method::linear()).causal(true);
/// let prompt = GpuTensor::<f32>::upload(&gpu, &Tensor::randn([32, 100, 16, 128], 0)?)?;
/// let (_, mut decoder) = attention.prefill(&prompt, &prompt, &prompt)?;
/// let token = GpuTensor::<f32>::upload(&gpu, &Tensor::randn([32, 1, 16, 128], 1)?)?;
/// let out = decoder.step(&token, &token, &token)?;
/// assert_eq!(out.shape(), [32, 1, 16, 128]);
/// assert_eq!(decoder.positions(), vec![101; 32]);
/// # Ok::<(), linattn::Error>(())
/// ```
pub struct GpuDecoder<T> {
    gpu: Arc<Gpu>,
    state: DecodingState<T>,
    /// The problem of one token per sequence, validated once: a block's differs only in
    /// its length.
    token: Problem,
    position: usize,
}

/// What a [`GpuDecoder`] carries from one block to the next.
enum DecodingState<T> {
    Linear(GpuLinearState),
    Exact(GpuKvCache<T>, ExactMask),
}

impl<T: GpuElement> GpuDecoder<T> {
    /// A decoder on `gpu` for `batch` empty sequences with the given head counts and
    /// sizes.
    ///
    /// ```no_run
    /// use linattn::{Attention, Method, cuda::{Gpu, GpuDecoder}};
    /// let gpu = Gpu::open(0)?;
    /// let attention = Attention::new(Method::linear());
    /// let decoder = GpuDecoder::<half::bf16>::new(&gpu, &attention, 32, 16, 16, 128, 128)?;
    /// assert_eq!(decoder.memory().bytes_per_token, 0);
    /// # Ok::<(), linattn::Error>(())
    /// ```
    pub fn new(
        gpu: &Gpu,
        attention: &Attention,
        batch: usize,
        heads_q: usize,
        heads_kv: usize,
        dim_qk: usize,
        dim_v: usize,
    ) -> Result<Self> {
        let attention = attention.clone().causal(true);
        let one = |heads, dim| [batch, 1, heads, dim];
        let problem = attention.problem(
            one(heads_q, dim_qk),
            one(heads_kv, dim_qk),
            one(heads_kv, dim_v),
        )?;
        let (state, token) = match route(&attention, problem)? {
            Route::Linear(token) => {
                let state = GpuLinearState::zeros(gpu, batch, heads_kv, dim_qk, dim_v)?;
                (DecodingState::Linear(state), token)
            }
            Route::Exact(mask, token) => {
                let cache = GpuKvCache::new(gpu, &token, mask.left)?;
                (DecodingState::Exact(cache, mask), token)
            }
            Route::Performer(..) => {
                return Err(Error::Unsupported(
                    "performer does not decode on the GPU yet (linear, softmax and window do)"
                        .into(),
                ));
            }
        };
        Ok(Self {
            gpu: gpu.handle(),
            state,
            token,
            position: 0,
        })
    }

    /// Feeds one token per sequence (`[batch, 1, heads, ·]`) and returns its output.
    /// Linear attention's memory and time per step do not grow with the tokens seen.
    pub fn step(
        &mut self,
        q: &GpuTensor<T>,
        k: &GpuTensor<T>,
        v: &GpuTensor<T>,
    ) -> Result<GpuTensor<T>> {
        let problem = self.block_problem([q, k, v], Some(1))?;
        let out = match &mut self.state {
            DecodingState::Linear(state) => {
                linear_decode(&self.gpu, &problem, [q, k, v], LINEAR_EPSILON as f32, state)?
            }
            DecodingState::Exact(cache, mask) => {
                cache.attend(&self.gpu, &problem, *mask, [q, k, v])?
            }
        };
        self.position += 1;
        Ok(out)
    }

    /// Feeds a block of tokens per sequence (`[batch, n, heads, ·]`) and returns their
    /// outputs: the causal form continued from the state so far, leaving the state after
    /// them.
    pub fn prefill(
        &mut self,
        q: &GpuTensor<T>,
        k: &GpuTensor<T>,
        v: &GpuTensor<T>,
    ) -> Result<GpuTensor<T>> {
        let problem = self.block_problem([q, k, v], None)?;
        let out = match &mut self.state {
            DecodingState::Linear(state) => {
                linear_prefill(&self.gpu, &problem, [q, k, v], LINEAR_EPSILON as f32, state)?
            }
            DecodingState::Exact(cache, mask) => {
                cache.attend(&self.gpu, &problem, *mask, [q, k, v])?
            }
        };
        self.position += problem.len_q;
        Ok(out)
    }

    /// Tokens seen by each sequence.
    pub fn positions(&self) -> Vec<usize> {
        vec![self.position; self.token.batch]
    }

    /// The GPU memory the state holds, and what each further token adds: nothing for
    /// linear attention and windows, a key and a value per kv head and sequence for
    /// full exact attention.
    pub fn memory(&self) -> DecoderMemory {
        let token = &self.token;
        match &self.state {
            DecodingState::Linear(state) => DecoderMemory {
                state_bytes: state.bytes(),
                bytes_per_token: 0,
            },
            DecodingState::Exact(cache, mask) => DecoderMemory {
                state_bytes: cache.bytes(),
                bytes_per_token: match mask.left {
                    Some(_) => 0,
                    None => {
                        token.batch * token.heads_kv * (token.dim_qk + token.dim_v) * size_of::<T>()
                    }
                },
            },
        }
    }

    /// Linear attention's state, `S` and `z` of every (sequence, kv head); `None` for
    /// exact attention, whose state is its keys and values.
    pub fn linear_state(&self) -> Option<&GpuLinearState> {
        match &self.state {
            DecodingState::Linear(state) => Some(state),
            DecodingState::Exact(..) => None,
        }
    }

    /// The problem of a block of `tokens` per sequence (any number if `None`), checked
    /// against the decoder's sizes and GPU; nothing of the method is validated again.
    fn block_problem(
        &self,
        [q, k, v]: [&GpuTensor<T>; 3],
        tokens: Option<usize>,
    ) -> Result<Problem> {
        if same_gpu([q, k, v])?.ordinal() != self.gpu.ordinal() {
            return Err(Error::Unsupported(
                "the tokens are on another GPU than the decoder's state".into(),
            ));
        }
        let token = self.token;
        let sizes = BlockSizes {
            batch: token.batch,
            heads_q: token.heads_q,
            heads_kv: token.heads_kv,
            dim_qk: token.dim_qk,
            dim_v: token.dim_v,
        };
        let len = sizes.check([q.shape(), k.shape(), v.shape()], tokens)?;
        Ok(Problem {
            len_q: len,
            len_k: len,
            ..token
        })
    }
}

/// Which keys exact attention sees and its scale, as the CPU method says: `None` for
/// linear attention, an error for methods the GPU does not run.
fn exact_mask(method: &Method, problem: &Problem) -> Result<Option<ExactMask>> {
    let exact = |scale, left, right| {
        Ok(Some(ExactMask {
            scale: resolve_scale(scale, problem.dim_qk)?,
            left,
            right,
        }))
    };
    match method {
        Method::Linear(_) => Ok(None),
        Method::Softmax(m) => exact(m.scale, None, problem.causal.then_some(0)),
        Method::Window(m) => exact(
            m.scale,
            m.left,
            if problem.causal { Some(0) } else { m.right },
        ),
        other => Err(Error::Unsupported(format!(
            "{} does not run on the GPU yet (linear, performer, softmax and window do)",
            other.name()
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Cosformer, Window};

    #[test]
    fn exact_masks_follow_the_cpu_method() {
        let problem = |causal| {
            Problem::new([2, 300, 4, 64], [2, 300, 2, 64], [2, 300, 2, 64], causal).unwrap()
        };
        let mask = |method: Method, causal| {
            let mask = exact_mask(&method, &problem(causal)).unwrap().unwrap();
            (mask.scale, mask.left, mask.right)
        };
        // Softmax: the default scale 1/√64; causal attention sees no key ahead.
        assert_eq!(mask(Method::softmax(), false), (0.125, None, None));
        assert_eq!(mask(Method::softmax(), true), (0.125, None, Some(0)));
        // Window: its sides and scale, the right side closed when causal.
        let window = Window {
            scale: Some(0.5),
            ..Window::new(Some(7), Some(300))
        };
        assert_eq!(
            mask(Method::Window(window.clone()), false),
            (0.5, Some(7), Some(300))
        );
        assert_eq!(mask(Method::Window(window), true), (0.5, Some(7), Some(0)));
        // Linear attention has no mask; other methods do not run on the GPU.
        assert!(
            exact_mask(&Method::linear(), &problem(false))
                .unwrap()
                .is_none()
        );
        let cosformer = Method::Cosformer(Cosformer::default());
        let error = exact_mask(&cosformer, &problem(false)).err().unwrap();
        assert!(matches!(error, Error::Unsupported(_)), "{error}");
    }
}
