//! The per-token inputs the gated family reads, drawn at random where a command measures
//! it without files (`bench`, `decode`, `explore`): `g = log σ(x)` per token and value
//! head, `log σ(x) / 16` per key channel (as flash-linear-attention's GLA tests draw
//! it), `β = σ(x′)`, with x, x′ ~ N(0, 1). Their values do not change what a call costs;
//! a gate per key channel does (a d_k-wide decay in every state update).

use crate::error::CliError;
use crate::method_options::MethodName;
use clap::ValueEnum;
use linattn::{Element, GateInputs, HeadLayout, Method, MethodInfo, Tensor, TokenInput};
use serde::{Deserialize, Serialize};

/// How many log decays g holds per token and value head.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Gate {
    /// One log decay per token and value head (simple GLA, Gated DeltaNet, Mamba-2)
    Head,
    /// One per token, value head and key channel (GLA, KDA)
    Channel,
}

impl Gate {
    /// The gate a method of `info` is measured with: `asked`, else its layer's own (gla's
    /// per key channel, gated-delta-rule's per head); `None` for a method that reads no g.
    pub fn of(info: &MethodInfo, asked: Option<Gate>) -> Option<Gate> {
        let own = if info.name == "gla" {
            Gate::Channel
        } else {
            Gate::Head
        };
        let reads_g = info.token_inputs.contains(&TokenInput::LogDecay);
        reads_g.then(|| asked.unwrap_or(own))
    }

    /// The name as `--gate` spells it.
    pub fn name(self) -> &'static str {
        match self {
            Gate::Head => "head",
            Gate::Channel => "channel",
        }
    }
}

/// Whether `method` is of the gated family (its value heads grouped under query and key
/// heads, as flash-linear-attention has them): called with per-token inputs and states.
pub fn of_the_family(method: &Method) -> bool {
    method.info().layout == HeadLayout::GroupedValues
}

/// `method` labelled with its gate where it reads one: `gla (channel gate)`.
pub fn label(method: &str, gate: Option<Gate>) -> String {
    match gate {
        Some(gate) => format!("{method} ({} gate)", gate.name()),
        None => method.to_string(),
    }
}

/// Refuses `--gate` when none of `methods` reads a gate.
pub fn check_read(gate: Option<Gate>, methods: &[MethodName]) -> Result<(), CliError> {
    match gate {
        Some(_) if methods.iter().all(|m| Gate::of(m.info(), None).is_none()) => {
            let names: Vec<&str> = methods.iter().map(|m| m.name()).collect();
            Err(CliError::Usage(format!(
                "--gate applies to none of {}: gla and gated-delta-rule read a gate",
                names.join(", ")
            )))
        }
        _ => Ok(()),
    }
}

/// Random g and β for one call of a method of the gated family (none for the others).
pub struct RandomGates<T> {
    g: Option<Tensor<T>>,
    beta: Option<Tensor<T>>,
}

impl<T: Element> RandomGates<T> {
    /// The inputs `method` reads for v of `v_shape` `[B, T, HV, d_v]` and keys of `dim_k`,
    /// g drawn for `gate` (see [`Gate::of`]).
    pub fn for_call(
        method: &Method,
        gate: Option<Gate>,
        v_shape: [usize; 4],
        dim_k: usize,
    ) -> linattn::Result<Self> {
        let [b, t, hv, _] = v_shape;
        let logistic = |shape, seed, map: fn(f64) -> f64| -> linattn::Result<Tensor<T>> {
            let x = Tensor::<f64>::randn(shape, seed)?;
            let values = x
                .as_slice()
                .iter()
                .map(|&x| T::of_f64(map(1.0 / (1.0 + (-x).exp()))));
            Tensor::from_vec(values.collect(), shape)
        };
        let g = match Gate::of(method.info(), gate) {
            None => None,
            Some(Gate::Channel) => Some(logistic([b, t, hv, dim_k], 71, |s| s.ln() / 16.0)?),
            Some(Gate::Head) => Some(logistic([b, t, hv, 1], 71, f64::ln)?),
        };
        let beta = if method.info().token_inputs.contains(&TokenInput::StepSize) {
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

#[cfg(test)]
mod tests {
    use super::*;
    use linattn::{DeltaRule, GatedDeltaRule, Gla, Retention};

    #[test]
    fn g_is_drawn_for_the_gate_asked_for_or_the_layers_own() {
        let gla = Method::Gla(Gla::default());
        let gated_delta_rule = Method::GatedDeltaRule(GatedDeltaRule::default());
        let (v_shape, dim_k) = ([2, 5, 3, 4], 8);
        let g_shape = |method: &Method, gate| {
            let gates = RandomGates::<f32>::for_call(method, gate, v_shape, dim_k).unwrap();
            gates.g.map(|g| g.shape())
        };
        assert_eq!(g_shape(&gla, None), Some([2, 5, 3, 8]));
        assert_eq!(g_shape(&gla, Some(Gate::Head)), Some([2, 5, 3, 1]));
        assert_eq!(g_shape(&gated_delta_rule, None), Some([2, 5, 3, 1]));
        let kda = Some(Gate::Channel);
        assert_eq!(g_shape(&gated_delta_rule, kda), Some([2, 5, 3, 8]));
        let retention = Method::Retention(Retention::default());
        assert_eq!(g_shape(&retention, kda), None);
        let delta_rule = Method::DeltaRule(DeltaRule::default());
        assert_eq!(Gate::of(delta_rule.info(), kda), None);
        // Log decays below 0, per key channel a sixteenth of E[log σ(x)] ≈ −0.81 on average.
        let mean = |gate| {
            let gates = RandomGates::<f64>::for_call(&gla, Some(gate), v_shape, dim_k).unwrap();
            let g = gates.g.unwrap();
            assert!(g.as_slice().iter().all(|&x| x < 0.0));
            g.as_slice().iter().sum::<f64>() / g.as_slice().len() as f64
        };
        let (head, channel) = (mean(Gate::Head), mean(Gate::Channel));
        assert!((-1.2..-0.5).contains(&head), "{head}");
        assert!((-0.08..-0.03).contains(&channel), "{channel}");
    }
}
