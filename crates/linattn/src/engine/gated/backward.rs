//! The gradients of the recurrence, token by token in reverse. With `S' = Diag(e^{g_t})
//! S_{t−1}`, `u_t = β_t (v_t − S'ᵀ k_t)` (the delta rule) or `v_t`, `S_t = S' + k_t u_tᵀ` and
//! `o_t = s · S_tᵀ q_t`, going back from `∂S_T` (the final state's gradient):
//!
//! - `∂q_t = s · S_t ∂o_t`, and `∂S_t += s · q_t ∂o_tᵀ`;
//! - `∂S' = ∂S_t`, `∂k_t = ∂S_t u_t`, `∂u_t = ∂S_tᵀ k_t`;
//! - the delta rule: `∂v_t = β_t ∂u_t`, `∂β_t = ∂u_t · (v_t − S'ᵀ k_t)`, and with
//!   `∂r = −β_t ∂u_t`: `∂S' += k_t ∂rᵀ`, `∂k_t += S' ∂r`; the plain sum: `∂v_t = ∂u_t`;
//! - `∂g_t = Σ_j ∂S'_{cj} S'_{cj}` (per channel c, or summed over them for a scalar gate)
//!   and `∂S_{t−1} = Diag(e^{g_t}) ∂S'`.
//!
//! The states are recomputed forwards from checkpoints kept every [`SEGMENT`] tokens, so
//! memory grows by one state per segment rather than per token.

use super::recurrent::{Token, decay};
use super::{GatedShape, Gates, Span};
use crate::base::simd;
use crate::base::{Element, Tensor};
use rayon::prelude::*;

/// Tokens between the kept states: a segment's states are recomputed at once, 64 states
/// of `d_k × d_v` (a megabyte at 64 × 64 in f32) per thread.
pub(crate) const SEGMENT: usize = 64;

/// Gradients of one call, in the layouts of its inputs.
pub(crate) struct GatedGrads<T> {
    pub dq: Tensor<T>,
    pub dk: Tensor<T>,
    pub dv: Tensor<T>,
    /// `[batch, len, heads_v, width]` for a gate read per token (width 1 or `dim_k`).
    pub dg: Option<Vec<T>>,
    /// `[batch, len, heads_v]`.
    pub dbeta: Option<Vec<T>>,
    /// `[batch, heads_v, dim_k, dim_v]`.
    pub d_initial: Vec<T>,
}

/// The gradients of `Σ ∂o ∘ o + Σ ∂S_T ∘ S_T` with respect to q, k, v, the per-token
/// gates and the initial states, for the recurrence [`super::recurrent::recurrent`] runs.
#[allow(clippy::too_many_arguments)]
pub(crate) fn backward<T: Element>(
    shape: &GatedShape,
    [q, k, v]: [&Tensor<T>; 3],
    gates: &Gates<'_, T>,
    gate_per_token: bool,
    scale: T,
    initial: &[T],
    d_out: &Tensor<T>,
    d_final: Option<&[T]>,
) -> GatedGrads<T> {
    let (dim_k, dim_v, len) = (shape.dim_k, shape.dim_v, shape.len);
    let width = gates.width(shape);
    let units = gates.units(shape);
    let state_len = shape.state_len();
    // Each unit's gradients, then summed into the shared q and k heads.
    let per_unit: Vec<UnitGrads<T>> = (0..units)
        .into_par_iter()
        .map(|unit| {
            let span = gates.span(shape, unit);
            let start = &initial[unit * state_len..(unit + 1) * state_len];
            let d_end = d_final.map(|d| &d[unit * state_len..(unit + 1) * state_len]);
            unit_backward(shape, [q, k, v], gates, scale, span, start, d_out, d_end)
        })
        .collect();

    let mut dq = Tensor::zeros(q.shape()).expect("q's shape is valid");
    let mut dk = Tensor::zeros(k.shape()).expect("k's shape is valid");
    let mut dv = Tensor::zeros(v.shape()).expect("v's shape is valid");
    let mut dg = gate_per_token.then(|| vec![T::zero(); shape.batch * len * shape.heads_v * width]);
    let mut dbeta = gates
        .beta
        .map(|_| vec![T::zero(); shape.batch * len * shape.heads_v]);
    let mut d_initial = vec![T::zero(); units * state_len];
    for (unit, grads) in per_unit.into_iter().enumerate() {
        let Span { b, hv, first, .. } = gates.span(shape, unit);
        let h = shape.qk_head(hv);
        for t in 0..grads.dbeta.len() {
            let row = b * len + first + t;
            let qk = (row * shape.heads + h) * dim_k;
            let token = row * shape.heads_v + hv;
            simd::add_scaled(
                &mut dq.as_mut_slice()[qk..qk + dim_k],
                &grads.dq[t * dim_k..][..dim_k],
                T::one(),
            );
            simd::add_scaled(
                &mut dk.as_mut_slice()[qk..qk + dim_k],
                &grads.dk[t * dim_k..][..dim_k],
                T::one(),
            );
            dv.as_mut_slice()[token * dim_v..(token + 1) * dim_v]
                .copy_from_slice(&grads.dv[t * dim_v..][..dim_v]);
            if let Some(dg) = &mut dg {
                dg[token * width..(token + 1) * width]
                    .copy_from_slice(&grads.dg[t * width..][..width]);
            }
            if let Some(dbeta) = &mut dbeta {
                dbeta[token] = grads.dbeta[t];
            }
        }
        d_initial[unit * state_len..(unit + 1) * state_len].copy_from_slice(&grads.d_initial);
    }
    if gates.l2norm_qk {
        normalisation_backward(q, &mut dq);
        normalisation_backward(k, &mut dk);
    }
    GatedGrads {
        dq,
        dk,
        dv,
        dg,
        dbeta,
        d_initial,
    }
}

/// Turns the gradients of L2-normalised rows `x̂ = x / n`, `n = sqrt(Σ x² + ε)`, into
/// those of `x`: `∂x = (∂x̂ − x̂ (x̂ · ∂x̂)) / n`.
fn normalisation_backward<T: Element>(x: &Tensor<T>, dx: &mut Tensor<T>) {
    let d = x.head_dim();
    let epsilon = T::of_f64(super::L2NORM_EPSILON);
    for (row, d_row) in x
        .as_slice()
        .chunks_exact(d)
        .zip(dx.as_mut_slice().chunks_exact_mut(d))
    {
        // With n² = Σ x² + ε: ∂x = (∂x̂ − x (x · ∂x̂) / n²) / n.
        let norm_squared = simd::dot(row, row) + epsilon;
        let along = simd::dot(row, d_row) / norm_squared;
        simd::add_scaled(d_row, row, -along);
        simd::scale(d_row, T::one() / norm_squared.sqrt());
    }
}

/// One unit's gradients, `len` rows each.
struct UnitGrads<T> {
    dq: Vec<T>,
    dk: Vec<T>,
    dv: Vec<T>,
    dg: Vec<T>,
    dbeta: Vec<T>,
    d_initial: Vec<T>,
}

/// The gradients of unit (b, hv): its states kept every [`SEGMENT`] tokens going
/// forwards, then each segment's states recomputed and walked back.
#[allow(clippy::too_many_arguments)]
fn unit_backward<T: Element>(
    shape: &GatedShape,
    [q, k, v]: [&Tensor<T>; 3],
    gates: &Gates<'_, T>,
    scale: T,
    Span { b, hv, first, len }: Span,
    initial: &[T],
    d_out: &Tensor<T>,
    d_final: Option<&[T]>,
) -> UnitGrads<T> {
    let (dim_k, dim_v) = (shape.dim_k, shape.dim_v);
    let state_len = shape.state_len();
    let width = gates.width(shape);
    let h = shape.qk_head(hv);
    // Tokens by their place in the unit, t = 0..len.
    let read =
        |token: &mut Token<T>, t: usize| token.read(shape, [q, k, v], gates, b, h, hv, first + t);
    let mut token = Token::new(shape, width);

    // The state before each segment.
    let segments = len.div_ceil(SEGMENT);
    let mut checkpoints = vec![T::zero(); segments * state_len];
    let mut state = initial.to_vec();
    for segment in 0..segments {
        checkpoints[segment * state_len..(segment + 1) * state_len].copy_from_slice(&state);
        for t in segment * SEGMENT..((segment + 1) * SEGMENT).min(len) {
            read(&mut token, t);
            token.step(&mut state, None);
        }
    }

    let mut grads = UnitGrads {
        dq: vec![T::zero(); len * dim_k],
        dk: vec![T::zero(); len * dim_k],
        dv: vec![T::zero(); len * dim_v],
        dg: vec![T::zero(); len * width],
        dbeta: vec![T::zero(); len],
        d_initial: vec![T::zero(); state_len],
    };
    let mut d_state = d_final.map_or_else(|| vec![T::zero(); state_len], <[T]>::to_vec);
    // S' of each token of a segment (after its decay, before it absorbs).
    let mut decayed = vec![T::zero(); SEGMENT * state_len];
    // A segment's tokens as the recomputation read them, with what each absorbed.
    let mut tokens: Vec<Token<T>> = (0..SEGMENT).map(|_| Token::new(shape, width)).collect();
    let (mut du, mut dr) = (vec![T::zero(); dim_v], vec![T::zero(); dim_v]);
    for segment in (0..segments).rev() {
        let segment_start = segment * SEGMENT;
        let end = (segment_start + SEGMENT).min(len);
        state.copy_from_slice(&checkpoints[segment * state_len..(segment + 1) * state_len]);
        for t in segment_start..end {
            let token = &mut tokens[t - segment_start];
            read(token, t);
            decay(&mut state, dim_v, &token.decays);
            decayed[(t - segment_start) * state_len..][..state_len].copy_from_slice(&state);
            token.absorb(&mut state);
        }
        for t in (segment_start..end).rev() {
            let token = &tokens[t - segment_start];
            let s_prime = &decayed[(t - segment_start) * state_len..][..state_len];
            let row = b * shape.len + first + t;
            let d_o = &d_out.as_slice()[(row * shape.heads_v + hv) * dim_v..][..dim_v];
            // ∂q = s S_t ∂o with S_t = S' + k uᵀ, so s (S' ∂o + k (u · ∂o));
            // ∂S_t += s q ∂oᵀ.
            let u_d_o = simd::dot(&token.u, d_o);
            for (((dq_c, row), &k_c), (ds_row, &q_c)) in grads.dq[t * dim_k..][..dim_k]
                .iter_mut()
                .zip(s_prime.chunks_exact(dim_v))
                .zip(&token.k)
                .zip(d_state.chunks_exact_mut(dim_v).zip(&token.q))
            {
                *dq_c = scale * (simd::dot(row, d_o) + k_c * u_d_o);
                simd::add_scaled(ds_row, d_o, scale * q_c);
            }
            // ∂k = ∂S u; ∂u = ∂Sᵀ k.
            du.fill(T::zero());
            for ((dk_c, ds_row), &k_c) in grads.dk[t * dim_k..][..dim_k]
                .iter_mut()
                .zip(d_state.chunks_exact(dim_v))
                .zip(&token.k)
            {
                *dk_c = simd::dot(ds_row, &token.u);
                simd::add_scaled(&mut du, ds_row, k_c);
            }
            let dv_t = &mut grads.dv[t * dim_v..][..dim_v];
            match token.beta {
                Some(beta) => {
                    // u = β (v − r), r = S'ᵀ k.
                    for (dv_j, &du_j) in dv_t.iter_mut().zip(&du) {
                        *dv_j = beta * du_j;
                    }
                    grads.dbeta[t] = simd::dot(&du, &token.residual);
                    for (dr_j, &du_j) in dr.iter_mut().zip(&du) {
                        *dr_j = -beta * du_j;
                    }
                    for ((dk_c, ds_row), (s_row, &k_c)) in grads.dk[t * dim_k..][..dim_k]
                        .iter_mut()
                        .zip(d_state.chunks_exact_mut(dim_v))
                        .zip(s_prime.chunks_exact(dim_v).zip(&token.k))
                    {
                        *dk_c += simd::dot(s_row, &dr);
                        simd::add_scaled(ds_row, &dr, k_c);
                    }
                }
                None => dv_t.copy_from_slice(&du),
            }
            // S' = Diag(e^g) S_{t−1}: ∂g = Σ ∂S' ∘ S' (per channel), ∂S_{t−1} = Diag(e^g) ∂S'.
            let dg_t = &mut grads.dg[t * width..][..width];
            for (c, (ds_row, s_row)) in d_state
                .chunks_exact(dim_v)
                .zip(s_prime.chunks_exact(dim_v))
                .enumerate()
            {
                if width > 0 {
                    dg_t[c % width] += simd::dot(ds_row, s_row);
                }
            }
            decay(&mut d_state, dim_v, &token.decays);
        }
    }
    grads.d_initial = d_state;
    grads
}
