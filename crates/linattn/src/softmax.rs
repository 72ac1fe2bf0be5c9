//! Exact softmax attention, `softmax(scale · q kᵀ) v`: the baseline every approximation
//! is measured against, in its naive form (the n × n scores in memory) and its tiled
//! online-softmax form (FlashAttention's algorithm, O(n) extra memory).

use crate::attention::{Problem, per_thread};
use crate::error::{Error, Result};
use crate::kernels::cpu::exact::{self, HeadMajor, Mask, TILE_KEYS, TILE_QUERIES};
use crate::kernels::cpu::matmul::packing_bytes;
use crate::tensor::{Element, Tensor};
use std::ops::Range;

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

impl Softmax {
    pub(crate) fn validate(&self, problem: &Problem) -> Result<()> {
        resolve_scale(self.scale, problem.dim_qk).map(|_| ())
    }

    pub(crate) fn workspace_bytes(&self, problem: &Problem, element: usize) -> u128 {
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

    pub(crate) fn forward<T: Element>(
        &self,
        problem: &Problem,
        q: &Tensor<T>,
        k: &Tensor<T>,
        v: &Tensor<T>,
        out: &mut Tensor<T>,
        heads: Range<usize>,
    ) {
        let scale = T::of_f64(resolve_scale(self.scale, problem.dim_qk).expect("validated"));
        let mask = if problem.causal {
            Mask::CAUSAL
        } else {
            Mask::NONE
        };
        match self.algorithm {
            SoftmaxAlgorithm::Naive => exact::naive(problem, scale, mask, q, k, v, out, heads),
            SoftmaxAlgorithm::Tiled => {
                exact::tiled(problem, scale, mask, q, k, v, out, heads, None)
            }
        }
    }
}

impl Softmax {
    pub(crate) fn backward_workspace_bytes(&self, problem: &Problem, element: usize) -> u128 {
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

    pub(crate) fn backward<T: Element>(
        &self,
        problem: &Problem,
        inputs: [&Tensor<T>; 4],
        grads: [&mut Tensor<T>; 3],
        heads: Range<usize>,
    ) {
        let scale = T::of_f64(resolve_scale(self.scale, problem.dim_qk).expect("validated"));
        let mask = if problem.causal {
            Mask::CAUSAL
        } else {
            Mask::NONE
        };
        match self.algorithm {
            SoftmaxAlgorithm::Naive => {
                exact::naive_backward(problem, scale, mask, inputs, grads, heads)
            }
            SoftmaxAlgorithm::Tiled => {
                exact::tiled_backward(problem, scale, mask, inputs, grads, heads)
            }
        }
    }
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

/// The list of tasks a kernel hands to rayon (a batch and two ranges at most).
pub(crate) fn task_list_bytes(tasks: usize) -> u128 {
    (tasks * 6 * size_of::<usize>()) as u128
}
