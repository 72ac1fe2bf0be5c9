//! cosFormer (Qin et al., 2022): φ = ReLU, query i and key j (1-based positions) weighted
//! by cos(π/2 · (i − j)/M) with M = max(len_q, len_k) (or a fixed length), computed as two linear attentions
//! over the cos and sin halves; the denominator is clamped below at 1e-6.

use super::info::{Forms, MethodInfo, OptionInfo};
use super::linear::{chunk_option, validate_chunk};
use super::method::{AttentionMethod, Recurrent, reads_in_blocks};
use super::options::MethodOptions;
use crate::base::{DEFAULT_CHUNK, Element, Error, Problem, Result, Tensor};
use crate::engine::feature_map::{CosineReweighted, KernelMap, cosformer_angle};
use crate::engine::{self as engine, Kernel, Normalizer, StateUpdate};
use crate::methods::reference::{dot, keys_seen, kv_head, row, weighted_values};

pub(crate) const INFO: MethodInfo = MethodInfo {
    name: "cosformer",
    summary: "ReLU features reweighted by cos(π/2·(i−j)/M), as cos and sin halves",
    time: "O(n d²)",
    memory: "O(d²) per head",
    options: &[
        OptionInfo {
            name: "chunk",
            default: "64",
            what: "tokens per chunk of the causal form",
        },
        OptionInfo {
            name: "max-len",
            default: "each call's longest sequence",
            what: "M of the reweighting, fixed (decoding needs it)",
        },
    ],
    cpu: Forms {
        full: true,
        causal: true,
        recurrent: true,
    },
    cuda: Forms::NONE,
    layout: super::info::HeadLayout::SharedKeysValues,
    token_inputs: &[],
    weights: true,
    variants: &[],
    parameters: &[],
    examples: &[&[], &[("chunk", "16"), ("max-len", "400")]],
};

/// cosFormer's denominator clamp, as in its reference implementation.
pub(crate) const COSFORMER_EPSILON: f64 = 1e-6;

impl Cosformer {
    /// cosFormer as options give it.
    pub(crate) fn from_options(options: &MethodOptions) -> Result<Self> {
        Ok(Cosformer {
            chunk: chunk_option(options)?,
            max_len: options.parse("max-len", "a number of tokens")?,
        })
    }
}

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
    pub(crate) fn build_kernel<T: Element>(&self, problem: &Problem) -> Kernel<T> {
        Kernel {
            map: KernelMap::Cosine(CosineReweighted {
                dim: problem.dim_qk,
                max_len: self.reweighting_length(problem.len_q.max(problem.len_k)),
            }),
            update: StateUpdate::Sum,
            normalizer: Normalizer::ClampMin(COSFORMER_EPSILON),
            chunk: self.chunk,
        }
    }

    /// M: the fixed length when set, else the sequence's own.
    pub(crate) fn reweighting_length(&self, sequence: usize) -> usize {
        self.max_len.unwrap_or(sequence)
    }
}

impl AttentionMethod for Cosformer {
    fn validate(&self, problem: &Problem) -> Result<()> {
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

    fn workspace_bytes(&self, problem: &Problem, element: usize) -> u128 {
        engine::workspace_bytes(problem, 2 * problem.dim_qk, 0, self.chunk, element)
    }

    fn backward_workspace_bytes(&self, problem: &Problem, element: usize) -> u128 {
        engine::backward_workspace_bytes(problem, 2 * problem.dim_qk, 0, self.chunk, element)
    }

    fn checks_while_reading(&self, problem: &Problem) -> bool {
        reads_in_blocks(problem)
    }

    fn flops(&self, problem: &Problem) -> f64 {
        engine::flops(problem, 2 * problem.dim_qk, 0)
    }

    fn reference(
        &self,
        problem: &Problem,
        q: &Tensor<f64>,
        k: &Tensor<f64>,
        v: &Tensor<f64>,
    ) -> Result<Tensor<f64>> {
        let max_len = self.reweighting_length(problem.len_q.max(problem.len_k));
        let relu = |x: Vec<f64>| -> Vec<f64> { x.into_iter().map(|x| x.max(0.0)).collect() };
        super::reference::Rows::new(problem.out_shape())
            .fill(problem, 0..problem.heads_q, |b, h, i| {
                let g = kv_head(q, k, h);
                let qi = relu(row(q, b, i, h));
                let weights: Vec<(usize, f64)> = keys_seen(i, k.seq_len(), problem.causal)
                    .map(|j| {
                        let angle = cosformer_angle(i, max_len) - cosformer_angle(j, max_len);
                        (j, dot(&qi, &relu(row(k, b, j, g))) * angle.cos())
                    })
                    .collect();
                let total: f64 = weights.iter().map(|w| w.1).sum();
                weighted_values(v, b, g, &weights, total.max(COSFORMER_EPSILON))
            })
            .finish()
    }

    fn recurrent(&self, _heads_q: usize, dim_qk: usize) -> Result<Recurrent> {
        if self.max_len.is_none() {
            return Err(Error::InvalidConfig(
                "cosformer decoding needs a fixed max_len (M): every weight depends on it".into(),
            ));
        }
        Ok(Recurrent {
            exact_heads: 0,
            scale: 1.0,
            capacity: None,
            state_features: Some(2 * dim_qk),
            max_len: self.max_len,
        })
    }

    fn kernel<T: Element>(&self, problem: &Problem) -> Result<Option<Kernel<T>>> {
        Ok(Some(self.build_kernel(problem)))
    }

    fn info(&self) -> &'static MethodInfo {
        &INFO
    }
}
