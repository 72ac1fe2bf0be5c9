//! DeltaNet's delta rule (Schlag et al., 2021; chunked by Yang et al., 2024): the state is
//! corrected towards each value instead of added to, `S_t = S_{t−1} + β_t k_t (v_t −
//! S_{t−1}ᵀ k_t)ᵀ`, `o_t = s · S_tᵀ q_t`, with a step size β `[B, T, HV, 1]` per token.

use super::gated::{Rule, RuleDecay, common_options, gated_method};
use super::info::{Forms, HeadLayout, MethodInfo, OptionInfo, TokenInput};
use super::options::MethodOptions;
use crate::base::{DEFAULT_CHUNK, Problem, Result};

pub(crate) const INFO: MethodInfo = MethodInfo {
    name: "delta-rule",
    summary: "DeltaNet: the state is corrected towards each value by a step β",
    time: "O(n d²)",
    memory: "O(d²) per head",
    options: common_options!(OptionInfo {
        name: "l2norm-qk",
        default: "false",
        what: "L2-normalise q and k inside (use_qk_l2norm_in_kernel)",
    }),
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
    token_inputs: &[TokenInput::StepSize],
    weights: false,
    variants: &[],
    parameters: &[],
    examples: &[
        &[("l2norm-qk", "true")],
        &[("chunk", "16"), ("l2norm-qk", "true")],
    ],
};

/// Options of the delta rule.
///
/// ```
/// use linattn::{Attention, DeltaRule, GateInputs, Method, Tensor};
/// let x = Tensor::<f32>::randn([1, 100, 2, 16], 0)?;
/// let beta = Tensor::from_vec(vec![0.9f32; 100 * 2], [1, 100, 2, 1])?;
/// let method = Method::DeltaRule(DeltaRule { l2norm_qk: true, ..DeltaRule::default() });
/// let inputs = GateInputs { beta: Some(&beta), ..GateInputs::default() };
/// let result = Attention::new(method).causal(true).forward_gated(&x, &x, &x, &inputs)?;
/// assert_eq!(result.out.shape(), x.shape());
/// # Ok::<(), linattn::Error>(())
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct DeltaRule {
    /// L2-normalise q and k inside, as flash-linear-attention's `use_qk_l2norm_in_kernel`.
    pub l2norm_qk: bool,
    /// The output scale; `d_k^(-1/2)` if `None`.
    pub scale: Option<f64>,
    /// Tokens per chunk of the chunked form.
    pub chunk: usize,
}

impl Default for DeltaRule {
    fn default() -> Self {
        Self {
            l2norm_qk: false,
            scale: None,
            chunk: DEFAULT_CHUNK,
        }
    }
}

impl DeltaRule {
    pub(crate) fn from_options(options: &MethodOptions) -> Result<Self> {
        Ok(Self {
            l2norm_qk: options
                .parse("l2norm-qk", "true or false")?
                .unwrap_or(false),
            scale: options.parse("scale", "a number")?,
            chunk: super::linear::chunk_option(options)?,
        })
    }

    pub(crate) fn rule(&self, _problem: &Problem) -> Rule {
        Rule {
            method: INFO.name,
            decay: RuleDecay::None,
            delta: true,
            beta_max: 1.0,
            scale: self.scale,
            l2norm_qk: self.l2norm_qk,
            chunk: self.chunk,
        }
    }
}

gated_method!(DeltaRule);
