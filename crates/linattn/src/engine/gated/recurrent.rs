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
pub(crate) fn recurrent<'a, T: Element>(
    shape: &GatedShape,
    [q, k, v]: [&'a Tensor<T>; 3],
    gates: &Gates<'_, T>,
    scale: T,
    states: &mut [T],
    out: &mut Tensor<T>,
) {
    let (dim_k, dim_v) = (shape.dim_k, shape.dim_v);
    let width = gates.width(shape);
    let out_heads = out.heads_mut();
    let [q, k, v] = [q, k, v].map(Tensor::as_slice);
    let run = |(unit, state): (usize, &mut [T])| {
        let Span { b, hv, first, len } = gates.span(shape, unit);
        let h = shape.qk_head(hv);
        // SAFETY: these rows of value head hv belong to this unit alone.
        let mut rows = unsafe { out_heads.block(b, hv, first, len) };
        let mut decays = vec![T::zero(); width];
        let mut update = vec![T::zero(); dim_v];
        let (mut q_t, mut k_t) = (vec![T::zero(); dim_k], vec![T::zero(); dim_k]);
        for (i, t) in (first..first + len).enumerate() {
            gates.log_decays(shape, b, hv, t, &mut decays);
            decay(state, dim_v, &decays);
            let row = |x: &'a [T], heads: usize, head: usize, d: usize| -> &'a [T] {
                let at = ((b * shape.len + t) * heads + head) * d;
                &x[at..at + d]
            };
            q_t.copy_from_slice(row(q, shape.heads, h, dim_k));
            k_t.copy_from_slice(row(k, shape.heads, h, dim_k));
            if gates.l2norm_qk {
                l2_normalise_rows(&mut q_t, dim_k);
                l2_normalise_rows(&mut k_t, dim_k);
            }
            let v_t = row(v, shape.heads_v, hv, dim_v);
            match gates.beta(shape, b, hv, t) {
                // β (v − S'ᵀ k), then S' + k (that)ᵀ.
                Some(beta) => {
                    update.copy_from_slice(v_t);
                    for (s_c, &k_c) in state.chunks_exact(dim_v).zip(&k_t) {
                        simd::add_scaled(&mut update, s_c, -k_c);
                    }
                    simd::scale(&mut update, beta);
                }
                None => update.copy_from_slice(v_t),
            }
            for (s_c, &k_c) in state.chunks_exact_mut(dim_v).zip(&k_t) {
                simd::add_scaled(s_c, &update, k_c);
            }
            let o = rows.row_mut(i);
            o.fill(T::zero());
            for (s_c, &q_c) in state.chunks_exact(dim_v).zip(&q_t) {
                simd::add_scaled(o, s_c, q_c * scale);
            }
        }
    };
    // A decode step's few states take microseconds: waking another thread for them
    // would take longer than the work.
    if states.len() * shape.len <= SEQUENTIAL_WORK {
        states
            .chunks_mut(shape.state_len())
            .enumerate()
            .for_each(run);
    } else {
        states
            .par_chunks_mut(shape.state_len())
            .enumerate()
            .for_each(run);
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
