//! Sliding-window attention: exact softmax over the keys j with
//! `i − left ≤ j ≤ i + right` (FlashAttention's `window_size=(left, right)`; causal means
//! right = 0). The tiled kernel visits only the key blocks inside the window, so work and
//! memory are O(n·w).

use super::info::{Forms, MethodInfo, OptionInfo};
use super::method::{AttentionMethod, Prepared, Recurrent};
use super::options::MethodOptions;
use super::softmax::{
    exact_flops, reference::softmax_row, resolve_scale, tiled_backward_workspace, tiled_workspace,
};
use crate::backend::cpu::exact::{self, Mask};
use crate::base::{Element, Error, Problem, Result, Tensor};
use crate::engine::KernelPass;
use std::ops::Range;

pub(crate) const INFO: MethodInfo = MethodInfo {
    name: "window",
    summary: "exact softmax over the keys i − left ≤ j ≤ i + right (FlashAttention's window_size)",
    time: "O(n w d)",
    memory: "O(n w)",
    options: &[
        OptionInfo {
            name: "window",
            default: "256,256",
            what: "keys seen before and after each query (-1: unbounded); causal sets after to 0",
        },
        OptionInfo {
            name: "scale",
            default: "1/√d",
            what: "multiplies the scores",
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
    variants: &[],
    parameters: &[],
    examples: &[&[("window", "5,3")], &[("window", "70,-1")]],
};

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

    /// Exact attention of the query heads `heads` over their windows (hybrid's local
    /// heads too).
    pub(crate) fn forward_heads<T: Element>(
        &self,
        problem: &Problem,
        [q, k, v]: [&Tensor<T>; 3],
        out: &mut Tensor<T>,
        heads: Range<usize>,
    ) -> Result<()> {
        let scale = T::of_f64(resolve_scale(self.scale, problem.dim_qk)?);
        let mask = self.mask(problem.causal);
        exact::tiled(problem, scale, mask, q, k, v, out, heads, None);
        Ok(())
    }

    /// The gradients through the query heads `heads`.
    pub(crate) fn backward_heads<T: Element>(
        &self,
        problem: &Problem,
        inputs: [&Tensor<T>; 4],
        grads: [&mut Tensor<T>; 3],
        heads: Range<usize>,
    ) -> Result<()> {
        let scale = T::of_f64(resolve_scale(self.scale, problem.dim_qk)?);
        let mask = self.mask(problem.causal);
        exact::tiled_backward(problem, scale, mask, inputs, grads, heads);
        Ok(())
    }

    /// The f64 reference rows of the query heads `heads`.
    pub(crate) fn reference_heads(
        &self,
        rows: &mut super::reference::Rows,
        problem: &Problem,
        [q, k, v]: [&Tensor<f64>; 3],
        heads: Range<usize>,
    ) -> Result<()> {
        let scale = resolve_scale(self.scale, problem.dim_qk)?;
        let right = if problem.causal { Some(0) } else { self.right };
        rows.fill(problem, heads, |b, h, i| {
            softmax_row(q, k, v, b, h, i, scale, self.left, right)
        });
        Ok(())
    }

    /// The window that option `--window` gives `method` (window, hybrid), which needs it.
    pub(crate) fn from_options(method: &str, options: &MethodOptions) -> Result<Window> {
        let (left, right) = options.window("window")?.ok_or_else(|| {
            Error::InvalidConfig(format!(
                "{method} needs --window L,R (keys before and after each query, -1 for unbounded)"
            ))
        })?;
        Ok(Window {
            left,
            right,
            scale: options.parse("scale", "a number")?,
        })
    }

    /// Keys a decoder keeps: the window before the query and the query's own.
    pub(crate) fn capacity(&self) -> Option<usize> {
        self.left.map(|l| l + 1)
    }
}

impl AttentionMethod for Window {
    fn validate(&self, problem: &Problem) -> Result<()> {
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

    fn workspace_bytes(&self, problem: &Problem, element: usize) -> u128 {
        tiled_workspace(problem, element)
    }

    fn backward_workspace_bytes(&self, problem: &Problem, element: usize) -> u128 {
        tiled_backward_workspace(problem, element)
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
        self.forward_heads(problem, [q, k, v], out, heads)?;
        Ok(KernelPass::unchecked())
    }

    fn backward<T: Element>(
        &self,
        problem: &Problem,
        _prepared: &Prepared<T>,
        inputs: [&Tensor<T>; 4],
        grads: [&mut Tensor<T>; 3],
    ) -> Result<Option<(Vec<f64>, Vec<f64>)>> {
        self.backward_heads(problem, inputs, grads, 0..problem.heads_q)?;
        Ok(None)
    }

    fn flops(&self, problem: &Problem) -> f64 {
        exact_flops(problem, self.left, self.right)
    }

    fn reference(
        &self,
        problem: &Problem,
        q: &Tensor<f64>,
        k: &Tensor<f64>,
        v: &Tensor<f64>,
    ) -> Result<Tensor<f64>> {
        let mut rows = super::reference::Rows::new(problem.out_shape());
        self.reference_heads(&mut rows, problem, [q, k, v], 0..problem.heads_q)?;
        rows.finish()
    }

    fn recurrent(&self, heads_q: usize, dim_qk: usize) -> Result<Recurrent> {
        Ok(Recurrent {
            exact_heads: heads_q,
            scale: resolve_scale(self.scale, dim_qk)?,
            capacity: self.capacity(),
            state_features: None,
            max_len: None,
        })
    }

    fn info(&self) -> &'static MethodInfo {
        &INFO
    }
}
