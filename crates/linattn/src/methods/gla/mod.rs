//! Gated linear attention: the state decays by a gate read per token, `S_t = Diag(e^{g_t})
//! S_{t−1} + k_t v_tᵀ`, `o_t = s · S_tᵀ q_t`. `g` `[B, T, HV, 1]` is one log decay per token
//! and value head (Mamba-2's SSD, flash-linear-attention's `chunk_simple_gla`); `[B, T,
//! HV, d_k]` one per key channel (GLA, Yang et al., 2024: `chunk_gla`).

use super::gated::{Rule, RuleDecay, common_options, gated_method};
use super::info::{Forms, HeadLayout, MethodInfo, OptionInfo, TokenInput};
use super::options::MethodOptions;
use crate::base::{DEFAULT_CHUNK, Problem, Result};

pub(crate) const INFO: MethodInfo = MethodInfo {
    name: "gla",
    summary: "gated linear attention: the state decays by a gate per token (per key channel)",
    time: "O(n d²)",
    memory: "O(d²) per head",
    options: common_options!(),
    cpu: Forms {
        full: false,
        causal: true,
        recurrent: true,
    },
    cuda: Forms {
        full: false,
        causal: true,
        recurrent: true,
    },
    layout: HeadLayout::GroupedValues,
    token_inputs: &[TokenInput::LogDecay],
    weights: false,
    variants: &[],
    parameters: &[],
    examples: &[&[], &[("chunk", "16")]],
};

/// Options of gated linear attention.
///
/// ```
/// use linattn::{Attention, GateInputs, Gla, Method, Tensor};
/// let x = Tensor::<f32>::randn([1, 100, 2, 16], 0)?;
/// let g = Tensor::from_vec(vec![-0.05f32; 100 * 2 * 16], [1, 100, 2, 16])?; // per channel
/// let attention = Attention::new(Method::Gla(Gla::default())).causal(true);
/// let inputs = GateInputs { g: Some(&g), ..GateInputs::default() };
/// assert_eq!(attention.forward_gated(&x, &x, &x, &inputs)?.out.shape(), x.shape());
/// # Ok::<(), linattn::Error>(())
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct Gla {
    /// The output scale; `d_k^(-1/2)` if `None`.
    pub scale: Option<f64>,
    /// Tokens per chunk of the chunked form.
    pub chunk: usize,
}

impl Default for Gla {
    fn default() -> Self {
        Self {
            scale: None,
            chunk: DEFAULT_CHUNK,
        }
    }
}

impl Gla {
    pub(crate) fn from_options(options: &MethodOptions) -> Result<Self> {
        Ok(Self {
            scale: options.parse("scale", "a number")?,
            chunk: super::linear::chunk_option(options)?,
        })
    }

    pub(crate) fn rule(&self, _problem: &Problem) -> Rule {
        Rule {
            method: INFO.name,
            decay: RuleDecay::Input,
            delta: false,
            beta_max: 1.0,
            scale: self.scale,
            l2norm_qk: false,
            chunk: self.chunk,
        }
    }
}

gated_method!(Gla);
