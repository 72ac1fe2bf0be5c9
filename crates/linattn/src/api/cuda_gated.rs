//! The gated and delta-rule family on GPU tensors: [`Attention::forward_gated_gpu`] checks
//! a call's shapes as the CPU's `forward_gated` does and g's and β's ranges as the kernel
//! reads them, and runs the CUDA backend's chunked forward; [`GpuGatedDecoder`] steps a
//! batch of sequences one token at a time.

use crate::api::attention::Attention;
use crate::backend::cuda::{
    GatedInputs, GatedRule, Gpu, GpuElement, GpuTensor, OutOfRange, gated_decode, gated_forward,
};
use crate::base::tensor::unravel;
use crate::base::{Error, GatedShape, Result, Tensor};
use crate::methods::gated::{G_RULE, InputShapes, Rule, RuleDecay, gated_shape};
use std::marker::PhantomData;
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
        let fixed = fixed_decays(&rule);
        let kernel_rule = kernel_rule(&rule, &shape, fixed.as_deref());
        let kernel_inputs = GatedInputs {
            g: inputs.g,
            beta: inputs.beta,
            initial_state: inputs.initial_state,
            cu_seqlens: inputs.cu_seqlens,
        };
        let (out, final_state, bad) =
            gated_forward(gpu, shape, kernel_rule, [q, k, v], kernel_inputs)?;
        named_range_error(bad, &rule, inputs.g, inputs.beta)?;
        Ok(GpuGatedOutput { out, final_state })
    }

    /// A decoder of the gated family on `gpu` for `batch` sequences from zero states: q
    /// and k of `heads` heads of `dim_k`, v of `heads_v` heads of `dim_v`. See
    /// [`GpuGatedDecoder`].
    pub fn gpu_gated_decoder<T: GpuElement>(
        &self,
        gpu: &Gpu,
        batch: usize,
        [heads, heads_v]: [usize; 2],
        [dim_k, dim_v]: [usize; 2],
    ) -> Result<GpuGatedDecoder<T>> {
        let attention = self.clone().causal(true);
        let qk = [batch, 1, heads, dim_k];
        let token = attention.problem(qk, qk, [batch, 1, heads_v, dim_v])?;
        let rule = attention.method().gated_rule(&token).ok_or_else(|| {
            Error::Unsupported(format!(
                "{} is not of the gated family; GpuDecoder decodes it",
                attention.method().name()
            ))
        })?;
        Ok(GpuGatedDecoder {
            gpu: gpu.handle(),
            shape: gated_shape(&token),
            fixed: fixed_decays(&rule),
            rule,
            states: GpuTensor::upload(gpu, &Tensor::zeros([batch, heads_v, dim_k, dim_v])?)?,
            position: 0,
            element: PhantomData,
        })
    }

    /// [`forward_gated_gpu`](Self::forward_gated_gpu) over a prompt (batch rows, not
    /// packed), and the decoder that continues each sequence from its final state.
    pub fn prefill_gated_gpu<T: GpuElement>(
        &self,
        q: &GpuTensor<T>,
        k: &GpuTensor<T>,
        v: &GpuTensor<T>,
        inputs: &GpuGateInputs<'_>,
    ) -> Result<(GpuTensor<T>, GpuGatedDecoder<T>)> {
        if inputs.cu_seqlens.is_some() {
            return Err(Error::InvalidConfig(
                "a decoder continues a batch of sequences; give them as batch rows, not packed \
                 by cu_seqlens"
                    .into(),
            ));
        }
        let [batch, len, heads, dim_k] = q.shape();
        let [_, _, heads_v, dim_v] = v.shape();
        let mut decoder =
            self.gpu_gated_decoder(q.gpu(), batch, [heads, heads_v], [dim_k, dim_v])?;
        let result = self.forward_gated_gpu(q, k, v, inputs)?;
        decoder.states = result.final_state;
        decoder.position = len;
        Ok((result.out, decoder))
    }
}

/// Decoding the gated family on the GPU for a batch of sequences, one token each per
/// [`step`](Self::step): the f32 states `[B, HV, d_k, d_v]` stay on the GPU and are
/// updated in place; a step reads and writes each once and allocates only its output.
///
/// ```no_run
/// use linattn::cuda::{Gpu, GpuTensor};
/// use linattn::{Attention, GatedDeltaRule, Method, Tensor};
/// let gpu = Gpu::open(0)?;
/// let method = Method::GatedDeltaRule(GatedDeltaRule { l2norm_qk: true, ..GatedDeltaRule::default() });
/// let attention = Attention::new(method);
/// let mut decoder = attention.gpu_gated_decoder::<half::bf16>(&gpu, 32, [16, 32], [128, 128])?;
/// let qk = GpuTensor::upload(&gpu, &Tensor::randn([32, 1, 16, 128], 0)?)?;
/// let v = GpuTensor::upload(&gpu, &Tensor::randn([32, 1, 32, 128], 1)?)?;
/// let g = GpuTensor::<f32>::upload(&gpu, &Tensor::from_vec(vec![-0.1; 32 * 32], [32, 1, 32, 1])?)?;
/// let beta = GpuTensor::<f32>::upload(&gpu, &Tensor::from_vec(vec![0.5; 32 * 32], [32, 1, 32, 1])?)?;
/// let out = decoder.step(&qk, &qk, &v, Some(&g), Some(&beta))?;
/// assert_eq!((out.shape(), decoder.position()), ([32, 1, 32, 128], 1));
/// # Ok::<(), linattn::Error>(())
/// ```
pub struct GpuGatedDecoder<T> {
    gpu: Arc<Gpu>,
    rule: Rule,
    /// One token of every sequence, validated once.
    shape: GatedShape,
    fixed: Option<Vec<f32>>,
    states: GpuTensor<f32>,
    position: usize,
    element: PhantomData<T>,
}

impl<T: GpuElement> GpuGatedDecoder<T> {
    /// Feeds one token per sequence (`[B, 1, ·, ·]`; g `[B, 1, HV, 1 or d_k]` and β `[B,
    /// 1, HV, 1]` where the method reads them) through the recurrence and returns its
    /// output `[B, 1, HV, d_v]`. A g or β out of range is an error naming it, after which
    /// the states are undefined.
    pub fn step(
        &mut self,
        q: &GpuTensor<T>,
        k: &GpuTensor<T>,
        v: &GpuTensor<T>,
        g: Option<&GpuTensor<f32>>,
        beta: Option<&GpuTensor<f32>>,
    ) -> Result<GpuTensor<T>> {
        let s = self.shape;
        let qk = [s.batch, 1, s.heads, s.dim_k];
        let expected = [qk, qk, [s.batch, 1, s.heads_v, s.dim_v]];
        for ((name, tensor), shape) in ["q", "k", "v"].into_iter().zip([q, k, v]).zip(expected) {
            if tensor.shape() != shape {
                return Err(Error::ShapeMismatch {
                    detail: format!(
                        "{name} is {:?}; the decoder takes one token per sequence, {shape:?}",
                        tensor.shape()
                    ),
                });
            }
        }
        let on = |x: &Arc<Gpu>| x.ordinal() == self.gpu.ordinal();
        let gates = [g, beta].into_iter().flatten();
        if ![q.gpu(), k.gpu(), v.gpu()].into_iter().all(on) || !gates.clone().all(|x| on(x.gpu())) {
            return Err(Error::Unsupported(
                "the token and its gates are on another GPU than the decoder's states".into(),
            ));
        }
        let given = InputShapes {
            g: g.map(GpuTensor::shape),
            beta: beta.map(GpuTensor::shape),
            initial_state: None,
        };
        self.rule.check_shapes(&s, given, None)?;
        let rule = kernel_rule(&self.rule, &s, self.fixed.as_deref());
        let (out, bad) = gated_decode(&self.gpu, s, rule, [q, k, v], (g, beta), &mut self.states)?;
        named_range_error(bad, &self.rule, g, beta)?;
        self.position += 1;
        Ok(out)
    }

    /// The states `[B, HV, d_k, d_v]` after the tokens so far.
    pub fn states(&self) -> &GpuTensor<f32> {
        &self.states
    }

    /// Tokens seen by every sequence.
    pub fn position(&self) -> usize {
        self.position
    }
}

/// The fixed log decays of a rule that has them (retention's, one per value head).
fn fixed_decays(rule: &Rule) -> Option<Vec<f32>> {
    match &rule.decay {
        RuleDecay::Fixed(per_head) => Some(per_head.iter().map(|&g| g as f32).collect()),
        _ => None,
    }
}

/// What the kernels take of a rule.
fn kernel_rule<'a>(rule: &Rule, shape: &GatedShape, fixed: Option<&'a [f32]>) -> GatedRule<'a> {
    GatedRule {
        fixed,
        delta: rule.delta,
        beta_max: rule.beta_max as f32,
        scale: rule.scale(shape.dim_k) as f32,
        l2norm: rule.l2norm_qk,
    }
}

/// The error naming what the kernel found out of range, if it found anything.
fn named_range_error(
    bad: Option<OutOfRange>,
    rule: &Rule,
    g: Option<&GpuTensor<f32>>,
    beta: Option<&GpuTensor<f32>>,
) -> Result<()> {
    match bad {
        None => Ok(()),
        Some(OutOfRange::G(at)) => Err(out_of_range("g", g.expect("g was read"), at, G_RULE)?),
        Some(OutOfRange::Beta(at)) => Err(out_of_range(
            "beta",
            beta.expect("beta was read"),
            at,
            rule.beta_rule(),
        )?),
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
