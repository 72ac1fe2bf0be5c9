//! Exact softmax attention, `softmax(scale · q kᵀ) v`: the baseline every approximation
//! is measured against, in its naive form (the n × n scores in memory) and its tiled
//! online-softmax form (FlashAttention's algorithm, O(n) extra memory).

pub(crate) mod reference;

use super::info::{Forms, MethodInfo, OptionInfo, Variant};
use super::method::{AttentionMethod, Prepared, Recurrent};
use super::options::MethodOptions;
use crate::backend::cpu::exact::{self, HeadMajor, Mask, TILE_KEYS, TILE_QUERIES};
use crate::backend::cpu::matmul::packing_bytes;
use crate::base::{Element, Error, Problem, Result, Tensor, per_thread, task_list_bytes};
use crate::engine::KernelPass;
use std::ops::Range;

pub(crate) const INFO: MethodInfo = MethodInfo {
    name: "softmax",
    summary: "exact softmax attention; tiled online softmax (FlashAttention's algorithm) or \
              the whole score matrix",
    time: "O(n² d)",
    memory: "O(n) tiled, O(n²) naive",
    options: &[
        OptionInfo {
            name: "scale",
            default: "1/√d",
            what: "multiplies the scores",
        },
        OptionInfo {
            name: "algorithm",
            default: "tiled",
            what: "tiled (O(n) memory) or naive (the n × n scores)",
        },
    ],
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
    variants: &[Variant {
        name: "softmax-naive",
        summary: "exact softmax with the whole n × n score matrix in memory",
        memory: "O(n²)",
        options: &[("algorithm", "naive")],
    }],
    parameters: &[],
    examples: &[&[], &[("algorithm", "naive")], &[("scale", "0.3")]],
};

/// How exact attention is computed; both give the same result to rounding.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SoftmaxAlgorithm {
    /// Blocks of keys with a running max and sum: O(n) extra memory.
    #[default]
    Tiled,
    /// The whole `len_q × len_k` score matrix per head: O(n²) extra memory.
    Naive,
}

/// Options of exact softmax attention.
///
/// ```
/// use linattn::{Attention, Method, Softmax, SoftmaxAlgorithm, Tensor};
/// let x = Tensor::<f64>::randn([1, 9, 2, 4], 0).unwrap();
/// let tiled = Attention::new(Method::softmax()).causal(true).forward(&x, &x, &x).unwrap();
/// let naive = Method::Softmax(Softmax { algorithm: SoftmaxAlgorithm::Naive, ..Softmax::default() });
/// let naive = Attention::new(naive).causal(true).forward(&x, &x, &x).unwrap();
/// for (a, b) in tiled.as_slice().iter().zip(naive.as_slice()) {
///     assert!((a - b).abs() < 1e-12);
/// }
/// ```
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Softmax {
    /// Multiplies the scores; `None` means 1/√head_dim.
    pub scale: Option<f64>,
    /// Naive or tiled.
    pub algorithm: SoftmaxAlgorithm,
}

impl Softmax {
    /// Exact softmax as options give it.
    pub(crate) fn from_options(options: &MethodOptions) -> Result<Self> {
        let algorithm = match options.text("algorithm") {
            None | Some("tiled") => SoftmaxAlgorithm::Tiled,
            Some("naive") => SoftmaxAlgorithm::Naive,
            Some(other) => {
                return Err(Error::InvalidConfig(format!(
                    "--algorithm takes tiled or naive, not {other:?}"
                )));
            }
        };
        Ok(Softmax {
            scale: options.parse("scale", "a number")?,
            algorithm,
        })
    }
}

/// The score scale: the one given, or 1/√d.
pub(crate) fn resolve_scale(scale: Option<f64>, dim: usize) -> Result<f64> {
    match scale {
        None => Ok(1.0 / (dim as f64).sqrt()),
        Some(s) if s.is_finite() => Ok(s),
        Some(s) => Err(Error::InvalidConfig(format!(
            "scale must be finite, got {s}"
        ))),
    }
}

impl AttentionMethod for Softmax {
    fn validate(&self, problem: &Problem) -> Result<()> {
        resolve_scale(self.scale, problem.dim_qk).map(|_| ())
    }

    fn workspace_bytes(&self, problem: &Problem, element: usize) -> u128 {
        let (lq, lk) = (problem.len_q, problem.len_k);
        match self.algorithm {
            SoftmaxAlgorithm::Naive => {
                let scores = ((lq * lk + lq) * element) as u128;
                let packing = packing_bytes(
                    element,
                    &[(lq, lk, problem.dim_qk), (lq, problem.dim_v, lk)],
                );
                per_thread(problem.batch * problem.heads_q, scores + packing)
            }
            SoftmaxAlgorithm::Tiled => tiled_workspace(problem, element),
        }
    }

    fn backward_workspace_bytes(&self, problem: &Problem, element: usize) -> u128 {
        let (lq, lk) = (problem.len_q, problem.len_k);
        match self.algorithm {
            SoftmaxAlgorithm::Naive => {
                let matrices = ((2 * lq * lk + lq) * element) as u128;
                let packing = packing_bytes(
                    element,
                    &[
                        (lq, lk, problem.dim_qk),
                        (lk, problem.dim_v, lq),
                        (lq, lk, problem.dim_v),
                        (lq, problem.dim_qk, lk),
                        (lk, problem.dim_qk, lq),
                    ],
                );
                let tasks = problem.batch * problem.heads_kv;
                per_thread(tasks, matrices + packing) + task_list_bytes(tasks)
            }
            SoftmaxAlgorithm::Tiled => tiled_backward_workspace(problem, element),
        }
    }

    fn forward<T: Element>(
        &self,
        problem: &Problem,
        _prepared: &Prepared<T>,
        q: &Tensor<T>,
        k: &Tensor<T>,
        v: &Tensor<T>,
        out: &mut Tensor<T>,
        heads: Range<usize>,
    ) -> Result<KernelPass<T>> {
        let scale = T::of_f64(resolve_scale(self.scale, problem.dim_qk)?);
        let mask = causal_mask(problem);
        match self.algorithm {
            SoftmaxAlgorithm::Naive => exact::naive(problem, scale, mask, q, k, v, out, heads),
            SoftmaxAlgorithm::Tiled => {
                exact::tiled(problem, scale, mask, q, k, v, out, heads, None)
            }
        }
        Ok(KernelPass::unchecked())
    }

    fn backward<T: Element>(
        &self,
        problem: &Problem,
        _prepared: &Prepared<T>,
        inputs: [&Tensor<T>; 4],
        grads: [&mut Tensor<T>; 3],
    ) -> Result<Option<(Vec<f64>, Vec<f64>)>> {
        let scale = T::of_f64(resolve_scale(self.scale, problem.dim_qk)?);
        let (mask, heads) = (causal_mask(problem), 0..problem.heads_q);
        match self.algorithm {
            SoftmaxAlgorithm::Naive => {
                exact::naive_backward(problem, scale, mask, inputs, grads, heads)
            }
            SoftmaxAlgorithm::Tiled => {
                exact::tiled_backward(problem, scale, mask, inputs, grads, heads)
            }
        }
        Ok(None)
    }

    fn flops(&self, problem: &Problem) -> f64 {
        exact_flops(problem, None, None)
    }

    fn reference(
        &self,
        problem: &Problem,
        q: &Tensor<f64>,
        k: &Tensor<f64>,
        v: &Tensor<f64>,
    ) -> Result<Tensor<f64>> {
        let scale = resolve_scale(self.scale, problem.dim_qk)?;
        let right = problem.causal.then_some(0);
        super::reference::Rows::new(problem.out_shape())
            .fill(problem, 0..problem.heads_q, |b, h, i| {
                reference::softmax_row(q, k, v, b, h, i, scale, None, right)
            })
            .finish()
    }

    fn recurrent(&self, heads_q: usize, dim_qk: usize) -> Result<Recurrent> {
        Ok(Recurrent {
            exact_heads: heads_q,
            scale: resolve_scale(self.scale, dim_qk)?,
            capacity: None,
            state_features: None,
            max_len: None,
        })
    }

    fn info(&self) -> &'static MethodInfo {
        &INFO
    }
}

/// The mask of exact attention over every key, or the causal ones.
fn causal_mask(problem: &Problem) -> Mask {
    if problem.causal {
        Mask::CAUSAL
    } else {
        Mask::NONE
    }
}

/// Products of exact attention over the keys `i − left ≤ j ≤ i + right` of each query
/// (`right` is 0 when causal): two per pair and dimension, for scores and values.
pub(crate) fn exact_flops(problem: &Problem, left: Option<usize>, right: Option<usize>) -> f64 {
    let right = if problem.causal { Some(0) } else { right };
    let pairs: f64 = (0..problem.len_q)
        .map(|i| {
            let lo = left.map_or(0, |l| i.saturating_sub(l));
            let hi = right.map_or(problem.len_k, |r| (i + r + 1).min(problem.len_k));
            hi.saturating_sub(lo) as f64
        })
        .sum();
    let heads = (problem.batch * problem.heads_q) as f64;
    2.0 * heads * pairs * (problem.dim_qk + problem.dim_v) as f64
}

/// Scratch of the tiled backward: the recomputed output, two values per query row, the
/// forward's scratch, and two tiles per thread.
pub(crate) fn tiled_backward_workspace(problem: &Problem, element: usize) -> u128 {
    let rows = problem.batch * problem.len_q * problem.heads_q;
    let recomputed = ((rows * (problem.dim_v + 2)) * element) as u128;
    let tiles = (2 * TILE_QUERIES * TILE_KEYS * element) as u128;
    let packing = packing_bytes(
        element,
        &[
            (TILE_QUERIES, TILE_KEYS, problem.dim_qk.max(problem.dim_v)),
            (TILE_QUERIES, problem.dim_qk, TILE_KEYS),
            (TILE_KEYS, problem.dim_qk.max(problem.dim_v), TILE_QUERIES),
        ],
    );
    let tasks = problem.batch
        * (problem.heads_q * problem.len_q.div_ceil(TILE_QUERIES)
            + problem.heads_kv * problem.len_k.div_ceil(TILE_KEYS));
    recomputed
        + tiled_workspace(problem, element)
        + per_thread(tasks, tiles + packing)
        + task_list_bytes(tasks)
}

/// Scratch of the tiled kernel: the head-major keys and values; per thread a tile of
/// scores, the queries and accumulator of a tile and the products' packing; the task list.
pub(crate) fn tiled_workspace(problem: &Problem, element: usize) -> u128 {
    let tasks = problem.batch * problem.heads_q * problem.len_q.div_ceil(TILE_QUERIES);
    let tile = TILE_QUERIES * (TILE_KEYS + 2 + problem.dim_qk + problem.dim_v);
    let packing = packing_bytes(
        element,
        &[
            (TILE_QUERIES, TILE_KEYS, problem.dim_qk),
            (TILE_QUERIES, problem.dim_v, TILE_KEYS),
        ],
    );
    HeadMajor::<f32>::bytes(problem, element)
        + per_thread(tasks, (tile * element) as u128 + packing)
        + task_list_bytes(tasks)
}
