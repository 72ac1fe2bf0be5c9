//! What the gated and delta-rule family (`retention`, `gla`, `delta-rule`,
//! `gated-delta-rule`) shares: each method is a [`Rule`] for the engine's state update
//! ([`engine::gated`]); this checks a call's per-token inputs against it and runs it.
//! Conventions are flash-linear-attention's, so that outputs compare one to one: q, k
//! `[B, T, H, d_k]`, v `[B, T, HV, d_v]`, g and β `[B, T, HV, 1]` (g per key channel
//! `[B, T, HV, d_k]`), states `[B, HV, d_k, d_v]`, `o_t = s · S_tᵀ q_t` with no
//! denominator.

mod macros;
mod raw;
pub(crate) mod reference;
#[cfg(test)]
mod tests;

pub(crate) use macros::{common_options, gated_method};
use raw::{Computed, gate_backward, logits_backward};
pub use raw::{RawGate, RawGateGradients};

use crate::base::{Element, Error, Problem, Result, Tensor, per_thread, simd};
use crate::engine::gated::backward::SEGMENT as BACKWARD_SEGMENT;
use crate::engine::gated::chunked::{chunked, group_bytes};
use crate::engine::gated::{Decay, GatedShape, Gates, recurrent::recurrent};
use rayon::prelude::*;

/// The per-token inputs of a call of the gated family, and the states it starts from.
///
/// ```
/// use linattn::{Attention, GateInputs, GatedDeltaRule, Method, Tensor};
/// let [q, k] = [0, 1].map(|seed| Tensor::<f32>::randn([1, 50, 2, 16], seed).unwrap());
/// let v = Tensor::<f32>::randn([1, 50, 4, 8], 2)?; // two value heads per q/k head
/// let g = Tensor::from_vec(vec![-0.1f32; 50 * 4], [1, 50, 4, 1])?;
/// let beta = Tensor::from_vec(vec![0.5f32; 50 * 4], [1, 50, 4, 1])?;
/// let attention = Attention::new(Method::GatedDeltaRule(GatedDeltaRule::default())).causal(true);
/// let inputs = GateInputs { g: Some(&g), beta: Some(&beta), ..GateInputs::default() };
/// let result = attention.forward_gated(&q, &k, &v, &inputs)?;
/// assert_eq!(result.out.shape(), [1, 50, 4, 8]);
/// assert_eq!(result.final_state.shape(), [1, 4, 16, 8]);
/// # Ok::<(), linattn::Error>(())
/// ```
#[derive(Clone, Copy, Debug)]
pub struct GateInputs<'a, T> {
    /// The log decays `g` (every value ≤ 0): `[B, T, HV, 1]`, one per token and value head,
    /// or `[B, T, HV, d_k]`, one per key channel (GLA, KDA). Read by `gla` and
    /// `gated-delta-rule`.
    pub g: Option<&'a Tensor<T>>,
    /// The step sizes `β`, `[B, T, HV, 1]`: read by `delta-rule` and `gated-delta-rule`.
    pub beta: Option<&'a Tensor<T>>,
    /// The states to start from, `[B, HV, d_k, d_v]` (`[N, HV, d_k, d_v]` with
    /// `cu_seqlens`); zeros if `None`.
    pub initial_state: Option<&'a Tensor<T>>,
    /// N sequences of any lengths packed along the length of a batch of one (flash-
    /// linear-attention's varlen): sequence n is tokens `cu_seqlens[n]..cu_seqlens[n +
    /// 1]`, from 0 to the length, each with a state of its own.
    pub cu_seqlens: Option<&'a [usize]>,
    /// g computed inside the call from a layer's raw inputs, in place of `g`.
    pub raw_gate: Option<RawGate<'a, T>>,
    /// β's logits, `β = σ(logits)` computed inside the call, in place of `beta`.
    pub beta_logits: Option<&'a Tensor<T>>,
}

impl<T> Default for GateInputs<'_, T> {
    fn default() -> Self {
        Self {
            g: None,
            beta: None,
            initial_state: None,
            cu_seqlens: None,
            raw_gate: None,
            beta_logits: None,
        }
    }
}

/// What a call of the gated family returns.
#[derive(Clone, Debug, PartialEq)]
pub struct GatedOutput<T> {
    /// The output, `[B, T, HV, d_v]`.
    pub out: Tensor<T>,
    /// The state after the last token, `[B, HV, d_k, d_v]`: the next call's
    /// `initial_state`.
    pub final_state: Tensor<T>,
}

/// Gradients of a call of the gated family ([`Attention::backward_gated`](crate::Attention::backward_gated)).
#[derive(Clone, Debug, PartialEq)]
pub struct GatedGradients<T> {
    /// ∂loss/∂q.
    pub dq: Tensor<T>,
    /// ∂loss/∂k.
    pub dk: Tensor<T>,
    /// ∂loss/∂v.
    pub dv: Tensor<T>,
    /// ∂loss/∂g, of g's shape, where the call read g.
    pub dg: Option<Tensor<T>>,
    /// ∂loss/∂β, of β's shape, where the call read β.
    pub dbeta: Option<Tensor<T>>,
    /// ∂loss/∂(initial state), `[B, HV, d_k, d_v]`.
    pub d_initial_state: Tensor<T>,
    /// ∂loss/∂a, ∂A_log, ∂dt_bias where the call gave a [`RawGate`].
    pub raw_gate: Option<RawGateGradients<T>>,
    /// ∂loss/∂(β's logits) where the call gave them.
    pub dbeta_logits: Option<Tensor<T>>,
}

/// How one method of the family updates its state, as the engine runs it.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Rule {
    pub method: &'static str,
    pub decay: RuleDecay,
    /// Whether the update is the delta rule (reads β).
    pub delta: bool,
    /// The largest β allowed: 1, or 2 where negative eigenvalues are allowed.
    pub beta_max: f64,
    /// The output scale; `d_k^(-1/2)` if `None`.
    pub scale: Option<f64>,
    /// Whether q and k are L2-normalised inside (flash-linear-attention's
    /// `use_qk_l2norm_in_kernel`).
    pub l2norm_qk: bool,
    /// Tokens per chunk of the chunked form.
    pub chunk: usize,
}

/// Where a rule's decay comes from.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum RuleDecay {
    /// None (DeltaNet).
    None,
    /// Fixed log decays, one per value head (retention's γ).
    Fixed(Vec<f64>),
    /// The call's `g`.
    Input,
}

impl Rule {
    /// The output scale for heads of `dim_k`.
    pub fn scale(&self, dim_k: usize) -> f64 {
        self.scale.unwrap_or((dim_k as f64).powf(-0.5))
    }

    /// Checks the options: a chunk of at least one token, a finite positive scale.
    pub fn validate(&self, problem: &Problem) -> Result<()> {
        if !problem.causal {
            return Err(Error::InvalidConfig(format!(
                "{} is a causal recurrence: call it with causal(true)",
                self.method
            )));
        }
        if self.chunk == 0 {
            return Err(Error::InvalidConfig(
                "chunk must be at least 1 token".into(),
            ));
        }
        if let RuleDecay::Fixed(per_head) = &self.decay
            && per_head.iter().any(|g| !(g.is_finite() && *g <= 0.0))
        {
            return Err(Error::InvalidConfig(format!(
                "{}'s decays must lie in (0, 1], one for every value head or one per value \
                 head ({})",
                self.method, problem.heads_v
            )));
        }
        if let Some(scale) = self.scale.filter(|s| !(s.is_finite() && *s > 0.0)) {
            return Err(Error::InvalidConfig(format!(
                "scale must be finite and positive, not {scale}"
            )));
        }
        Ok(())
    }

    /// Scratch bytes of a forward call beyond inputs and output: the states and, for each
    /// thread's task, its chunk buffers (`rows²` scores among them: the parallel form's
    /// chunk is the whole sequence) and its group's gathered rows (the log decays counted
    /// per channel wherever the rule reads g; packed sequences may give every thread a
    /// task).
    pub fn workspace_bytes(&self, problem: &Problem, element: usize, chunk: usize) -> u128 {
        let (dk, dv) = (problem.dim_qk as u128, problem.dim_v as u128);
        let units = (problem.batch * problem.heads_v) as u128;
        let rows = chunk.min(problem.len_q);
        let width = match self.decay {
            RuleDecay::None => 0,
            RuleDecay::Fixed(_) => 1,
            RuleDecay::Input => dk,
        };
        // q, k, x, the decayed rows and keys, the keys to their block's end and the
        // factors from its start, the log decays and their exponentials, β.
        let r = rows as u128;
        let scratch = (r * (6 * dk + dv + 2 * width + 2) + r * r + 2 * dk) * element as u128;
        let shape = gated_shape(problem);
        let reads_g = self.decay == RuleDecay::Input;
        let group = group_bytes(&shape, rows, reads_g, element) as u128;
        units * dk * dv * element as u128 + per_thread(usize::MAX, scratch + group)
    }

    /// Scratch bytes of a backward call beyond inputs and gradients: each unit's
    /// gradients before they are summed into q's and k's heads, the engine's ∂q, ∂k, ∂v
    /// beside the ones a plan allocated, ∂g and ∂β, three states per unit (the initial
    /// one, its gradient, the gradients' copy), and each thread's checkpoints and
    /// recomputed segment.
    pub fn backward_workspace_bytes(&self, problem: &Problem, element: usize) -> u128 {
        let (dk, dv) = (problem.dim_qk as u128, problem.dim_v as u128);
        let (batch, len) = (problem.batch as u128, problem.len_q as u128);
        let units = (problem.batch * problem.heads_v) as u128;
        let state = dk * dv;
        let per_unit = len * (3 * dk + dv + 1) + 3 * state;
        let qkv = batch * len * (2 * problem.heads_q as u128 * dk + problem.heads_v as u128 * dv);
        let gates = units * len * (dk + 1);
        let segments = len.div_ceil(BACKWARD_SEGMENT as u128);
        // Checkpoints, the segment's decayed states, the state and its gradient; the
        // segment's tokens (q, k, v, u, residual, decays) and ∂u, ∂r.
        let segment = BACKWARD_SEGMENT as u128;
        let thread = (segments + segment + 2) * state + (segment + 1) * (3 * dk + 3 * dv) + 2 * dv;
        (units * per_unit + qkv + gates) * element as u128
            + per_thread(problem.batch * problem.heads_v, thread * element as u128)
    }

    /// Floating-point operations of the chunked form with chunks of `chunk` tokens.
    pub fn flops(&self, problem: &Problem, chunk: usize) -> f64 {
        let (dk, dv) = (problem.dim_qk as f64, problem.dim_v as f64);
        let c = chunk.min(problem.len_q) as f64;
        // Per token: Q S and the state update (2 d_k d_v each), the intra-chunk products
        // (c (d_k + d_v)); the delta rule adds K S and its triangular system.
        let per_token = if self.delta {
            6.0 * dk * dv + 2.0 * c * (dk + dv)
        } else {
            4.0 * dk * dv + c * (dk + dv)
        };
        (problem.batch * problem.heads_v * problem.len_q) as f64 * per_token
    }

    /// Runs the call: checks `inputs` against the rule and the problem, then [`run`]s
    /// the tokens from the initial states. Returns the final states and whether the run
    /// verified q, k, v and its results as it read them ([`run`]'s answer); a channel
    /// gate's values are checked by the run too, or here after it if it did not.
    ///
    /// [`run`]: Self::run
    pub fn forward<T: Element>(
        &self,
        problem: &Problem,
        [q, k, v]: [&Tensor<T>; 3],
        inputs: &GateInputs<'_, T>,
        parallel: bool,
        out: &mut Tensor<T>,
    ) -> Result<(Tensor<T>, bool)> {
        let shape = gated_shape(problem);
        let computed = Computed::of(inputs)?;
        let inputs = computed.inputs(inputs);
        let checked = self.check_inputs_with(&shape, &inputs, ChannelGate::AsRead)?;
        let mut states = self.initial_states(&shape, &checked)?;
        let slice = states.as_mut_slice();
        let verified = self.run(&shape, [q, k, v], &checked, parallel, slice, out);
        // The one check left to the run: a channel gate's values.
        if let (false, Some(g)) = (verified, checked.g.filter(|g| per_channel(g))) {
            check_log_decays(g)?;
        }
        Ok((states, verified))
    }

    /// Runs the tokens through `states` in place with inputs [`check_inputs`] passed: the
    /// recurrent form for one token (a decode step, whose chunk would be the recurrence
    /// with copies), else the chunked form, its chunk the whole sequence when
    /// `parallel`. Returns whether the run itself found every value of q, k, v and a
    /// channel gate finite (the gate's ≤ 0), and every output and final state finite:
    /// the chunked form checks each piece while it is in cache; the recurrent form checks
    /// nothing and answers false.
    ///
    /// [`check_inputs`]: Self::check_inputs
    pub(crate) fn run<T: Element>(
        &self,
        shape: &GatedShape,
        [q, k, v]: [&Tensor<T>; 3],
        checked: &GateInputs<'_, T>,
        parallel: bool,
        states: &mut [T],
        out: &mut Tensor<T>,
    ) -> bool {
        let fixed = self.fixed_decays::<T>();
        let gates = self.gates(checked, &fixed);
        let scale = T::of_f64(self.scale(shape.dim_k));
        if shape.len == 1 {
            recurrent(shape, [q, k, v], &gates, scale, states, out);
            false
        } else {
            let chunk = if parallel { shape.len } else { self.chunk };
            chunked(shape, [q, k, v], &gates, scale, chunk, states, out)
        }
    }

    /// The gradients of `Σ d_out ∘ out (+ Σ d_final ∘ final state)` of the call with
    /// these inputs, through the recurrence in reverse (states recomputed from
    /// checkpoints).
    pub fn backward<T: Element>(
        &self,
        problem: &Problem,
        [q, k, v]: [&Tensor<T>; 3],
        inputs: &GateInputs<'_, T>,
        d_out: &Tensor<T>,
        d_final: Option<&Tensor<T>>,
    ) -> Result<GatedGradients<T>> {
        let shape = gated_shape(problem);
        let computed = Computed::of(inputs)?;
        let checked = self.check_inputs(&shape, &computed.inputs(inputs))?;
        let state_shape = state_shape(&shape, checked.cu_seqlens);
        if let Some(d_final) = d_final
            && d_final.shape() != state_shape
        {
            return Err(Error::ShapeMismatch {
                detail: format!(
                    "the final state's gradient has shape {:?}, not the state's {state_shape:?}",
                    d_final.shape()
                ),
            });
        }
        let fixed = self.fixed_decays::<T>();
        let gates = self.gates(&checked, &fixed);
        let initial = self.initial_states(&shape, &checked)?;
        let scale = T::of_f64(self.scale(shape.dim_k));
        let grads = crate::engine::gated::backward::backward(
            &shape,
            [q, k, v],
            &gates,
            checked.g.is_some(),
            scale,
            initial.as_slice(),
            d_out,
            d_final.map(Tensor::as_slice),
        );
        let shaped = |values: Option<Vec<T>>, like: Option<&Tensor<T>>| match (values, like) {
            (Some(values), Some(like)) => Tensor::from_vec(values, like.shape()).map(Some),
            _ => Ok(None),
        };
        let (dg, dbeta) = (
            shaped(grads.dg, checked.g)?,
            shaped(grads.dbeta, checked.beta)?,
        );
        let raw_gate = match (inputs.raw_gate, &computed.g, &dg) {
            (Some(raw), Some(g), Some(dg)) => Some(gate_backward(raw, g, dg)?),
            _ => None,
        };
        let dbeta_logits = match (&computed.beta, &dbeta) {
            (Some(beta), Some(dbeta)) => Some(logits_backward(beta, dbeta)?),
            _ => None,
        };
        Ok(GatedGradients {
            dq: grads.dq,
            dk: grads.dk,
            dv: grads.dv,
            dg,
            dbeta,
            d_initial_state: Tensor::from_vec(grads.d_initial, state_shape)?,
            raw_gate,
            dbeta_logits,
        })
    }

    /// Retention's fixed log decays in `T` (empty for the other rules).
    fn fixed_decays<T: Element>(&self) -> Vec<T> {
        match &self.decay {
            RuleDecay::Fixed(per_head) => per_head.iter().map(|&g| T::of_f64(g)).collect(),
            _ => Vec::new(),
        }
    }

    /// The engine's view of checked inputs.
    fn gates<'a, T: Element>(&self, checked: &GateInputs<'a, T>, fixed: &'a [T]) -> Gates<'a, T> {
        let decay = match (&self.decay, checked.g) {
            (RuleDecay::None, _) => Decay::None,
            (RuleDecay::Fixed(_), _) => Decay::Fixed(fixed),
            (RuleDecay::Input, Some(g)) if !per_channel(g) => Decay::Token(g.as_slice()),
            (RuleDecay::Input, Some(g)) => Decay::Channel(g.as_slice()),
            (RuleDecay::Input, None) => unreachable!("check_inputs requires g"),
        };
        Gates {
            decay,
            beta: checked.beta.map(Tensor::as_slice),
            l2norm_qk: self.l2norm_qk,
            cu_seqlens: checked.cu_seqlens,
        }
    }

    /// The states a call starts from: the given ones, or zeros.
    fn initial_states<T: Element>(
        &self,
        shape: &GatedShape,
        checked: &GateInputs<'_, T>,
    ) -> Result<Tensor<T>> {
        match checked.initial_state {
            Some(initial) => Ok(initial.clone()),
            None => Tensor::zeros(state_shape(shape, checked.cu_seqlens)),
        }
    }

    /// The inputs this rule reads, checked: present where it reads them, absent where it
    /// does not, of the right shapes, finite, and in range.
    pub(crate) fn check_inputs<'a, T: Element>(
        &self,
        shape: &GatedShape,
        inputs: &GateInputs<'a, T>,
    ) -> Result<GateInputs<'a, T>> {
        self.check_inputs_with(shape, inputs, ChannelGate::Now)
    }

    /// [`check_inputs`](Self::check_inputs), a channel gate's values checked `when`.
    fn check_inputs_with<'a, T: Element>(
        &self,
        shape: &GatedShape,
        inputs: &GateInputs<'a, T>,
        when: ChannelGate,
    ) -> Result<GateInputs<'a, T>> {
        self.check_shapes(
            shape,
            InputShapes {
                g: inputs.g.map(Tensor::shape),
                beta: inputs.beta.map(Tensor::shape),
                initial_state: inputs.initial_state.map(Tensor::shape),
            },
            inputs.cu_seqlens,
        )?;
        if let Some(g) = inputs.g
            && !(per_channel(g) && when == ChannelGate::AsRead)
        {
            check_log_decays(g)?;
        }
        if let Some(beta) = inputs.beta {
            let bounds = [T::zero(), T::of_f64(self.beta_max)];
            check_values(beta, "beta", bounds, self.beta_rule())?;
        }
        if let Some(initial) = inputs.initial_state
            && let Some((index, value)) = initial.first_non_finite()
        {
            return Err(Error::NonFinite {
                tensor: "initial_state",
                index,
                value,
            });
        }
        Ok(*inputs)
    }

    /// What β must satisfy, in words.
    pub(crate) fn beta_rule(&self) -> &'static str {
        if self.beta_max > 1.0 {
            "β must lie in [0, 2] (negative eigenvalues allowed)"
        } else {
            "β must lie in [0, 1]"
        }
    }

    /// Checks what a call gives against what the rule reads, on either device: g and β
    /// present where it reads them and absent where not, of shapes that fit v's, packed
    /// offsets that cover the length, an initial state per sequence and value head.
    pub(crate) fn check_shapes(
        &self,
        shape: &GatedShape,
        given: InputShapes,
        cu_seqlens: Option<&[usize]>,
    ) -> Result<()> {
        let present =
            |name: &'static str, input: Option<[usize; 4]>, reads: bool| match (input, reads) {
                (None, true) => Err(Error::MissingInput {
                    method: self.method,
                    input: name,
                }),
                (Some(_), false) => Err(Error::InvalidConfig(format!(
                    "{} reads no {name}; leave it out",
                    self.method
                ))),
                _ => Ok(()),
            };
        present(
            "g (the log decays)",
            given.g,
            self.decay == RuleDecay::Input,
        )?;
        present("beta (the step sizes)", given.beta, self.delta)?;
        let (b, t, hv) = (shape.batch, shape.len, shape.heads_v);
        let expect = |name: &str, actual: Option<[usize; 4]>, shapes: &[[usize; 4]]| match actual {
            Some(actual) if !shapes.contains(&actual) => Err(Error::ShapeMismatch {
                detail: format!(
                    "{name} has shape {actual:?}; for v of {hv} heads over {t} tokens it must be {}",
                    shapes
                        .iter()
                        .map(|s| format!("{s:?}"))
                        .collect::<Vec<_>>()
                        .join(" or ")
                ),
            }),
            _ => Ok(()),
        };
        expect("g", given.g, &[[b, t, hv, 1], [b, t, hv, shape.dim_k]])?;
        expect("beta", given.beta, &[[b, t, hv, 1]])?;
        if let Some(cu) = cu_seqlens {
            check_cu_seqlens(cu, shape)?;
        }
        let states = state_shape(shape, cu_seqlens);
        expect("initial_state", given.initial_state, &[states])
    }
}

/// What g must satisfy, in words.
pub(crate) const G_RULE: &str = "log decays must be ≤ 0";

/// Whether `g` is a gate per key channel, as `gates` reads it: a last axis of one is one
/// gate per token.
fn per_channel<T: Element>(g: &Tensor<T>) -> bool {
    g.head_dim() > 1
}

/// Fails on the first log decay that is not finite or not ≤ 0.
fn check_log_decays<T: Element>(g: &Tensor<T>) -> Result<()> {
    check_values(g, "g", [T::min_value(), T::zero()], G_RULE)
}

/// The shapes of what a call gives beside q, k and v ([`Rule::check_shapes`]).
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct InputShapes {
    pub g: Option<[usize; 4]>,
    pub beta: Option<[usize; 4]>,
    pub initial_state: Option<[usize; 4]>,
}

/// When [`Rule::check_inputs_with`] checks a channel gate's values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ChannelGate {
    /// Before the run.
    Now,
    /// As the chunked form reads them: the gate is as large as q and k together, and a
    /// pass of its own over memory costs more than the check.
    AsRead,
}

/// The shape of a call's states: one per sequence and value head.
fn state_shape(shape: &GatedShape, cu_seqlens: Option<&[usize]>) -> [usize; 4] {
    let sequences = cu_seqlens.map_or(shape.batch, |cu| cu.len() - 1);
    [sequences, shape.heads_v, shape.dim_k, shape.dim_v]
}

/// Fails unless `cu` starts at 0, never decreases and ends at the length of a batch of
/// one, naming the first offset that does not.
fn check_cu_seqlens(cu: &[usize], shape: &GatedShape) -> Result<()> {
    let bad = |detail: String| Err(Error::InvalidConfig(format!("cu_seqlens {detail}")));
    if shape.batch != 1 {
        return bad(format!(
            "packs sequences along a batch of one, not {}",
            shape.batch
        ));
    }
    match cu {
        [] | [_] => return bad("needs at least two offsets (one sequence)".into()),
        [first, ..] if *first != 0 => return bad(format!("must start at 0, not {first}")),
        [.., last] if *last != shape.len => {
            return bad(format!("must end at the length {}, not {last}", shape.len));
        }
        _ => {}
    }
    match cu.windows(2).position(|pair| pair[1] < pair[0]) {
        Some(n) => bad(format!(
            "must not decrease: offset {} is {} after {}",
            n + 1,
            cu[n + 1],
            cu[n]
        )),
        None => Ok(()),
    }
}

/// The engine's view of a problem of the family.
pub(crate) fn gated_shape(problem: &Problem) -> GatedShape {
    GatedShape {
        batch: problem.batch,
        len: problem.len_q,
        heads: problem.heads_q,
        heads_v: problem.heads_v,
        dim_k: problem.dim_qk,
        dim_v: problem.dim_v,
    }
}

/// Fails on the first value of `tensor` that is non-finite or outside `[low, high]`
/// (finite bounds), naming it as one or the other.
fn check_values<T: Element>(
    tensor: &Tensor<T>,
    name: &'static str,
    [low, high]: [T; 2],
    rule: &'static str,
) -> Result<()> {
    // One pass over memory, by every thread for a whole sequence's gates (a decode
    // step's few are checked on this one, where waking the others would cost more).
    const PIECE: usize = 1 << 16;
    let values = tensor.as_slice();
    let inside = |piece: &[T]| simd::all_within(piece, low, high);
    let all_inside = match values.len() <= PIECE {
        true => inside(values),
        false => values.par_chunks(PIECE).all(inside),
    };
    if all_inside {
        return Ok(());
    }
    let position = values
        .iter()
        .position(|&x| !(x >= low && x <= high))
        .expect("a value outside the bounds");
    let (index, value) = (
        crate::base::tensor::unravel(position, &tensor.shape()),
        values[position].as_f64(),
    );
    Err(match value.is_finite() {
        false => Error::NonFinite {
            tensor: name,
            index,
            value,
        },
        true => Error::OutOfRange {
            tensor: name,
            index,
            value,
            allowed: rule,
        },
    })
}
