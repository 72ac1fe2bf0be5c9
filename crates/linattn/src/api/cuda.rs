//! [`Attention`] on the GPU: the `_cuda` calls read the method (its scale, window,
//! random features and constants) and call the CUDA backend's launches.

use crate::api::attention::Attention;
use crate::backend::cuda::{
    ExactMask, Gpu, GpuElement, GpuForward, GpuGradients, GpuLinearState, GpuTensor,
    linear_backward, linear_causal, linear_decode, linear_forward_training, linear_full,
    linear_prefill, performer_full, performer_supported, softmax_forward,
};
use crate::base::{Error, Problem, Result};
use crate::engine::feature_map::FAVOR_EPSILON;
use crate::methods::{LINEAR_EPSILON, Method, resolve_scale};

impl Attention {
    /// [`Attention::forward`] on the GPU, for tensors already there. Runs `linear`
    /// attention (full, and causal in the chunked form), non-causal `performer` (head
    /// dims multiples of 16 up to 128, up to 256 features) and exact attention
    /// (`softmax`, `window`: full, causal or windowed, head dims up to 256); other
    /// methods and forms are [`Error::Unsupported`] on the GPU for now.
    ///
    /// ```no_run
    /// use linattn::{Attention, Method, Tensor, cuda::{Gpu, GpuTensor}};
    /// let gpu = Gpu::open(0)?;
    /// let x = GpuTensor::<f32>::upload(&gpu, &Tensor::randn([1, 100, 2, 16], 0)?)?;
    /// let out = Attention::new(Method::linear()).forward_cuda(&gpu, &x, &x, &x)?;
    /// assert_eq!(out.shape(), [1, 100, 2, 16]);
    /// let x = GpuTensor::<half::bf16>::upload(&gpu, &Tensor::randn([1, 100, 2, 64], 0)?)?;
    /// let out = Attention::new(Method::softmax()).causal(true).forward_cuda(&gpu, &x, &x, &x)?;
    /// assert_eq!(out.shape(), [1, 100, 2, 64]);
    /// # Ok::<(), linattn::Error>(())
    /// ```
    pub fn forward_cuda<T: GpuElement>(
        &self,
        gpu: &Gpu,
        q: &GpuTensor<T>,
        k: &GpuTensor<T>,
        v: &GpuTensor<T>,
    ) -> Result<GpuTensor<T>> {
        let problem = self.problem(q.shape(), k.shape(), v.shape())?;
        if let Method::Performer(performer) = &self.method {
            performer_supported(&problem, performer.num_features())?;
            let omega = performer.omega(problem.dim_qk)?;
            return performer_full(gpu, &problem, &omega, FAVOR_EPSILON, [q, k, v]);
        }
        let mask = exact_mask(&self.method, &problem)?;
        let problem = match mask {
            Some(_) => problem,
            None => self.linear_problem(problem)?,
        };
        let mut out = GpuTensor::for_output(gpu, problem.out_shape())?;
        match mask {
            Some(mask) => softmax_forward(gpu, &problem, mask, [q, k, v], &mut out)?,
            None if problem.causal => linear_causal(
                gpu,
                &problem,
                [q, k, v],
                LINEAR_EPSILON as f32,
                &mut out,
                None,
                None,
                None,
            )?,
            None => linear_full(gpu, &problem, q, k, v, LINEAR_EPSILON as f32, &mut out)?,
        }
        Ok(out)
    }

    /// The causal forward on the GPU that also starts from `state` (the tokens before
    /// these) and leaves in it the state after them: prefill for
    /// [`Attention::decode_step_cuda`].
    ///
    /// ```no_run
    /// use linattn::{Attention, Method, Tensor, cuda::{Gpu, GpuLinearState, GpuTensor}};
    /// let gpu = Gpu::open(0)?;
    /// let x = GpuTensor::<f32>::upload(&gpu, &Tensor::randn([1, 100, 2, 16], 0)?)?;
    /// let mut state = GpuLinearState::zeros(&gpu, 1, 2, 16, 16)?;
    /// let attention = Attention::new(Method::linear()).causal(true);
    /// let out = attention.prefill_cuda(&gpu, &x, &x, &x, &mut state)?;
    /// assert_eq!(out.shape(), [1, 100, 2, 16]);
    /// # Ok::<(), linattn::Error>(())
    /// ```
    pub fn prefill_cuda<T: GpuElement>(
        &self,
        gpu: &Gpu,
        q: &GpuTensor<T>,
        k: &GpuTensor<T>,
        v: &GpuTensor<T>,
        state: &mut GpuLinearState,
    ) -> Result<GpuTensor<T>> {
        let problem = self.gpu_problem(q, k, v)?;
        if !problem.causal {
            return Err(Error::InvalidConfig(
                "prefill needs a causal attention".into(),
            ));
        }
        linear_prefill(gpu, &problem, [q, k, v], LINEAR_EPSILON as f32, state)
    }

    /// One recurrent step on the GPU for a batch of single tokens (`[B, 1, H, D]`):
    /// absorbs k and v into `state` in place and returns each query's output. Memory
    /// and time per step do not grow with the tokens seen.
    ///
    /// ```no_run
    /// use linattn::{Attention, Method, Tensor, cuda::{Gpu, GpuLinearState, GpuTensor}};
    /// let gpu = Gpu::open(0)?;
    /// let token = GpuTensor::<f32>::upload(&gpu, &Tensor::randn([32, 1, 16, 128], 0)?)?;
    /// let mut state = GpuLinearState::zeros(&gpu, 32, 16, 128, 128)?;
    /// let attention = Attention::new(Method::linear()).causal(true);
    /// let out = attention.decode_step_cuda(&gpu, &token, &token, &token, &mut state)?;
    /// assert_eq!(out.shape(), [32, 1, 16, 128]);
    /// # Ok::<(), linattn::Error>(())
    /// ```
    pub fn decode_step_cuda<T: GpuElement>(
        &self,
        gpu: &Gpu,
        q: &GpuTensor<T>,
        k: &GpuTensor<T>,
        v: &GpuTensor<T>,
        state: &mut GpuLinearState,
    ) -> Result<GpuTensor<T>> {
        let problem = self.gpu_problem(q, k, v)?;
        if problem.len_q != 1 {
            return Err(Error::ShapeMismatch {
                detail: format!(
                    "a decode step takes one token per sequence, not {}",
                    problem.len_q
                ),
            });
        }
        linear_decode(gpu, &problem, [q, k, v], LINEAR_EPSILON as f32, state)
    }

    /// Causal linear attention on the GPU as [`forward_cuda`](Self::forward_cuda), keeping
    /// what [`backward_cuda`](Self::backward_cuda) needs: the output and each row's
    /// denominator (4 bytes per row and head). Takes what `backward_cuda` takes.
    ///
    /// ```no_run
    /// use half::bf16;
    /// use linattn::{Attention, Method, Tensor, cuda::{Gpu, GpuTensor}};
    /// let gpu = Gpu::open(0)?;
    /// let x = GpuTensor::<bf16>::upload(&gpu, &Tensor::randn([1, 256, 2, 64], 0)?)?;
    /// let attention = Attention::new(Method::linear()).causal(true);
    /// let forward = attention.forward_training_cuda(&gpu, &x, &x, &x)?;
    /// assert_eq!(forward.out.shape(), [1, 256, 2, 64]);
    /// # Ok::<(), linattn::Error>(())
    /// ```
    pub fn forward_training_cuda(
        &self,
        gpu: &Gpu,
        q: &GpuTensor<half::bf16>,
        k: &GpuTensor<half::bf16>,
        v: &GpuTensor<half::bf16>,
    ) -> Result<GpuForward> {
        let problem = self.backward_problem(q, k, v)?;
        linear_forward_training(gpu, &problem, [q, k, v], LINEAR_EPSILON as f32)
    }

    /// Gradients of causal linear attention on the GPU: ∂loss/∂q, ∂loss/∂k, ∂loss/∂v
    /// from ∂loss/∂out and what [`forward_training_cuda`](Self::forward_training_cuda)
    /// kept of the same call, for bf16 heads with `D_k = D_v` in {64, 128} and as many
    /// kv heads as query heads (other cases are refused with [`Error::Unsupported`]; the
    /// CPU's [`Attention::backward`] takes them all). The gradients are three passes of
    /// the causal tensor-core kernel without feature map or denominator (one causal, two
    /// walking the sequence backwards) and prefix sums for the denominator's terms.
    ///
    /// ```no_run
    /// use half::bf16;
    /// use linattn::{Attention, Method, Tensor, cuda::{Gpu, GpuTensor}};
    /// let gpu = Gpu::open(0)?;
    /// let x = GpuTensor::<bf16>::upload(&gpu, &Tensor::randn([1, 256, 2, 64], 0)?)?;
    /// let attention = Attention::new(Method::linear()).causal(true);
    /// let forward = attention.forward_training_cuda(&gpu, &x, &x, &x)?;
    /// let gradients = attention.backward_cuda(&gpu, &x, &x, &x, &forward, &x)?;
    /// assert_eq!(gradients.dq.shape(), [1, 256, 2, 64]);
    /// # Ok::<(), linattn::Error>(())
    /// ```
    pub fn backward_cuda(
        &self,
        gpu: &Gpu,
        q: &GpuTensor<half::bf16>,
        k: &GpuTensor<half::bf16>,
        v: &GpuTensor<half::bf16>,
        forward: &GpuForward,
        d_out: &GpuTensor<half::bf16>,
    ) -> Result<GpuGradients> {
        let problem = self.backward_problem(q, k, v)?;
        linear_backward(gpu, &problem, [q, k, v], forward, d_out)
    }

    /// The problem of a training call on the GPU, and whether the backward kernels take it.
    fn backward_problem(
        &self,
        q: &GpuTensor<half::bf16>,
        k: &GpuTensor<half::bf16>,
        v: &GpuTensor<half::bf16>,
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
