//! A prepared attention call: [`Plan`] holds what does not change between calls of one
//! shape and element type, so that repeated calls redo none of it.

use crate::api::attention::{Attention, Gradients};
use crate::base::memory;
use crate::base::{CausalForm, Element, Error, Problem, Result, Tensor};
use crate::engine::FinalStates;
use crate::methods::{AttentionMethod, GateInputs, GatedGradients, GatedOutput, Prepared};

/// An [`Attention`] prepared for q, k and v of given shapes and element type `T`: the
/// shapes and options validated, the memory decision made (against the limit, or the
/// memory the system had when the plan was made), and what the method builds before
/// computing (Performer's ω, FNet's FFT plans, Linformer's projections) built once.
/// Calls through it redo none of that and read no system files.
///
/// ```
/// use linattn::{Attention, Method, Performer, Tensor};
/// let attention = Attention::new(Method::Performer(Performer::new(128, 0))).causal(true);
/// let shape = [1, 300, 4, 32];
/// let plan = attention.plan::<f32>(shape, shape, shape)?;
/// for seed in 0..3 {
///     let x = Tensor::<f32>::randn(shape, seed)?;
///     let out = plan.forward(&x, &x, &x)?;
///     assert_eq!(out, attention.forward(&x, &x, &x)?);
/// }
/// # Ok::<(), linattn::Error>(())
/// ```
pub struct Plan<T> {
    attention: Attention,
    problem: Problem,
    out_shape: [usize; 4],
    prepared: Prepared<T>,
    /// The bytes a call may use: the limit, or what was available at planning.
    budget: u128,
}

impl Attention {
    /// Prepares calls of this attention on q, k and v of these shapes in `T`; fails as
    /// [`Attention::forward`] would for anything but the inputs' values (shapes,
    /// options, the memory of a forward call).
    pub fn plan<T: Element>(&self, q: [usize; 4], k: [usize; 4], v: [usize; 4]) -> Result<Plan<T>> {
        self.plan_checked(q, k, v, true)
    }

    /// [`Attention::plan`], the memory of a forward call checked with or without its
    /// output (which `forward_into` does not allocate).
    pub(crate) fn plan_checked<T: Element>(
        &self,
        q: [usize; 4],
        k: [usize; 4],
        v: [usize; 4],
        with_output: bool,
    ) -> Result<Plan<T>> {
        let problem = self.problem(q, k, v)?;
        let budget = memory::budget(self.limit());
        let out_shape = self.method.out_shape(&problem);
        let out_bytes = if with_output {
            bytes_of::<T>(out_shape)
        } else {
            0
        };
        // Refused before anything is built or allocated.
        let needed = out_bytes + self.method.workspace_bytes(&problem, size_of::<T>());
        memory::ensure_within(&self.describe::<T>(&problem, [q, k, v]), needed, budget)?;
        self.finish_plan(problem, budget)
    }

    /// A plan whose calls check their own memory (the backward's).
    pub(crate) fn plan_unchecked<T: Element>(
        &self,
        q: [usize; 4],
        k: [usize; 4],
        v: [usize; 4],
    ) -> Result<Plan<T>> {
        let problem = self.problem(q, k, v)?;
        self.finish_plan(problem, memory::budget(self.limit()))
    }

    fn finish_plan<T: Element>(&self, problem: Problem, budget: u128) -> Result<Plan<T>> {
        Ok(Plan {
            attention: self.clone(),
            out_shape: self.method.out_shape(&problem),
            prepared: self.method.prepare(&problem)?,
            problem,
            budget,
        })
    }

    fn describe<T: Element>(&self, problem: &Problem, [q, k, v]: [[usize; 4]; 3]) -> String {
        format!(
            "{}{} attention with q {q:?}, k {k:?}, v {v:?} ({})",
            if problem.causal { "causal " } else { "" },
            self.method.name(),
            T::NAME
        )
    }
}

impl<T: Element> Plan<T> {
    /// The output's shape.
    ///
    /// ```
    /// use linattn::{Attention, Method};
    /// let plan = Attention::new(Method::linear()).plan::<f32>([1, 9, 4, 8], [1, 9, 2, 8], [1, 9, 2, 5])?;
    /// assert_eq!(plan.output_shape(), [1, 9, 4, 5]);
    /// # Ok::<(), linattn::Error>(())
    /// ```
    pub fn output_shape(&self) -> [usize; 4] {
        self.out_shape
    }

    /// [`Attention::forward`] through the plan; the inputs must have the planned shapes.
    pub fn forward(&self, q: &Tensor<T>, k: &Tensor<T>, v: &Tensor<T>) -> Result<Tensor<T>> {
        self.forward_with_states(q, k, v).map(|(out, _)| out)
    }

    /// [`Attention::forward_into`] through the plan.
    ///
    /// ```
    /// use linattn::{Attention, Method, Tensor};
    /// let x = Tensor::<f64>::randn([2, 40, 2, 8], 0)?;
    /// let plan = Attention::new(Method::linear()).causal(true).plan::<f64>(x.shape(), x.shape(), x.shape())?;
    /// let mut out = Tensor::zeros(plan.output_shape())?;
    /// plan.forward_into(&x, &x, &x, &mut out)?;
    /// assert_eq!(out, plan.forward(&x, &x, &x)?);
    /// # Ok::<(), linattn::Error>(())
    /// ```
    pub fn forward_into(
        &self,
        q: &Tensor<T>,
        k: &Tensor<T>,
        v: &Tensor<T>,
        out: &mut Tensor<T>,
    ) -> Result<()> {
        self.check_shapes([q, k, v])?;
        if out.shape() != self.out_shape {
            return Err(Error::ShapeMismatch {
                detail: format!(
                    "the output tensor has shape {:?} but the output is {:?}",
                    out.shape(),
                    self.out_shape
                ),
            });
        }
        self.compute(q, k, v, out).map(drop)
    }

    /// [`Plan::forward`], also returning the final state of every kv head the chunked
    /// causal form computed (at `b · heads_kv + g`), for the decoder.
    pub(crate) fn forward_with_states(
        &self,
        q: &Tensor<T>,
        k: &Tensor<T>,
        v: &Tensor<T>,
    ) -> Result<(Tensor<T>, FinalStates<T>)> {
        self.check_shapes([q, k, v])?;
        let mut out = Tensor::zeros_planned(self.out_shape)?;
        let states = self.compute(q, k, v, &mut out)?;
        Ok((out, states))
    }

    /// [`Attention::forward_gated`] through the plan.
    pub fn forward_gated(
        &self,
        q: &Tensor<T>,
        k: &Tensor<T>,
        v: &Tensor<T>,
        inputs: &GateInputs<'_, T>,
    ) -> Result<GatedOutput<T>> {
        let mut out = Tensor::zeros_planned(self.out_shape)?;
        let final_state = self.forward_gated_into(q, k, v, inputs, &mut out)?;
        Ok(GatedOutput { out, final_state })
    }

    /// [`Attention::forward_gated_into`] through the plan.
    pub fn forward_gated_into(
        &self,
        q: &Tensor<T>,
        k: &Tensor<T>,
        v: &Tensor<T>,
        inputs: &GateInputs<'_, T>,
        out: &mut Tensor<T>,
    ) -> Result<Tensor<T>> {
        self.check_shapes([q, k, v])?;
        if out.shape() != self.out_shape {
            return Err(Error::ShapeMismatch {
                detail: format!(
                    "the output tensor has shape {:?} but the output is {:?}",
                    out.shape(),
                    self.out_shape
                ),
            });
        }
        let (method, problem) = (&self.attention.method, &self.problem);
        let rule = self.gated_rule()?;
        let parallel = problem.causal_form == CausalForm::Parallel;
        // The run checks what it reads and writes while each piece is in cache; where it
        // did not, or found a value that is not finite, these name it.
        let (final_state, verified) = rule.forward(problem, [q, k, v], inputs, parallel, out)?;
        if !verified {
            check_inputs([q, k, v])?;
            check_results(
                method.name(),
                [("output", &*out), ("final_state", &final_state)],
            )?;
        }
        Ok(final_state)
    }

    /// Fails unless `d_out` has the output's shape.
    fn check_output_gradient(&self, d_out: &Tensor<T>) -> Result<()> {
        if d_out.shape() == self.out_shape {
            return Ok(());
        }
        Err(Error::ShapeMismatch {
            detail: format!(
                "the output gradient has shape {:?} but the output has shape {:?}",
                d_out.shape(),
                self.out_shape
            ),
        })
    }

    /// Fails unless the gradients and the backward's scratch fit the plan's budget.
    fn ensure_backward_memory(&self) -> Result<()> {
        let method = &self.attention.method;
        let grads_bytes: u128 = self
            .problem
            .shapes()
            .iter()
            .map(|&s| bytes_of::<T>(s))
            .sum();
        let needed = grads_bytes + method.backward_workspace_bytes(&self.problem, size_of::<T>());
        memory::ensure_within(
            &format!(
                "the backward of {} attention with q {:?}",
                method.name(),
                self.problem.shapes()[0]
            ),
            needed,
            self.budget,
        )
    }

    /// [`Attention::backward_gated`] through the plan.
    pub fn backward_gated(
        &self,
        q: &Tensor<T>,
        k: &Tensor<T>,
        v: &Tensor<T>,
        inputs: &GateInputs<'_, T>,
        d_out: &Tensor<T>,
        d_final_state: Option<&Tensor<T>>,
    ) -> Result<GatedGradients<T>> {
        self.check_shapes([q, k, v])?;
        let rule = self.gated_rule()?;
        self.check_output_gradient(d_out)?;
        let final_gradient = d_final_state.map(|d| ("d_final_state", d));
        check_finite(
            [("q", q), ("k", k), ("v", v), ("d_out", d_out)]
                .into_iter()
                .chain(final_gradient),
        )?;
        self.ensure_backward_memory()?;
        let grads = rule.backward(&self.problem, [q, k, v], inputs, d_out, d_final_state)?;
        let dg = grads.dg.as_ref().map(|dg| ("dg", dg));
        let results = [("dq", &grads.dq), ("dk", &grads.dk), ("dv", &grads.dv)];
        check_results(self.attention.method.name(), results.into_iter().chain(dg))?;
        Ok(grads)
    }

    /// The method's state update, for the gated family's calls.
    fn gated_rule(&self) -> Result<crate::methods::gated::Rule> {
        let method = &self.attention.method;
        method.gated_rule(&self.problem).ok_or_else(|| {
            Error::Unsupported(format!(
                "{} is not of the gated family (retention, gla, delta-rule, gated-delta-rule); \
                 call Attention::forward",
                method.name()
            ))
        })
    }

    /// [`Attention::backward`] through the plan: its memory is checked against the
    /// plan's budget.
    ///
    /// ```
    /// use linattn::{Attention, Method, Tensor};
    /// let x = Tensor::<f64>::randn([1, 30, 2, 8], 0)?;
    /// let attention = Attention::new(Method::linear()).causal(true);
    /// let plan = attention.plan::<f64>(x.shape(), x.shape(), x.shape())?;
    /// assert_eq!(plan.backward(&x, &x, &x, &x)?, attention.backward(&x, &x, &x, &x)?);
    /// # Ok::<(), linattn::Error>(())
    /// ```
    pub fn backward(
        &self,
        q: &Tensor<T>,
        k: &Tensor<T>,
        v: &Tensor<T>,
        d_out: &Tensor<T>,
    ) -> Result<Gradients<T>> {
        self.check_shapes([q, k, v])?;
        let method = &self.attention.method;
        self.check_output_gradient(d_out)?;
        check_finite([("q", q), ("k", k), ("v", v), ("d_out", d_out)])?;
        self.ensure_backward_memory()?;
        let (mut dq, mut dk, mut dv) = (
            Tensor::zeros_planned(q.shape())?,
            Tensor::zeros_planned(k.shape())?,
            Tensor::zeros_planned(v.shape())?,
        );
        let projections = method.backward(
            &self.problem,
            &self.prepared,
            [q, k, v, d_out],
            [&mut dq, &mut dk, &mut dv],
        )?;
        check_results(method.name(), [("dq", &dq), ("dk", &dk), ("dv", &dv)])?;
        Ok(Gradients {
            dq,
            dk,
            dv,
            projections,
        })
    }

    fn check_shapes(&self, inputs: [&Tensor<T>; 3]) -> Result<()> {
        for ((name, tensor), planned) in ["q", "k", "v"]
            .into_iter()
            .zip(inputs)
            .zip(self.problem.shapes())
        {
            if tensor.shape() != planned {
                return Err(Error::ShapeMismatch {
                    detail: format!(
                        "{name} has shape {:?} but the plan was made for {planned:?}",
                        tensor.shape()
                    ),
                });
            }
        }
        Ok(())
    }

    /// Checks the inputs, computes into `out` (writing every element) and checks the
    /// result.
    fn compute(
        &self,
        q: &Tensor<T>,
        k: &Tensor<T>,
        v: &Tensor<T>,
        out: &mut Tensor<T>,
    ) -> Result<FinalStates<T>> {
        let (method, problem) = (&self.attention.method, &self.problem);
        let checked_in_pass = method.checks_while_reading(problem);
        if !checked_in_pass {
            check_inputs([q, k, v])?;
        }
        let heads = 0..problem.heads_q;
        let pass = method.forward(problem, &self.prepared, q, k, v, out, heads)?;
        if pass.finite != Some(true) {
            // The pass saw a NaN or infinity somewhere, or did not look: find it.
            if checked_in_pass {
                check_inputs([q, k, v])?;
            }
            check_results(method.name(), [("output", &*out)])?;
        }
        Ok(pass.states)
    }
}

fn bytes_of<T>(shape: [usize; 4]) -> u128 {
    shape
        .iter()
        .fold(size_of::<T>() as u128, |bytes, &x| bytes * x as u128)
}

/// [`Error::NonFinite`] for the first NaN or infinity in q, k or v.
fn check_inputs<T: Element>([q, k, v]: [&Tensor<T>; 3]) -> Result<()> {
    check_finite([("q", q), ("k", k), ("v", v)])
}

/// [`Error::NonFinite`] for the first NaN or infinity in the named inputs.
pub(crate) fn check_finite<'a, T: Element>(
    inputs: impl IntoIterator<Item = (&'static str, &'a Tensor<T>)>,
) -> Result<()> {
    for (tensor, input) in inputs {
        if let Some((index, value)) = input.first_non_finite() {
            return Err(Error::NonFinite {
                tensor,
                index,
                value,
            });
        }
    }
    Ok(())
}

/// [`Error::NonFiniteOutput`] for the first NaN or infinity in the named results of
/// `method`, computed from finite inputs.
pub(crate) fn check_results<'a, T: Element>(
    method: &'static str,
    results: impl IntoIterator<Item = (&'static str, &'a Tensor<T>)>,
) -> Result<()> {
    for (tensor, result) in results {
        if let Some((index, _)) = result.first_non_finite() {
            return Err(Error::NonFiniteOutput {
                method,
                tensor,
                index,
            });
        }
    }
    Ok(())
}
