//! Linear Transformer (Katharopoulos et al., 2020): φ(x) = elu(x) + 1 on queries and
//! keys, no scale, `oᵢ = φ(qᵢ)ᵀ S / (φ(qᵢ)·z + 1e-6)` with `S = Σⱼ φ(kⱼ) vⱼᵀ` and
//! `z = Σⱼ φ(kⱼ)`, the sums over j ≤ i when causal.

pub(crate) mod reference;

use super::info::{Forms, MethodInfo, OptionInfo};
use super::method::{AttentionMethod, Recurrent, reads_in_blocks};
use super::options::MethodOptions;
use crate::base::{DEFAULT_CHUNK, Element, Error, Problem, Result, Tensor};
use crate::engine::feature_map::{EluPlusOne, KernelMap};
use crate::engine::{self as engine, Kernel, Normalizer, StateUpdate};

pub(crate) const INFO: MethodInfo = MethodInfo {
    name: "linear",
    summary: "Linear Transformer, φ = elu + 1",
    time: "O(n d²)",
    memory: "O(d²) per head",
    options: &[OptionInfo {
        name: "chunk",
        default: "64",
        what: "tokens per chunk of the causal form",
    }],
    cpu: Forms {
        full: true,
        causal: true,
        recurrent: true,
    },
    cuda: Forms {
        full: true,
        causal: true,
        recurrent: true,
    },
    layout: super::info::HeadLayout::SharedKeysValues,
    token_inputs: &[],
    weights: true,
    variants: &[],
    parameters: &[],
    examples: &[&[], &[("chunk", "16")]],
};

/// The Linear Transformer's denominator guard, as in its reference implementation.
pub(crate) const LINEAR_EPSILON: f64 = 1e-6;

/// Options of Linear Transformer attention.
///
/// ```
/// use linattn::{Attention, Linear, Method, Tensor};
/// let x = Tensor::<f32>::randn([1, 1000, 4, 32], 0).unwrap();
/// let out = Attention::new(Method::Linear(Linear { chunk: 128 })).causal(true).forward(&x, &x, &x).unwrap();
/// assert_eq!(out.shape(), x.shape());
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct Linear {
    /// Tokens per chunk of the causal form.
    pub chunk: usize,
}

impl Default for Linear {
    fn default() -> Self {
        Self {
            chunk: DEFAULT_CHUNK,
        }
    }
}

impl Linear {
    /// Linear Transformer as options give it.
    pub(crate) fn from_options(options: &MethodOptions) -> Result<Self> {
        Ok(Linear {
            chunk: chunk_option(options)?,
        })
    }
}

/// `--chunk`, or the default chunk.
pub(crate) fn chunk_option(options: &MethodOptions) -> Result<usize> {
    Ok(options
        .parse("chunk", "a number of tokens")?
        .unwrap_or(DEFAULT_CHUNK))
}

pub(crate) fn validate_chunk(chunk: usize) -> Result<()> {
    if chunk == 0 {
        return Err(Error::InvalidConfig("chunk must be at least 1".into()));
    }
    Ok(())
}

impl Linear {
    pub(crate) fn build_kernel<T: Element>(&self, problem: &Problem) -> Kernel<T> {
        Kernel {
            map: KernelMap::EluPlusOne(EluPlusOne {
                dim: problem.dim_qk,
            }),
            update: StateUpdate::Sum,
            normalizer: Normalizer::AddEpsilon(LINEAR_EPSILON),
            chunk: self.chunk,
        }
    }
}

impl AttentionMethod for Linear {
    fn validate(&self, _problem: &Problem) -> Result<()> {
        validate_chunk(self.chunk)
    }

    fn workspace_bytes(&self, problem: &Problem, element: usize) -> u128 {
        engine::workspace_bytes(problem, problem.dim_qk, 0, self.chunk, element)
    }

    fn backward_workspace_bytes(&self, problem: &Problem, element: usize) -> u128 {
        engine::backward_workspace_bytes(problem, problem.dim_qk, 0, self.chunk, element)
    }

    fn checks_while_reading(&self, problem: &Problem) -> bool {
        reads_in_blocks(problem)
    }

    fn flops(&self, problem: &Problem) -> f64 {
        engine::flops(problem, problem.dim_qk, 0)
    }

    fn reference(
        &self,
        problem: &Problem,
        q: &Tensor<f64>,
        k: &Tensor<f64>,
        v: &Tensor<f64>,
    ) -> Result<Tensor<f64>> {
        super::reference::Rows::new(problem.out_shape())
            .fill(problem, 0..problem.heads_q, |b, h, i| {
                reference::linear_row(q, k, v, b, h, i, problem.causal)
            })
            .finish()
    }

    fn recurrent(&self, _heads_q: usize, dim_qk: usize) -> Result<Recurrent> {
        Ok(Recurrent {
            exact_heads: 0,
            scale: 1.0,
            capacity: None,
            state_features: Some(dim_qk),
            max_len: None,
        })
    }

    fn kernel<T: Element>(&self, problem: &Problem) -> Result<Option<Kernel<T>>> {
        Ok(Some(self.build_kernel(problem)))
    }

    fn info(&self) -> &'static MethodInfo {
        &INFO
    }
}
