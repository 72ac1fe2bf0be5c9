//! cosFormer (Qin et al., 2022): φ = ReLU, query i and key j (1-based positions) weighted
//! by cos(π/2 · (i − j)/M) with M = max(len_q, len_k) (or a fixed length), computed as two linear attentions
//! over the cos and sin halves; the denominator is clamped below at 1e-6.

use crate::attention::Problem;
use crate::error::{Error, Result};
use crate::feature_map::{CosineReweighted, KernelMap};
use crate::kernels::cpu::kernelized::{self, Kernel, Normalizer};
use crate::linear::{DEFAULT_CHUNK, validate_chunk};
use crate::tensor::Element;

/// cosFormer's denominator clamp, as in its reference implementation.
pub(crate) const COSFORMER_EPSILON: f64 = 1e-6;

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
    /// M of the reweighting, fixed; `None` takes each call's max(len_q, len_k). Decoding
    /// needs it fixed, since a token's weights must not change as the sequence grows.
    pub max_len: Option<usize>,
}

impl Default for Cosformer {
    fn default() -> Self {
        Self {
            chunk: DEFAULT_CHUNK,
            max_len: None,
        }
    }
}

impl Cosformer {
    pub(crate) fn validate(&self, problem: &Problem) -> Result<()> {
        validate_chunk(self.chunk)?;
        match self.max_len {
            Some(0) => Err(Error::InvalidConfig(
                "cosformer max_len must be at least 1".into(),
            )),
            Some(max_len) if problem.len_q.max(problem.len_k) > max_len => {
                Err(Error::SequenceTooLong {
                    method: "cosformer",
                    len: problem.len_q.max(problem.len_k),
                    max_len,
                })
            }
            _ => Ok(()),
        }
    }

    pub(crate) fn workspace_bytes(&self, problem: &Problem, element: usize) -> u128 {
        kernelized::workspace_bytes(problem, 2 * problem.dim_qk, 0, self.chunk, element)
    }

    pub(crate) fn backward_workspace_bytes(&self, problem: &Problem, element: usize) -> u128 {
        kernelized::backward_workspace_bytes(problem, 2 * problem.dim_qk, 0, self.chunk, element)
    }

    pub(crate) fn kernel<T: Element>(&self, problem: &Problem) -> Kernel<T> {
        Kernel {
            map: KernelMap::Cosine(CosineReweighted {
                dim: problem.dim_qk,
                max_len: self.reweighting_length(problem.len_q.max(problem.len_k)),
            }),
            normalizer: Normalizer::ClampMin(COSFORMER_EPSILON),
            chunk: self.chunk,
        }
    }

    /// M: the fixed length when set, else the sequence's own.
    pub(crate) fn reweighting_length(&self, sequence: usize) -> usize {
        self.max_len.unwrap_or(sequence)
    }
}
