//! The recurrent form: each state decays and absorbs one token at a time, and the token's
//! output reads it. What a decode step runs; O(d_k · d_v) per token and head.

use super::{GatedShape, Gates, Span, l2_normalise_rows};
use crate::base::simd;
use crate::base::{Element, Tensor};
use rayon::prelude::*;

/// State elements × tokens below which the units run on the calling thread: 64k, about
/// 20 µs of work on one core.
const SEQUENTIAL_WORK: usize = 1 << 16;

/// Runs every token of q, k, v through `states` (`[batch, heads_v, dim_k, dim_v]`: the
/// initial states, left as the final ones) and writes `o_t = scale · S_tᵀ q_t` to `out`
/// (`[batch, len, heads_v, dim_v]`).
pub(crate) fn recurrent<T: Element>(
    shape: &GatedShape,
    [q, k, v]: [&Tensor<T>; 3],
    gates: &Gates<'_, T>,
    scale: T,
    states: &mut [T],
    out: &mut Tensor<T>,
) {
    let width = gates.width(shape);
    let out_heads = out.heads_mut();
    let run = |token: &mut Token<T>, (unit, state): (usize, &mut [T])| {
        let Span { b, hv, first, len } = gates.span(shape, unit);
        let h = shape.qk_head(hv);
        // SAFETY: these rows of value head hv belong to this unit alone.
        let mut rows = unsafe { out_heads.block(b, hv, first, len) };
        for (i, t) in (first..first + len).enumerate() {
            token.read(shape, [q, k, v], gates, b, h, hv, t);
            token.step(state, Some((rows.row_mut(i), scale)));
        }
    };
    // A decode step's few states take microseconds: waking another thread for them
    // would take longer than the work.
    if states.len() * shape.len <= SEQUENTIAL_WORK {
        let mut token = Token::new(shape, width);
        let units = states.chunks_mut(shape.state_len()).enumerate();
        units.for_each(|unit| run(&mut token, unit));
    } else {
        states
            .par_chunks_mut(shape.state_len())
            .enumerate()
            .for_each_init(|| Token::new(shape, width), run);
    }
}

/// Multiplies a `dim_k × dim_v` state by the decays of one token: every element by one
/// factor for a scalar gate, each row by its channel's, nothing without decay.
pub(crate) fn decay<T: Element>(state: &mut [T], dim_v: usize, log_decays: &[T]) {
    match log_decays {
        [] => {}
        [g] => simd::scale(state, g.exp()),
        per_channel => {
            for (row, g) in state.chunks_exact_mut(dim_v).zip(per_channel) {
                simd::scale(row, g.exp());
            }
        }
    }
}

/// One token of one unit as the recurrence reads it (q and k normalised where asked),
/// and what the state absorbs of it.
pub(super) struct Token<T> {
    pub(super) q: Vec<T>,
    pub(super) k: Vec<T>,
    pub(super) v: Vec<T>,
    pub(super) decays: Vec<T>,
    /// `e^g` per key channel: the decays as factors.
    factors: Vec<T>,
    /// A key-length row of coefficients: the negated decayed keys, then `s · q`.
    scaled: Vec<T>,
    pub(super) beta: Option<T>,
    /// What the state absorbs: `u_t`.
    pub(super) u: Vec<T>,
    /// `v_t − S'ᵀ k_t` (the delta rule).
    pub(super) residual: Vec<T>,
}

impl<T: Element> Token<T> {
    pub(super) fn new(shape: &GatedShape, width: usize) -> Self {
        Self {
            q: vec![T::zero(); shape.dim_k],
            k: vec![T::zero(); shape.dim_k],
            v: vec![T::zero(); shape.dim_v],
            decays: vec![T::zero(); width],
            factors: Vec::with_capacity(shape.dim_k),
            scaled: vec![T::zero(); shape.dim_k],
            beta: None,
            u: vec![T::zero(); shape.dim_v],
            residual: vec![T::zero(); shape.dim_v],
        }
    }

    /// Token t's q and k rows (normalised if asked), v row, decays and β.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn read(
        &mut self,
        shape: &GatedShape,
        [q, k, v]: [&Tensor<T>; 3],
        gates: &Gates<'_, T>,
        b: usize,
        h: usize,
        hv: usize,
        t: usize,
    ) {
        let (dim_k, dim_v) = (shape.dim_k, shape.dim_v);
        let qk = ((b * shape.len + t) * shape.heads + h) * dim_k;
        let token = shape.token(b, t, hv);
        self.q.copy_from_slice(&q.as_slice()[qk..qk + dim_k]);
        self.k.copy_from_slice(&k.as_slice()[qk..qk + dim_k]);
        if gates.l2norm_qk {
            l2_normalise_rows(&mut self.q, dim_k);
            l2_normalise_rows(&mut self.k, dim_k);
        }
        self.v
            .copy_from_slice(&v.as_slice()[token * dim_v..(token + 1) * dim_v]);
        gates.log_decays(shape, b, hv, t, &mut self.decays);
        self.beta = gates.beta(shape, b, hv, t);
    }

    /// `S ← S + k uᵀ` on a state already decayed, keeping `u` (`β (v − Sᵀ k)` for the
    /// delta rule, with the residual `v − Sᵀ k`; `v` for the plain sum).
    pub(super) fn absorb(&mut self, state: &mut [T]) {
        let dim_k = self.k.len();
        self.factors.clear();
        self.factors.resize(dim_k, T::one());
        self.update(state, None);
    }

    /// One whole step, decay then absorb, in two passes over the state: `S'ᵀ k` read
    /// through the decay factors (the delta rule only), then each row decayed and
    /// updated, the output `o = s · S_tᵀ q` of the new rows summed where `out` gives
    /// `(o, s)`.
    pub(super) fn step(&mut self, state: &mut [T], out: Option<(&mut [T], T)>) {
        let dim_k = self.k.len();
        self.factors.clear();
        match self.decays.as_slice() {
            [] => self.factors.resize(dim_k, T::one()),
            [g] => self.factors.resize(dim_k, g.exp()),
            per_channel => {
                self.factors.extend_from_slice(per_channel);
                simd::exp_in_place(&mut self.factors);
            }
        }
        self.update(state, out);
    }

    /// `S ← Diag(factors) S + k uᵀ`, `u` kept, and the output read where asked.
    fn update(&mut self, state: &mut [T], out: Option<(&mut [T], T)>) {
        match self.beta {
            Some(beta) => {
                // The decayed keys, k ⊙ e^g, negated: what `Sᵀ` is read with.
                for ((s, &k), &f) in self.scaled.iter_mut().zip(&self.k).zip(&self.factors) {
                    *s = -(f * k);
                }
                self.residual.copy_from_slice(&self.v);
                simd::add_rows_scaled(&mut self.residual, state, &self.scaled);
                for (u, &r) in self.u.iter_mut().zip(&self.residual) {
                    *u = beta * r;
                }
            }
            None => self.u.copy_from_slice(&self.v),
        }
        let read = out.map(|(o, scale)| {
            for (s, &q) in self.scaled.iter_mut().zip(&self.q) {
                *s = scale * q;
            }
            (o, &self.scaled[..])
        });
        simd::decay_update_rows(state, &self.factors, &self.u, &self.k, read);
    }
}
