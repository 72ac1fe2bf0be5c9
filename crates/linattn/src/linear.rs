//! Linear Transformer (Katharopoulos et al., 2020): φ(x) = elu(x) + 1 on queries and
//! keys, no scale, `oᵢ = φ(qᵢ)ᵀ S / (φ(qᵢ)·z + 1e-6)` with `S = Σⱼ φ(kⱼ) vⱼᵀ` and
//! `z = Σⱼ φ(kⱼ)`, the sums over j ≤ i when causal.

use crate::attention::Problem;
use crate::error::{Error, Result};
use crate::feature_map::EluPlusOne;
use crate::kernels::cpu::kernelized::{self, Normalizer};
use crate::tensor::{Element, Tensor};
use std::ops::Range;

/// The Linear Transformer's denominator guard, as in its reference implementation.
pub(crate) const LINEAR_EPSILON: f64 = 1e-6;

const NORMALIZER: Normalizer = Normalizer::AddEpsilon(LINEAR_EPSILON);

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

/// Chunk length of the causal kernelized forms unless chosen otherwise.
pub const DEFAULT_CHUNK: usize = 64;

impl Default for Linear {
    fn default() -> Self {
        Self {
            chunk: DEFAULT_CHUNK,
        }
    }
}

pub(crate) fn validate_chunk(chunk: usize) -> Result<()> {
    if chunk == 0 {
        return Err(Error::InvalidConfig("chunk must be at least 1".into()));
    }
    Ok(())
}

impl Linear {
    pub(crate) fn validate(&self, _problem: &Problem) -> Result<()> {
        validate_chunk(self.chunk)
    }

    pub(crate) fn workspace_bytes(&self, problem: &Problem, element: usize) -> u128 {
        kernelized::workspace_bytes(problem, problem.dim_qk, 0, self.chunk, element)
    }

    pub(crate) fn backward_workspace_bytes(&self, problem: &Problem, element: usize) -> u128 {
        kernelized::backward_workspace_bytes(problem, problem.dim_qk, 0, self.chunk, element)
    }

    fn feature_map(problem: &Problem) -> EluPlusOne {
        EluPlusOne {
            dim: problem.dim_qk,
        }
    }

    pub(crate) fn forward<T: Element>(
        &self,
        problem: &Problem,
        q: &Tensor<T>,
        k: &Tensor<T>,
        v: &Tensor<T>,
        out: &mut Tensor<T>,
        heads: Range<usize>,
    ) {
        let fmap = Self::feature_map(problem);
        kernelized::forward(
            problem,
            &fmap,
            NORMALIZER,
            self.chunk,
            [q, k, v],
            out,
            heads,
        );
    }

    pub(crate) fn backward<T: Element>(
        &self,
        problem: &Problem,
        inputs: [&Tensor<T>; 4],
        grads: [&mut Tensor<T>; 3],
        heads: Range<usize>,
    ) {
        let fmap = Self::feature_map(problem);
        kernelized::backward(problem, &fmap, NORMALIZER, self.chunk, inputs, grads, heads);
    }
}
