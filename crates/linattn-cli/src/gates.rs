//! The per-token inputs the gated family reads, drawn at random where a command measures
//! it without files (`bench`, `explore`): `g = log σ(x)` per token and value head
//! (`gated-delta-rule`), `log σ(x) / 16` per key channel (`gla`, as flash-linear-
//! attention's GLA tests draw it), `β = σ(x′)`, with x, x′ ~ N(0, 1). Their values do not
//! change what a call costs.

use linattn::{Element, GateInputs, Method, Tensor, TokenInput};

/// Random g and β for one call of a method of the gated family (none for the others).
pub struct RandomGates<T> {
    g: Option<Tensor<T>>,
    beta: Option<Tensor<T>>,
}

impl<T: Element> RandomGates<T> {
    /// The inputs `method` reads for v of `v_shape` `[B, T, HV, d_v]` and keys of `dim_k`.
    pub fn for_call(method: &Method, v_shape: [usize; 4], dim_k: usize) -> linattn::Result<Self> {
        let [b, t, hv, _] = v_shape;
        let reads = |input| method.info().token_inputs.contains(&input);
        let logistic = |shape, seed, map: fn(f64) -> f64| -> linattn::Result<Tensor<T>> {
            let x = Tensor::<f64>::randn(shape, seed)?;
            let values = x
                .as_slice()
                .iter()
                .map(|&x| T::of_f64(map(1.0 / (1.0 + (-x).exp()))));
            Tensor::from_vec(values.collect(), shape)
        };
        let g = if !reads(TokenInput::LogDecay) {
            None
        } else if matches!(method, Method::Gla(_)) {
            Some(logistic([b, t, hv, dim_k], 71, |s| s.ln() / 16.0)?)
        } else {
            Some(logistic([b, t, hv, 1], 71, f64::ln)?)
        };
        let beta = if reads(TokenInput::StepSize) {
            Some(logistic([b, t, hv, 1], 72, |s| s)?)
        } else {
            None
        };
        Ok(Self { g, beta })
    }

    /// The inputs, starting from zero states.
    pub fn inputs(&self) -> GateInputs<'_, T> {
        GateInputs {
            g: self.g.as_ref(),
            beta: self.beta.as_ref(),
            ..GateInputs::default()
        }
    }
}
