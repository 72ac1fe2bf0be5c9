//! Hybrid attention: the first `local_heads` query heads attend exactly within a sliding
//! window, the others globally through a kernelized method (linear or performer) — local
//! precision and global reach at linear cost.

use crate::attention::Problem;
use crate::error::{Error, Result};
use crate::kernels::cpu::kernelized::{Kernel, KernelPass};
use crate::linear::Linear;
use crate::performer::Performer;
use crate::tensor::{Element, Tensor};
use crate::window::Window;

/// The kernelized method of hybrid's global heads.
#[derive(Clone, Debug, PartialEq)]
pub enum GlobalHeads {
    /// Linear Transformer heads.
    Linear(Linear),
    /// Performer heads.
    Performer(Performer),
}

impl GlobalHeads {
    pub(crate) fn kernel<T: Element>(&self, problem: &Problem) -> Result<Kernel<T>> {
        match self {
            GlobalHeads::Linear(m) => Ok(m.kernel(problem)),
            GlobalHeads::Performer(m) => m.kernel(problem),
        }
    }
}

/// Options of hybrid attention.
///
/// ```
/// use linattn::{Attention, GlobalHeads, Hybrid, Linear, Method, Tensor, Window};
/// let x = Tensor::<f32>::randn([1, 40, 4, 8], 0).unwrap();
/// let hybrid = Hybrid { local_heads: 2, window: Window::new(Some(4), Some(0)), global: GlobalHeads::Linear(Linear::default()) };
/// let out = Attention::new(Method::Hybrid(hybrid)).causal(true).forward(&x, &x, &x).unwrap();
/// assert_eq!(out.shape(), x.shape());
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct Hybrid {
    /// How many of the first query heads use the window.
    pub local_heads: usize,
    /// The window of the local heads.
    pub window: Window,
    /// The method of the other heads.
    pub global: GlobalHeads,
}

impl Hybrid {
    pub(crate) fn validate(&self, problem: &Problem) -> Result<()> {
        if self.local_heads > problem.heads_q {
            return Err(Error::InvalidConfig(format!(
                "hybrid asks for {} local heads but q has {} heads",
                self.local_heads, problem.heads_q
            )));
        }
        self.window.validate(problem)?;
        match &self.global {
            GlobalHeads::Linear(m) => m.validate(problem),
            GlobalHeads::Performer(m) => m.validate(problem),
        }
    }

    pub(crate) fn workspace_bytes(&self, problem: &Problem, element: usize) -> u128 {
        let global = match &self.global {
            GlobalHeads::Linear(m) => m.workspace_bytes(problem, element),
            GlobalHeads::Performer(m) => m.workspace_bytes(problem, element),
        };
        self.window.workspace_bytes(problem, element).max(global)
    }

    pub(crate) fn forward<T: Element>(
        &self,
        problem: &Problem,
        q: &Tensor<T>,
        k: &Tensor<T>,
        v: &Tensor<T>,
        out: &mut Tensor<T>,
    ) -> Result<KernelPass<T>> {
        let split = self.local_heads;
        if split > 0 {
            self.window.forward(problem, q, k, v, out, 0..split);
        }
        if split < problem.heads_q {
            let kernel = self.global.kernel(problem)?;
            let pass = kernel.forward(problem, [q, k, v], out, split..problem.heads_q);
            // The window heads were not checked: say nothing of finiteness.
            return Ok(KernelPass {
                states: pass.states,
                finite: None,
            });
        }
        Ok(KernelPass::unchecked())
    }

    pub(crate) fn backward_workspace_bytes(&self, problem: &Problem, element: usize) -> u128 {
        let global = match &self.global {
            GlobalHeads::Linear(m) => m.backward_workspace_bytes(problem, element),
            GlobalHeads::Performer(m) => m.backward_workspace_bytes(problem, element),
        };
        self.window
            .backward_workspace_bytes(problem, element)
            .max(global)
    }

    pub(crate) fn backward<T: Element>(
        &self,
        problem: &Problem,
        inputs: [&Tensor<T>; 4],
        [dq, dk, dv]: [&mut Tensor<T>; 3],
    ) -> Result<()> {
        let split = self.local_heads;
        if split > 0 {
            self.window
                .backward(problem, inputs, [&mut *dq, &mut *dk, &mut *dv], 0..split);
        }
        if split < problem.heads_q {
            self.global.kernel(problem)?.backward(
                problem,
                inputs,
                [dq, dk, dv],
                split..problem.heads_q,
            );
        }
        Ok(())
    }
}
