//! Linear Transformer (Katharopoulos et al., 2020): φ(x) = elu(x) + 1 on queries and
//! keys, no scale, `oᵢ = φ(qᵢ)ᵀ S / (φ(qᵢ)·z + 1e-6)` with `S = Σⱼ φ(kⱼ) vⱼᵀ` and
//! `z = Σⱼ φ(kⱼ)`, the sums over j ≤ i when causal.

use crate::attention::Problem;
use crate::error::{Error, Result};
use crate::feature_map::{EluPlusOne, KernelMap};
use crate::kernels::cpu::kernelized::{self, Kernel, Normalizer};
use crate::tensor::Element;

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

/// Chunk length of the causal kernelized forms unless chosen otherwise.
pub const DEFAULT_CHUNK: usize = 64;

/// How causal kernelized attention (linear, performer, cosformer, hybrid's global heads)
/// is computed; both give the same result to rounding, as does the recurrent
/// [`Decoder`](crate::Decoder).
///
/// ```
/// use linattn::{Attention, CausalForm, Method, Tensor};
/// let x = Tensor::<f64>::randn([1, 100, 2, 8], 0).unwrap();
/// let chunked = Attention::new(Method::linear()).causal(true);
/// let parallel = chunked.clone().causal_form(CausalForm::Parallel);
/// let (a, b) = (chunked.forward(&x, &x, &x).unwrap(), parallel.forward(&x, &x, &x).unwrap());
/// assert!(a.as_slice().iter().zip(b.as_slice()).all(|(x, y)| (x - y).abs() < 1e-12));
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum CausalForm {
    /// Exact products inside chunks of the method's `chunk` tokens, a running state
    /// across them: O(n) work.
    #[default]
    Chunked,
    /// Every weight of the causal mask formed tile by tile, no state: O(n²) work.
    Parallel,
}

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

    pub(crate) fn kernel<T: Element>(&self, problem: &Problem) -> Kernel<T> {
        Kernel {
            map: KernelMap::EluPlusOne(EluPlusOne {
                dim: problem.dim_qk,
            }),
            normalizer: Normalizer::AddEpsilon(LINEAR_EPSILON),
            chunk: self.chunk,
        }
    }
}
