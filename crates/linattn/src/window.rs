//! Sliding-window attention: exact softmax over the keys j with
//! `i − left ≤ j ≤ i + right` (FlashAttention's `window_size=(left, right)`; causal means
//! right = 0). The tiled kernel visits only the key blocks inside the window, so work and
//! memory are O(n·w).

use crate::attention::Problem;
use crate::error::{Error, Result};
use crate::kernels::cpu::exact::{self, Mask};
use crate::softmax::{resolve_scale, tiled_backward_workspace, tiled_workspace};
use crate::tensor::{Element, Tensor};
use std::ops::Range;

/// Options of sliding-window attention.
///
/// ```
/// use linattn::{Attention, Method, Tensor, Window};
/// let x = Tensor::<f32>::randn([1, 100, 2, 16], 0).unwrap();
/// let local = Method::Window(Window::new(Some(8), Some(0)));
/// let out = Attention::new(local).forward(&x, &x, &x).unwrap();
/// assert_eq!(out.shape(), [1, 100, 2, 16]);
/// ```
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Window {
    /// Keys visible before the query; `None` is unbounded.
    pub left: Option<usize>,
    /// Keys visible after the query; `None` is unbounded. Causal attention sets it to 0,
    /// as FlashAttention does.
    pub right: Option<usize>,
    /// Multiplies the scores; `None` means 1/√head_dim.
    pub scale: Option<f64>,
}

impl Window {
    /// A window of `left` keys before and `right` after each query.
    pub fn new(left: Option<usize>, right: Option<usize>) -> Self {
        Self {
            left,
            right,
            scale: None,
        }
    }

    pub(crate) fn mask(&self, causal: bool) -> Mask {
        Mask {
            left: self.left,
            right: if causal { Some(0) } else { self.right },
        }
    }

    pub(crate) fn validate(&self, problem: &Problem) -> Result<()> {
        resolve_scale(self.scale, problem.dim_qk)?;
        if problem.len_q != problem.len_k {
            return Err(Error::ShapeMismatch {
                detail: format!(
                    "a sliding window aligns query i with key i, so q and k need the same \
                     length (q has {}, k has {})",
                    problem.len_q, problem.len_k
                ),
            });
        }
        Ok(())
    }

    pub(crate) fn workspace_bytes(&self, problem: &Problem, element: usize) -> u128 {
        tiled_workspace(problem, element)
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
        exact::tiled(
            problem,
            scale,
            self.mask(problem.causal),
            q,
            k,
            v,
            out,
            heads,
            None,
        );
    }

    pub(crate) fn backward_workspace_bytes(&self, problem: &Problem, element: usize) -> u128 {
        tiled_backward_workspace(problem, element)
    }

    pub(crate) fn backward<T: Element>(
        &self,
        problem: &Problem,
        inputs: [&Tensor<T>; 4],
        grads: [&mut Tensor<T>; 3],
        heads: Range<usize>,
    ) {
        let scale = T::of_f64(resolve_scale(self.scale, problem.dim_qk).expect("validated"));
        exact::tiled_backward(
            problem,
            scale,
            self.mask(problem.causal),
            inputs,
            grads,
            heads,
        );
    }
}
