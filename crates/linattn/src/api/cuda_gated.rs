//! The gated and delta-rule family on GPU tensors: [`Attention::forward_gated_gpu`] checks
//! a call's shapes as the CPU's `forward_gated` does and g's and β's ranges as the kernel
//! reads them, and runs the CUDA backend's chunked forward.

use crate::api::attention::Attention;
use crate::backend::cuda::{
    GatedInputs, GatedRule, Gpu, GpuElement, GpuTensor, OutOfRange, gated_forward,
};
use crate::base::tensor::unravel;
use crate::base::{Error, Result};
use crate::methods::gated::{G_RULE, InputShapes, RuleDecay, gated_shape};
use std::sync::Arc;

/// The per-token inputs of a call of the gated family on the GPU, and the states it starts
/// from: f32, as flash-linear-attention keeps gates, β and states whatever q, k and v are.
/// Shapes as [`GateInputs`](crate::GateInputs) has them.
///
/// ```no_run
/// use linattn::cuda::{Gpu, GpuGateInputs, GpuTensor};
/// use linattn::{Attention, GatedDeltaRule, Method, Tensor};
/// let gpu = Gpu::open(0)?;
/// let x = GpuTensor::<half::bf16>::upload(&gpu, &Tensor::randn([1, 64, 2, 16], 0)?)?;
/// let g = GpuTensor::<f32>::upload(&gpu, &Tensor::from_vec(vec![-0.1; 128], [1, 64, 2, 1])?)?;
/// let beta = GpuTensor::<f32>::upload(&gpu, &Tensor::from_vec(vec![0.5; 128], [1, 64, 2, 1])?)?;
/// let inputs = GpuGateInputs { g: Some(&g), beta: Some(&beta), ..GpuGateInputs::default() };
/// let method = Method::GatedDeltaRule(GatedDeltaRule { l2norm_qk: true, ..GatedDeltaRule::default() });
/// let result = Attention::new(method).causal(true).forward_gated_gpu(&x, &x, &x, &inputs)?;
/// assert_eq!(result.final_state.shape(), [1, 2, 16, 16]);
/// # Ok::<(), linattn::Error>(())
/// ```
#[derive(Clone, Copy, Default)]
pub struct GpuGateInputs<'a> {
    /// The log decays g (every value ≤ 0), `[B, T, HV, 1]` or per key channel `[B, T, HV,
    /// d_k]`: read by `gla` and `gated-delta-rule`.
    pub g: Option<&'a GpuTensor<f32>>,
    /// The step sizes β, `[B, T, HV, 1]`: read by `delta-rule` and `gated-delta-rule`.
    pub beta: Option<&'a GpuTensor<f32>>,
    /// The states to start from, `[B, HV, d_k, d_v]` (`[N, HV, d_k, d_v]` with
    /// `cu_seqlens`); zeros if `None`.
    pub initial_state: Option<&'a GpuTensor<f32>>,
    /// N sequences packed along the length of a batch of one, sequence n over tokens
    /// `cu_seqlens[n]..cu_seqlens[n + 1]`, each with a state of its own.
    pub cu_seqlens: Option<&'a [usize]>,
}

/// What a call of the gated family on the GPU returns.
pub struct GpuGatedOutput<T> {
    /// The output, `[B, T, HV, d_v]`, in q's type.
    pub out: GpuTensor<T>,
    /// The state after the last token, `[B, HV, d_k, d_v]` (per sequence with
    /// `cu_seqlens`), f32: the next call's `initial_state`.
    pub final_state: GpuTensor<f32>,
}

impl Attention {
    /// [`forward_gated`](Self::forward_gated) on GPU tensors: q, k, v of one element type
    /// (f32, bf16 or f16), gates, β and states in f32, all on one GPU. Shapes are checked
    /// before the launch and g's and β's ranges as the kernel reads them; q, k, v and the
    /// states are not looked at for NaN or infinity (their uploads were). The chunk is
    /// the kernel's own (the largest of 64, 32, 16, 8 rows whose tiles fit the GPU's
    /// shared memory), not the method's `chunk` option. See [`GpuGateInputs`] for an
    /// example.
    pub fn forward_gated_gpu<T: GpuElement>(
        &self,
        q: &GpuTensor<T>,
        k: &GpuTensor<T>,
        v: &GpuTensor<T>,
        inputs: &GpuGateInputs<'_>,
    ) -> Result<GpuGatedOutput<T>> {
        let problem = self.problem(q.shape(), k.shape(), v.shape())?;
        let rule = self.method().gated_rule(&problem).ok_or_else(|| {
            Error::Unsupported(format!(
                "{} is not of the gated family; call forward",
                self.method().name()
            ))
        })?;
        let gpu = q.gpu();
        let others = [inputs.g, inputs.beta, inputs.initial_state];
        let on = |x: &Arc<Gpu>| x.ordinal() == gpu.ordinal();
        if ![k.gpu(), v.gpu()].into_iter().all(on) || !others.iter().flatten().all(|x| on(x.gpu()))
        {
            return Err(Error::Unsupported(
                "q, k, v, g, beta and the initial state are on different GPUs; copy them to one"
                    .into(),
            ));
        }
        let shape = gated_shape(&problem);
        let given = InputShapes {
            g: inputs.g.map(GpuTensor::shape),
            beta: inputs.beta.map(GpuTensor::shape),
            initial_state: inputs.initial_state.map(GpuTensor::shape),
        };
        rule.check_shapes(&shape, given, inputs.cu_seqlens)?;
        let fixed: Option<Vec<f32>> = match &rule.decay {
            RuleDecay::Fixed(per_head) => Some(per_head.iter().map(|&g| g as f32).collect()),
            _ => None,
        };
        let kernel_rule = GatedRule {
            fixed: fixed.as_deref(),
            delta: rule.delta,
            beta_max: rule.beta_max as f32,
            scale: rule.scale(shape.dim_k) as f32,
            l2norm: rule.l2norm_qk,
        };
        let kernel_inputs = GatedInputs {
            g: inputs.g,
            beta: inputs.beta,
            initial_state: inputs.initial_state,
            cu_seqlens: inputs.cu_seqlens,
        };
        let (out, final_state, bad) =
            gated_forward(gpu, shape, kernel_rule, [q, k, v], kernel_inputs)?;
        match bad {
            None => Ok(GpuGatedOutput { out, final_state }),
            Some(OutOfRange::G(at)) => Err(out_of_range(
                "g",
                inputs.g.expect("g was read"),
                at,
                G_RULE,
            )?),
            Some(OutOfRange::Beta(at)) => Err(out_of_range(
                "beta",
                inputs.beta.expect("beta was read"),
                at,
                rule.beta_rule(),
            )?),
        }
    }
}

/// The error naming element `at` (flat) of `tensor`, which the kernel found out of range.
fn out_of_range(
    name: &'static str,
    tensor: &GpuTensor<f32>,
    at: usize,
    allowed: &'static str,
) -> Result<Error> {
    let value = f64::from(tensor.download()?.as_slice()[at]);
    let index = unravel(at, &tensor.shape());
    Ok(match value.is_finite() {
        true => Error::OutOfRange {
            tensor: name,
            index,
            value,
            allowed,
        },
        false => Error::NonFinite {
            tensor: name,
            index,
            value,
        },
    })
}
