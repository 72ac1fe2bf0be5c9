//! Retention (RetNet, Sun et al., 2023): the state decays by a fixed γ per head,
//! `S_t = γ_h S_{t−1} + k_t v_tᵀ`, `o_t = s · S_tᵀ q_t`; γ_h = 1 − 2^(−5−h) by default, one
//! per value head.

use super::gated::{Rule, RuleDecay, common_options, gated_method};
use super::info::{Forms, HeadLayout, MethodInfo, OptionInfo};
use super::options::MethodOptions;
use crate::base::{DEFAULT_CHUNK, Error, Problem, Result};

pub(crate) const INFO: MethodInfo = MethodInfo {
    name: "retention",
    summary: "RetNet's retention: the state decays by a fixed γ per head",
    time: "O(n d²)",
    memory: "O(d²) per head",
    options: common_options!(OptionInfo {
        name: "gamma",
        default: "1 − 2^(−5−h)",
        what: "the decay per value head, comma-separated (one value for every head)",
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
    token_inputs: &[],
    weights: false,
    variants: &[],
    parameters: &[],
    examples: &[&[], &[("chunk", "16")], &[("gamma", "0.5")]],
};

/// Options of retention.
///
/// ```
/// use linattn::{Attention, Method, Retention, Tensor};
/// let x = Tensor::<f64>::randn([1, 100, 2, 16], 0)?;
/// let out = Attention::new(Method::Retention(Retention::default())).causal(true).forward(&x, &x, &x)?;
/// assert_eq!(out.shape(), x.shape());
/// # Ok::<(), linattn::Error>(())
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct Retention {
    /// The decay per value head (one value for all); RetNet's `1 − 2^(−5−h)` if empty.
    pub gamma: Vec<f64>,
    /// The output scale; `d_k^(-1/2)` if `None`.
    pub scale: Option<f64>,
    /// Tokens per chunk of the chunked form.
    pub chunk: usize,
}

impl Default for Retention {
    fn default() -> Self {
        Self {
            gamma: Vec::new(),
            scale: None,
            chunk: DEFAULT_CHUNK,
        }
    }
}

impl Retention {
    pub(crate) fn from_options(options: &MethodOptions) -> Result<Self> {
        let gamma = match options.text("gamma") {
            None => Vec::new(),
            Some(text) => text
                .split(',')
                .map(|x| {
                    x.trim().parse::<f64>().map_err(|_| {
                        Error::InvalidConfig(format!("gamma must be numbers, not {text:?}"))
                    })
                })
                .collect::<Result<_>>()?,
        };
        Ok(Self {
            gamma,
            scale: options.parse("scale", "a number")?,
            chunk: super::linear::chunk_option(options)?,
        })
    }

    pub(crate) fn rule(&self, problem: &Problem) -> Rule {
        let heads = problem.heads_v;
        let gamma = |h: usize| match self.gamma.as_slice() {
            [] => 1.0 - (-5.0 - h as f64).exp2(),
            [all] => *all,
            per_head => per_head.get(h).copied().unwrap_or(f64::NAN),
        };
        Rule {
            method: INFO.name,
            decay: RuleDecay::Fixed((0..heads).map(|h| gamma(h).ln()).collect()),
            delta: false,
            beta_max: 1.0,
            scale: self.scale,
            l2norm_qk: false,
            chunk: self.chunk,
        }
    }
}

gated_method!(Retention);
