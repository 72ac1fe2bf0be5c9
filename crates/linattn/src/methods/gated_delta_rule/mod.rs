//! The gated delta rule: the state decays, then is corrected towards each value,
//! `S' = Diag(e^{g_t}) S_{t−1}`, `S_t = S' + β_t k_t (v_t − S'ᵀ k_t)ᵀ`, `o_t = s · S_tᵀ q_t`.
//! `g` `[B, T, HV, 1]` is Gated DeltaNet's (Yang et al., 2025; Qwen3-Next), `[B, T, HV,
//! d_k]` per key channel Kimi Delta Attention's (Kimi Linear); β `[B, T, HV, 1]`.

use super::gated::{Rule, RuleDecay, common_options, gated_method};
use super::info::{Forms, HeadLayout, MethodInfo, OptionInfo, TokenInput};
use super::options::MethodOptions;
use crate::base::{DEFAULT_CHUNK, Problem, Result};

pub(crate) const INFO: MethodInfo = MethodInfo {
    name: "gated-delta-rule",
    summary: "Gated DeltaNet (per key channel: KDA): decay, then the delta rule",
    time: "O(n d²)",
    memory: "O(d²) per head",
    options: common_options!(
        OptionInfo {
            name: "l2norm-qk",
            default: "false",
            what: "L2-normalise q and k inside (use_qk_l2norm_in_kernel)",
        },
        OptionInfo {
            name: "negative-eigenvalues",
            default: "false",
            what: "allow β up to 2 (the state's transition may have negative eigenvalues)",
        },
    ),
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
    token_inputs: &[TokenInput::LogDecay, TokenInput::StepSize],
    weights: false,
    variants: &[],
    parameters: &[],
    examples: &[
        &[("l2norm-qk", "true")],
        &[("chunk", "16"), ("l2norm-qk", "true")],
    ],
};

/// Options of the gated delta rule.
///
/// ```
/// use linattn::{Attention, GateInputs, GatedDeltaRule, Method, Tensor};
/// let x = Tensor::<f32>::randn([1, 100, 2, 16], 0)?;
/// let g = Tensor::from_vec(vec![-0.1f32; 100 * 2], [1, 100, 2, 1])?;
/// let beta = Tensor::from_vec(vec![1.5f32; 100 * 2], [1, 100, 2, 1])?;
/// let method = GatedDeltaRule { l2norm_qk: true, negative_eigenvalues: true, ..GatedDeltaRule::default() };
/// let inputs = GateInputs { g: Some(&g), beta: Some(&beta), ..GateInputs::default() };
/// let attention = Attention::new(Method::GatedDeltaRule(method)).causal(true);
/// assert_eq!(attention.forward_gated(&x, &x, &x, &inputs)?.out.shape(), x.shape());
/// # Ok::<(), linattn::Error>(())
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct GatedDeltaRule {
    /// L2-normalise q and k inside, as flash-linear-attention's `use_qk_l2norm_in_kernel`.
    pub l2norm_qk: bool,
    /// Allow β in [0, 2] instead of [0, 1]: the state's transition `I − β k kᵀ` may then
    /// have negative eigenvalues (Grazzi et al., 2025).
    pub negative_eigenvalues: bool,
    /// The output scale; `d_k^(-1/2)` if `None`.
    pub scale: Option<f64>,
    /// Tokens per chunk of the chunked form.
    pub chunk: usize,
}

impl Default for GatedDeltaRule {
    fn default() -> Self {
        Self {
            l2norm_qk: false,
            negative_eigenvalues: false,
            scale: None,
            chunk: DEFAULT_CHUNK,
        }
    }
}

impl GatedDeltaRule {
    pub(crate) fn from_options(options: &MethodOptions) -> Result<Self> {
        Ok(Self {
            l2norm_qk: options
                .parse("l2norm-qk", "true or false")?
                .unwrap_or(false),
            negative_eigenvalues: options
                .parse("negative-eigenvalues", "true or false")?
                .unwrap_or(false),
            scale: options.parse("scale", "a number")?,
            chunk: super::linear::chunk_option(options)?,
        })
    }

    pub(crate) fn rule(&self, _problem: &Problem) -> Rule {
        Rule {
            method: INFO.name,
            decay: RuleDecay::Input,
            delta: true,
            beta_max: if self.negative_eigenvalues { 2.0 } else { 1.0 },
            scale: self.scale,
            l2norm_qk: self.l2norm_qk,
            chunk: self.chunk,
        }
    }
}

gated_method!(GatedDeltaRule);
