//! cosFormer (Qin et al., 2022): φ = ReLU, query i and key j (1-based positions) weighted
//! by cos(π/2 · (i − j)/M) with M = max(len_q, len_k), computed as two linear attentions
//! over the cos and sin halves; the denominator is clamped below at 1e-6.

use crate::attention::Problem;
use crate::error::Result;
use crate::feature_map::CosineReweighted;
use crate::kernels::cpu::kernelized::{self, Normalizer};
use crate::linear::{DEFAULT_CHUNK, validate_chunk};
use crate::tensor::{Element, Tensor};
use std::ops::Range;

/// cosFormer's denominator clamp, as in its reference implementation.
pub(crate) const COSFORMER_EPSILON: f64 = 1e-6;

const NORMALIZER: Normalizer = Normalizer::ClampMin(COSFORMER_EPSILON);

/// Options of cosFormer attention.
///
/// ```
/// use linattn::{Attention, Cosformer, Method, Tensor};
/// let x = Tensor::<f64>::randn([2, 50, 2, 8], 0).unwrap();
/// let out = Attention::new(Method::Cosformer(Cosformer::default())).forward(&x, &x, &x).unwrap();
/// assert_eq!(out.shape(), x.shape());
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct Cosformer {
    /// Tokens per chunk of the causal form.
    pub chunk: usize,
}

impl Default for Cosformer {
    fn default() -> Self {
        Self {
            chunk: DEFAULT_CHUNK,
        }
    }
}

impl Cosformer {
    pub(crate) fn validate(&self, _problem: &Problem) -> Result<()> {
        validate_chunk(self.chunk)
    }

    pub(crate) fn workspace_bytes(&self, problem: &Problem, element: usize) -> u128 {
        kernelized::workspace_bytes(problem, 2 * problem.dim_qk, 0, self.chunk, element)
    }

    pub(crate) fn backward_workspace_bytes(&self, problem: &Problem, element: usize) -> u128 {
        kernelized::backward_workspace_bytes(problem, 2 * problem.dim_qk, 0, self.chunk, element)
    }

    fn feature_map(problem: &Problem) -> CosineReweighted {
        CosineReweighted {
            dim: problem.dim_qk,
            max_len: problem.len_q.max(problem.len_k),
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
