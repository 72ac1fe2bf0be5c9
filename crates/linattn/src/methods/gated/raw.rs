//! The gates as a layer computes them, inside the call: `g = −exp(A_log) · softplus(a +
//! dt_bias)` (Mamba-2's and Gated DeltaNet's gate; flash-linear-attention's
//! `fused_gdn_gating` and `use_gate_in_kernel`) and `β = σ(b)` from logits. They are
//! turned into g and β before the state update runs, and their gradients chained back
//! after it.

use super::GateInputs;
use crate::base::{Element, Error, Result, Tensor};

/// The raw inputs of the gate `g = −exp(A_log) · softplus(a + dt_bias)`.
///
/// ```
/// use linattn::{Attention, GateInputs, GatedDeltaRule, Method, RawGate, Tensor};
/// let x = Tensor::<f32>::randn([1, 20, 2, 8], 0)?;
/// let a = Tensor::<f32>::randn([1, 20, 2, 1], 1)?;
/// let logits = Tensor::<f32>::randn([1, 20, 2, 1], 2)?;
/// let gate = RawGate { a: &a, a_log: &[0.0, 0.5], dt_bias: &[0.1, -0.2] };
/// let inputs = GateInputs { raw_gate: Some(gate), beta_logits: Some(&logits), ..GateInputs::default() };
/// let method = Method::GatedDeltaRule(GatedDeltaRule { l2norm_qk: true, ..GatedDeltaRule::default() });
/// let out = Attention::new(method).causal(true).forward_gated(&x, &x, &x, &inputs)?.out;
/// assert_eq!(out.shape(), [1, 20, 2, 8]);
/// # Ok::<(), linattn::Error>(())
/// ```
#[derive(Clone, Copy, Debug)]
pub struct RawGate<'a, T> {
    /// `a`, `[B, T, HV, 1]`, or `[B, T, HV, d_k]` for a gate per key channel.
    pub a: &'a Tensor<T>,
    /// `A_log`, one per value head: `HV` values.
    pub a_log: &'a [T],
    /// `dt_bias`, one per value head (`HV` values) or per value head and key channel
    /// (`HV · d_k`, row-major) as `a` has it.
    pub dt_bias: &'a [T],
}

/// Gradients of the raw gate's inputs.
#[derive(Clone, Debug, PartialEq)]
pub struct RawGateGradients<T> {
    /// ∂loss/∂a, of a's shape.
    pub da: Tensor<T>,
    /// ∂loss/∂A_log.
    pub d_a_log: Vec<T>,
    /// ∂loss/∂dt_bias.
    pub d_dt_bias: Vec<T>,
}

/// g and β computed from the raw inputs a call gave (`None` where it gave g or β).
pub(crate) struct Computed<T> {
    pub g: Option<Tensor<T>>,
    pub beta: Option<Tensor<T>>,
}

impl<T: Element> Computed<T> {
    /// g from `inputs.raw_gate` and β from `inputs.beta_logits`, after checking that each
    /// is given at most one way and that the raw inputs fit together.
    pub fn of(inputs: &GateInputs<'_, T>) -> Result<Self> {
        let both = |what: &str| Err(Error::InvalidConfig(format!("give {what}, not both")));
        if inputs.g.is_some() && inputs.raw_gate.is_some() {
            return both("g or raw_gate");
        }
        if inputs.beta.is_some() && inputs.beta_logits.is_some() {
            return both("beta or beta_logits");
        }
        let g = inputs.raw_gate.map(gate).transpose()?;
        let beta = inputs.beta_logits.map(|logits| {
            let values = logits.as_slice().iter().map(|&x| sigmoid(x)).collect();
            Tensor::from_vec(values, logits.shape())
        });
        Ok(Self {
            g,
            beta: beta.transpose()?,
        })
    }

    /// `inputs` with g and β in place of what they were computed from.
    pub fn inputs<'a>(&'a self, inputs: &GateInputs<'a, T>) -> GateInputs<'a, T> {
        GateInputs {
            g: self.g.as_ref().or(inputs.g),
            beta: self.beta.as_ref().or(inputs.beta),
            raw_gate: None,
            beta_logits: None,
            ..*inputs
        }
    }
}

/// `g = −exp(A_log) · softplus(a + dt_bias)`, checked.
fn gate<T: Element>(raw: RawGate<'_, T>) -> Result<Tensor<T>> {
    let [_, _, heads_v, width] = raw.a.shape();
    let bad = |detail: String| Err(Error::ShapeMismatch { detail });
    if raw.a_log.len() != heads_v {
        return bad(format!(
            "A_log has {} values; a has {heads_v} value heads",
            raw.a_log.len()
        ));
    }
    if raw.dt_bias.len() != heads_v * width && raw.dt_bias.len() != heads_v {
        return bad(format!(
            "dt_bias has {} values; for a of {heads_v} heads × {width} it must have {heads_v} or {}",
            raw.dt_bias.len(),
            heads_v * width
        ));
    }
    for (name, values) in [
        ("a", raw.a.as_slice()),
        ("A_log", raw.a_log),
        ("dt_bias", raw.dt_bias),
    ] {
        if let Some(index) = values.iter().position(|x| !x.is_finite()) {
            return Err(Error::NonFinite {
                tensor: name,
                index: vec![index],
                value: values[index].as_f64(),
            });
        }
    }
    let values = raw
        .a
        .as_slice()
        .iter()
        .enumerate()
        .map(|(index, &a)| {
            let (hv, bias) = head_and_bias(&raw, index);
            -raw.a_log[hv].exp() * softplus(a + bias)
        })
        .collect();
    Tensor::from_vec(values, raw.a.shape())
}

/// The value head of element `index` of a, and its dt_bias.
fn head_and_bias<T: Element>(raw: &RawGate<'_, T>, index: usize) -> (usize, T) {
    let [_, _, heads_v, width] = raw.a.shape();
    let (hv, c) = ((index / width) % heads_v, index % width);
    let bias = if raw.dt_bias.len() == heads_v {
        raw.dt_bias[hv]
    } else {
        raw.dt_bias[hv * width + c]
    };
    (hv, bias)
}

/// The gradients of the raw gate's inputs from ∂g: `∂a = ∂g · (−exp(A_log)) · σ(a +
/// dt_bias)`, `∂dt_bias` its sum over tokens, `∂A_log = Σ ∂g · g`.
pub(crate) fn gate_backward<T: Element>(
    raw: RawGate<'_, T>,
    g: &Tensor<T>,
    dg: &Tensor<T>,
) -> Result<RawGateGradients<T>> {
    let mut d_a_log = vec![T::zero(); raw.a_log.len()];
    let mut d_dt_bias = vec![T::zero(); raw.dt_bias.len()];
    let [_, _, heads_v, width] = raw.a.shape();
    let mut da = Vec::with_capacity(dg.as_slice().len());
    for (index, ((&a, &g), &dg)) in raw
        .a
        .as_slice()
        .iter()
        .zip(g.as_slice())
        .zip(dg.as_slice())
        .enumerate()
    {
        let (hv, bias) = head_and_bias(&raw, index);
        let d = -dg * raw.a_log[hv].exp() * sigmoid(a + bias);
        da.push(d);
        let slot = if raw.dt_bias.len() == heads_v {
            hv
        } else {
            hv * width + index % width
        };
        d_dt_bias[slot] += d;
        d_a_log[hv] += dg * g;
    }
    Ok(RawGateGradients {
        da: Tensor::from_vec(da, raw.a.shape())?,
        d_a_log,
        d_dt_bias,
    })
}

/// ∂b from ∂β for `β = σ(b)`: `∂β · β (1 − β)`.
pub(crate) fn logits_backward<T: Element>(
    beta: &Tensor<T>,
    dbeta: &Tensor<T>,
) -> Result<Tensor<T>> {
    let values = beta
        .as_slice()
        .iter()
        .zip(dbeta.as_slice())
        .map(|(&b, &d)| d * b * (T::one() - b))
        .collect();
    Tensor::from_vec(values, beta.shape())
}

/// `ln(1 + eˣ)`, without overflow for large x.
fn softplus<T: Element>(x: T) -> T {
    x.max(T::zero()) + (-x.abs()).exp().ln_1p()
}

fn sigmoid<T: Element>(x: T) -> T {
    T::one() / (T::one() + (-x).exp())
}
