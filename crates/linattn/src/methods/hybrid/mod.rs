//! Hybrid attention: the first `local_heads` query heads attend exactly within a sliding
//! window, the others globally through a kernelized method (linear or performer) — local
//! precision and global reach at linear cost.

use super::info::{Forms, MethodInfo, OptionInfo};
use super::linear::chunk_option;
use super::linear::{Linear, reference::linear_row};
use super::method::{AttentionMethod, Prepared, Recurrent};
use super::options::MethodOptions;
use super::performer::{Performer, reference::performer_row};
use super::reference::Rows;
use super::window::Window;
use crate::base::{Element, Error, Problem, Result, Tensor};
use crate::engine::{Kernel, KernelPass};
use std::ops::Range;

pub(crate) const INFO: MethodInfo = MethodInfo {
    name: "hybrid",
    summary: "the first heads exact within a sliding window, the others linear or performer",
    time: "O(n (w + d) d)",
    memory: "O(n w)",
    options: &[
        OptionInfo {
            name: "local-heads",
            default: "heads / 2",
            what: "how many leading query heads use the window",
        },
        OptionInfo {
            name: "window",
            default: "256,256",
            what: "the local heads' window",
        },
        OptionInfo {
            name: "global",
            default: "linear",
            what: "the other heads' method: linear or performer",
        },
        OptionInfo {
            name: "scale",
            default: "1/√d",
            what: "multiplies the local heads' scores",
        },
        OptionInfo {
            name: "chunk",
            default: "64",
            what: "tokens per chunk of the causal form",
        },
        OptionInfo {
            name: "features",
            default: "256",
            what: "performer heads: number of random features",
        },
        OptionInfo {
            name: "seed",
            default: "0",
            what: "performer heads: seed of the draw of ω",
        },
        OptionInfo {
            name: "omega",
            default: "drawn",
            what: "performer heads: ω given",
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
    examples: &[
        &[("local-heads", "1"), ("window", "6,2")],
        &[
            ("local-heads", "1"),
            ("window", "3,-1"),
            ("global", "performer"),
            ("features", "24"),
            ("seed", "1"),
        ],
    ],
};

/// The options only performer heads take.
const PERFORMER_ONLY: [&str; 3] = ["features", "seed", "omega"];

impl Hybrid {
    /// Hybrid attention as options give it.
    pub(crate) fn from_options(options: &MethodOptions) -> Result<Self> {
        let global = match options.text("global") {
            None | Some("linear") => GlobalHeads::Linear(Linear {
                chunk: chunk_option(options)?,
            }),
            Some("performer") => GlobalHeads::Performer(Performer::from_options(options)?),
            Some(other) => {
                return Err(Error::InvalidConfig(format!(
                    "--global takes linear or performer, not {other:?}"
                )));
            }
        };
        if let GlobalHeads::Linear(_) = global
            && let Some(option) = PERFORMER_ONLY.iter().find(|o| options.has(o))
        {
            return Err(Error::InvalidConfig(format!(
                "--{option} does not apply to hybrid with --global linear, which takes --window, \
                 --scale, --local-heads, --global, --chunk"
            )));
        }
        Ok(Hybrid {
            local_heads: options.required("hybrid", "local-heads", "N")?,
            window: Window::from_options("hybrid", options)?,
            global,
        })
    }
}

/// Runs `$body` with `$m` bound to the global heads' method, whichever it is.
macro_rules! each_global {
    ($global:expr, $m:ident => $body:expr) => {
        match $global {
            GlobalHeads::Linear($m) => $body,
            GlobalHeads::Performer($m) => $body,
        }
    };
}

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
            GlobalHeads::Linear(m) => Ok(m.build_kernel(problem)),
            GlobalHeads::Performer(m) => m.build_kernel(problem),
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

impl AttentionMethod for Hybrid {
    fn validate(&self, problem: &Problem) -> Result<()> {
        if self.local_heads > problem.heads_q {
            return Err(Error::InvalidConfig(format!(
                "hybrid asks for {} local heads but q has {} heads",
                self.local_heads, problem.heads_q
            )));
        }
        self.window.validate(problem)?;
        each_global!(&self.global, m => m.validate(problem))
    }

    fn workspace_bytes(&self, problem: &Problem, element: usize) -> u128 {
        let global = each_global!(&self.global, m => m.workspace_bytes(problem, element));
        self.window.workspace_bytes(problem, element).max(global)
    }

    fn backward_workspace_bytes(&self, problem: &Problem, element: usize) -> u128 {
        let global = each_global!(&self.global, m => m.backward_workspace_bytes(problem, element));
        self.window
            .backward_workspace_bytes(problem, element)
            .max(global)
    }

    fn prepare<T: Element>(&self, problem: &Problem) -> Result<Prepared<T>> {
        // Without global heads there is no kernel to build (nor ω to draw).
        let global = self.local_heads < problem.heads_q;
        let kernel = if global {
            Some(self.global.kernel(problem)?)
        } else {
            None
        };
        Ok(Prepared::with_kernel(kernel))
    }

    fn forward<T: Element>(
        &self,
        problem: &Problem,
        prepared: &Prepared<T>,
        q: &Tensor<T>,
        k: &Tensor<T>,
        v: &Tensor<T>,
        out: &mut Tensor<T>,
        _heads: Range<usize>,
    ) -> Result<KernelPass<T>> {
        let split = self.local_heads;
        if split > 0 {
            self.window
                .forward_heads(problem, [q, k, v], out, 0..split)?;
        }
        if split < problem.heads_q {
            let kernel = prepared.kernel()?;
            let pass = kernel.forward(problem, [q, k, v], out, split..problem.heads_q);
            // The window heads were not checked: say nothing of finiteness.
            return Ok(KernelPass {
                states: pass.states,
                finite: None,
            });
        }
        Ok(KernelPass::unchecked())
    }

    fn backward<T: Element>(
        &self,
        problem: &Problem,
        prepared: &Prepared<T>,
        inputs: [&Tensor<T>; 4],
        [dq, dk, dv]: [&mut Tensor<T>; 3],
    ) -> Result<Option<(Vec<f64>, Vec<f64>)>> {
        let split = self.local_heads;
        if split > 0 {
            let grads = [&mut *dq, &mut *dk, &mut *dv];
            self.window
                .backward_heads(problem, inputs, grads, 0..split)?;
        }
        if split < problem.heads_q {
            prepared
                .kernel()?
                .backward(problem, inputs, [dq, dk, dv], split..problem.heads_q);
        }
        Ok(None)
    }

    fn flops(&self, problem: &Problem) -> f64 {
        let local = self.local_heads as f64 / problem.heads_q as f64;
        let global = each_global!(&self.global, m => m.flops(problem));
        local * self.window.flops(problem) + (1.0 - local) * global
    }

    fn reference(
        &self,
        problem: &Problem,
        q: &Tensor<f64>,
        k: &Tensor<f64>,
        v: &Tensor<f64>,
    ) -> Result<Tensor<f64>> {
        let mut rows = Rows::new(problem.out_shape());
        let (local, global) = (0..self.local_heads, self.local_heads..problem.heads_q);
        self.window
            .reference_heads(&mut rows, problem, [q, k, v], local)?;
        match &self.global {
            GlobalHeads::Linear(_) => rows.fill(problem, global, |b, h, i| {
                linear_row(q, k, v, b, h, i, problem.causal)
            }),
            GlobalHeads::Performer(p) => {
                let omega = p.omega(problem.dim_qk)?;
                rows.fill(problem, global, |b, h, i| {
                    performer_row(q, k, v, &omega, b, h, i, problem.causal)
                })
            }
        };
        rows.finish()
    }

    fn recurrent(&self, heads_q: usize, dim_qk: usize) -> Result<Recurrent> {
        let global = each_global!(&self.global, m => m.recurrent(heads_q, dim_qk))?;
        Ok(Recurrent {
            exact_heads: self.local_heads,
            scale: self.window.recurrent(heads_q, dim_qk)?.scale,
            capacity: self.window.capacity(),
            state_features: (self.local_heads < heads_q)
                .then_some(global.state_features)
                .flatten(),
            max_len: None,
        })
    }

    fn kernel<T: Element>(&self, problem: &Problem) -> Result<Option<Kernel<T>>> {
        self.global.kernel(problem).map(Some)
    }

    fn info(&self) -> &'static MethodInfo {
        &INFO
    }
}
