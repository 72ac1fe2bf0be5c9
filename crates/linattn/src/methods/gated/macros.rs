//! The pieces every method folder of the family writes alike: its common options in the
//! catalogue, and the `AttentionMethod` implementation that hands a call to its
//! [`Rule`](super::Rule).

/// The options every method of the family has, as the catalogue lists them.
macro_rules! common_options {
    ($($more:expr),* $(,)?) => {
        &[
            OptionInfo {
                name: "scale",
                default: "1/√d_k",
                what: "multiplies the output (flash-linear-attention's scale)",
            },
            OptionInfo {
                name: "chunk",
                default: "64",
                what: "tokens per chunk of the chunked form",
            },
            $($more),*
        ]
    };
}
pub(crate) use common_options;

/// [`AttentionMethod`](crate::methods::method::AttentionMethod) for a method of the
/// family, from its `rule()` and `INFO`: called with q, k and v alone it runs with no g, β or initial
/// state (which only `retention` does without), through
/// [`Attention::forward_gated`](crate::Attention::forward_gated) with them.
macro_rules! gated_method {
    ($method:ty) => {
        impl $crate::methods::method::AttentionMethod for $method {
            fn validate(&self, problem: &$crate::base::Problem) -> $crate::base::Result<()> {
                self.rule(problem).validate(problem)
            }

            fn out_shape(&self, problem: &$crate::base::Problem) -> [usize; 4] {
                [problem.batch, problem.len_q, problem.heads_v, problem.dim_v]
            }

            fn workspace_bytes(&self, problem: &$crate::base::Problem, element: usize) -> u128 {
                let rule = self.rule(problem);
                let chunk = match problem.causal_form {
                    $crate::base::CausalForm::Parallel => problem.len_q,
                    $crate::base::CausalForm::Chunked => rule.chunk,
                };
                rule.workspace_bytes(problem, element, chunk)
            }

            fn backward_workspace_bytes(
                &self,
                problem: &$crate::base::Problem,
                element: usize,
            ) -> u128 {
                self.rule(problem)
                    .backward_workspace_bytes(problem, element)
            }

            fn forward<T: $crate::base::Element>(
                &self,
                problem: &$crate::base::Problem,
                _prepared: &$crate::methods::method::Prepared<T>,
                q: &$crate::base::Tensor<T>,
                k: &$crate::base::Tensor<T>,
                v: &$crate::base::Tensor<T>,
                out: &mut $crate::base::Tensor<T>,
                _heads: std::ops::Range<usize>,
            ) -> $crate::base::Result<$crate::engine::KernelPass<T>> {
                let parallel = problem.causal_form == $crate::base::CausalForm::Parallel;
                let inputs = $crate::methods::gated::GateInputs::default();
                self.rule(problem)
                    .forward(problem, [q, k, v], &inputs, parallel, out)?;
                Ok($crate::engine::KernelPass::unchecked())
            }

            fn backward<T: $crate::base::Element>(
                &self,
                problem: &$crate::base::Problem,
                _prepared: &$crate::methods::method::Prepared<T>,
                [q, k, v, d_out]: [&$crate::base::Tensor<T>; 4],
                [dq, dk, dv]: [&mut $crate::base::Tensor<T>; 3],
            ) -> $crate::base::Result<Option<(Vec<f64>, Vec<f64>)>> {
                let inputs = $crate::methods::gated::GateInputs::default();
                let grads =
                    self.rule(problem)
                        .backward(problem, [q, k, v], &inputs, d_out, None)?;
                (*dq, *dk, *dv) = (grads.dq, grads.dk, grads.dv);
                Ok(None)
            }

            fn flops(&self, problem: &$crate::base::Problem) -> f64 {
                let rule = self.rule(problem);
                rule.flops(problem, rule.chunk)
            }

            fn reference(
                &self,
                problem: &$crate::base::Problem,
                q: &$crate::base::Tensor<f64>,
                k: &$crate::base::Tensor<f64>,
                v: &$crate::base::Tensor<f64>,
            ) -> $crate::base::Result<$crate::base::Tensor<f64>> {
                let inputs = $crate::methods::gated::GateInputs::default();
                $crate::methods::gated::reference::recurrence(
                    &self.rule(problem),
                    problem,
                    [q, k, v],
                    &inputs,
                )
                .map(|result| result.out)
            }

            fn recurrent(
                &self,
                _heads_q: usize,
                _dim_qk: usize,
            ) -> $crate::base::Result<$crate::methods::method::Recurrent> {
                Err($crate::base::Error::Unsupported(format!(
                    "{} decodes through a GatedDecoder (Attention::prefill_gated or \
                     gated_decoder), which takes its g and β",
                    INFO.name
                )))
            }

            fn info(&self) -> &'static $crate::methods::info::MethodInfo {
                &INFO
            }
        }
    };
}
pub(crate) use gated_method;
