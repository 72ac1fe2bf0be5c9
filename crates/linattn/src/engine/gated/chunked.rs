//! The chunked form: within a chunk of C tokens the outputs and what the state absorbs are
//! products of C-row matrices; the state passes from chunk to chunk. With C the whole
//! sequence it is the parallel form.
//!
//! With `G_t` the log decays summed from the chunk's start through token t (per channel
//! for a channel gate) and `S` the state before the chunk:
//!
//! - the values absorbed: `X = V` for the decayed sum; for the delta rule, `(I + A) X =
//!   Diag(β) (V − (K ⊙ e^G) S)` with `A_ij = β_i Σ_c k_ic k_jc e^{G_ic − G_jc}` for j < i
//!   (the UT transform of the WY representation), solved by forward substitution;
//! - the outputs: `O = s ((Q ⊙ e^G) S + M X)`, `M_ij = Σ_c q_ic k_jc e^{G_ic − G_jc}` for
//!   j ≤ i;
//! - the state after: `e^{G_last} ⊙ S + (K ⊙ e^{G_last − G})ᵀ X`.
//!
//! Every exponent above is ≤ 0, so no factor overflows however strong the decay (a
//! factor that underflows to 0 is the right limit). Per-channel decays need the same of
//! `M` and `A` computed as products: a row block's exponents are taken relative to the
//! decay just before it, which leaves both factors ≤ 1 for every earlier column. Within
//! the diagonal block of [`SUB`] rows the keys' factors exceed 1 by at most the block's
//! own decay: where that stays below [`FACTORED_SPAN`] the block is part of the product,
//! otherwise it is summed pair by pair.

use super::{GatedShape, Gates, Span, l2_normalise_rows};
use crate::backend::cpu::matmul::matmul;
use crate::base::simd;
use crate::base::{Element, MatMut, MatRef, Tensor};
use rayon::prelude::*;

/// Rows of the diagonal blocks whose per-channel decays are summed pair by pair: 16, as
/// flash-linear-attention's GLA kernels take, keeps that work a quarter of a 64-row
/// chunk's products.
const SUB: usize = 16;

/// Runs q, k, v through `states` (`[batch, heads_v, dim_k, dim_v]`: the initial states,
/// left as the final ones) in chunks of `chunk` tokens and writes `o_t = scale · S_tᵀ q_t`
/// to `out` (`[batch, len, heads_v, dim_v]`).
pub(crate) fn chunked<T: Element>(
    shape: &GatedShape,
    [q, k, v]: [&Tensor<T>; 3],
    gates: &Gates<'_, T>,
    scale: T,
    chunk: usize,
    states: &mut [T],
    out: &mut Tensor<T>,
) {
    let out_heads = out.heads_mut();
    states
        .par_chunks_mut(shape.state_len())
        .enumerate()
        .for_each(|(unit, state)| {
            let Span { b, hv, first, len } = gates.span(shape, unit);
            let mut scratch = Scratch::new(shape, gates, chunk.min(len));
            let end = first + len;
            for start in (first..end).step_by(chunk) {
                let len = chunk.min(end - start);
                // SAFETY: the rows of value head hv in sequence b belong to this unit alone.
                let rows = unsafe { out_heads.block(b, hv, start, len) };
                scratch.chunk(
                    shape,
                    [q, k, v],
                    gates,
                    b,
                    hv,
                    start,
                    len,
                    state,
                    scale,
                    rows,
                );
            }
        });
}

/// One unit's buffers for a chunk of up to `rows` tokens.
struct Scratch<T> {
    q: Vec<T>,
    k: Vec<T>,
    /// The values the state absorbs (`X`).
    x: Vec<T>,
    /// `G`, `rows × width`.
    log_decay: Vec<T>,
    width: usize,
    /// Rows of q or k times decay factors.
    decayed: Vec<T>,
    /// Earlier rows of k times decay factors (per-channel products).
    decayed_keys: Vec<T>,
    /// `M`, then `A`: `rows × rows`.
    scores: Vec<T>,
    /// `e^{G_t}`, `rows × width`: what q (and for the delta rule k) rows are scaled by.
    from_start: Vec<T>,
    /// `G` before the chunk's first token: zeros, one per key channel.
    zero_row: Vec<T>,
    /// β of the chunk's tokens.
    betas: Vec<T>,
}

impl<T: Element> Scratch<T> {
    fn new(shape: &GatedShape, gates: &Gates<'_, T>, rows: usize) -> Self {
        let (dim_k, dim_v) = (shape.dim_k, shape.dim_v);
        let width = gates.width(shape);
        Self {
            q: vec![T::zero(); rows * dim_k],
            k: vec![T::zero(); rows * dim_k],
            x: vec![T::zero(); rows * dim_v],
            log_decay: vec![T::zero(); rows * width],
            width,
            decayed: vec![T::zero(); rows * dim_k],
            decayed_keys: vec![T::zero(); rows * dim_k],
            scores: vec![T::zero(); rows * rows],
            from_start: vec![T::zero(); rows * width],
            zero_row: vec![T::zero(); dim_k],
            betas: vec![T::zero(); rows],
        }
    }

    /// Tokens `start..start + len` of unit (b, hv): their outputs into `rows`, the state
    /// carried past them.
    #[allow(clippy::too_many_arguments)]
    fn chunk(
        &mut self,
        shape: &GatedShape,
        [q, k, v]: [&Tensor<T>; 3],
        gates: &Gates<'_, T>,
        b: usize,
        hv: usize,
        start: usize,
        len: usize,
        state: &mut [T],
        scale: T,
        mut rows: MatMut<'_, T>,
    ) {
        let (dim_k, dim_v, width) = (shape.dim_k, shape.dim_v, self.width);
        let h = shape.qk_head(hv);
        let tokens = start..start + len;
        q.copy_rows(b, tokens.clone(), h..h + 1, &mut self.q);
        k.copy_rows(b, tokens.clone(), h..h + 1, &mut self.k);
        if gates.l2norm_qk {
            l2_normalise_rows(&mut self.q[..len * dim_k], dim_k);
            l2_normalise_rows(&mut self.k[..len * dim_k], dim_k);
        }
        v.copy_rows(b, tokens, hv..hv + 1, &mut self.x);
        let log_decay = &mut self.log_decay[..len * width];
        gates.log_decays(shape, b, hv, start, log_decay);
        for t in 1..len {
            let (before, row) = log_decay.split_at_mut(t * width);
            simd::add_scaled(&mut row[..width], &before[(t - 1) * width..], T::one());
        }
        let from_start = &mut self.from_start[..len * width];
        from_start.copy_from_slice(log_decay);
        simd::exp_in_place(from_start);

        if gates.beta.is_some() {
            // X = Diag(β) (V − (K ⊙ e^G) S), then (I + A) X = that.
            self.decay_rows(Operand::Keys, len, dim_k, Towards::Start);
            matmul(
                MatMut::contiguous(&mut self.x, len, dim_v),
                MatRef::contiguous(&self.decayed, len, dim_k),
                MatRef::contiguous(state, dim_k, dim_v),
                true,
                -T::one(),
            );
            for (t, beta) in self.betas[..len].iter_mut().enumerate() {
                *beta = gates.beta(shape, b, hv, start + t).unwrap_or(T::one());
            }
            for (row, &beta) in self.x.chunks_exact_mut(dim_v).zip(&self.betas) {
                simd::scale(row, beta);
            }
            self.scores_into(Operand::Keys, len, dim_k, true);
            for (i, &beta) in self.betas[..len].iter().enumerate() {
                let (solved, rest) = self.x.split_at_mut(i * dim_v);
                let row = &mut rest[..dim_v];
                for (j, x_j) in solved.chunks_exact(dim_v).enumerate() {
                    simd::add_scaled(row, x_j, -beta * self.scores[i * len + j]);
                }
            }
        }

        // O = s ((Q ⊙ e^G) S + M X).
        self.decay_rows(Operand::Queries, len, dim_k, Towards::Start);
        matmul(
            rows.rb(),
            MatRef::contiguous(&self.decayed, len, dim_k),
            MatRef::contiguous(state, dim_k, dim_v),
            false,
            scale,
        );
        self.scores_into(Operand::Queries, len, dim_k, false);
        matmul(
            rows.rb(),
            MatRef::contiguous(&self.scores, len, len),
            MatRef::contiguous(&self.x, len, dim_v),
            true,
            scale,
        );

        // S ← e^{G_last} ⊙ S + (K ⊙ e^{G_last − G})ᵀ X.
        if width > 0 {
            let last = &self.log_decay[(len - 1) * width..len * width];
            super::recurrent::decay(state, dim_v, last);
        }
        self.decay_rows(Operand::Keys, len, dim_k, Towards::Last);
        matmul(
            MatMut::contiguous(state, dim_k, dim_v),
            MatRef::contiguous(&self.decayed, len, dim_k).t(),
            MatRef::contiguous(&self.x, len, dim_v),
            true,
            T::one(),
        );
    }

    /// `decayed` = the first `len` rows of q or k, row t scaled by `e^{G_t}`
    /// ([`Towards::Start`], computed once per chunk) or `e^{G_last − G_t}`
    /// ([`Towards::Last`]), per channel for a channel gate; a copy without decay.
    fn decay_rows(&mut self, operand: Operand, len: usize, dim_k: usize, towards: Towards) {
        let source = match operand {
            Operand::Queries => &self.q,
            Operand::Keys => &self.k,
        };
        let decayed = &mut self.decayed[..len * dim_k];
        decayed.copy_from_slice(&source[..len * dim_k]);
        let width = self.width;
        if width == 0 {
            return;
        }
        let g = &self.log_decay[..len * width];
        let last = &g[(len - 1) * width..];
        let rows = decayed.chunks_exact_mut(dim_k);
        match towards {
            Towards::Start => {
                for (row, factors) in rows.zip(self.from_start.chunks_exact(width)) {
                    match factors {
                        [factor] => simd::scale(row, *factor),
                        _ => simd::mul_assign(row, factors),
                    }
                }
            }
            Towards::Last => {
                for (row, g_t) in rows.zip(g.chunks_exact(width)) {
                    match (last, g_t) {
                        ([last], [g_t]) => simd::scale(row, (*last - *g_t).exp()),
                        _ => simd::scale_by_exp_difference(row, last, g_t),
                    }
                }
            }
        }
    }

    /// `scores` (`len × len`) = `Σ_c a_ic k_jc e^{G_ic − G_jc}` for j ≤ i (j < i when
    /// `strict`), 0 above; `a` is q or k.
    fn scores_into(&mut self, rows_of: Operand, len: usize, dim_k: usize, strict: bool) {
        let width = self.width;
        let scores = &mut self.scores[..len * len];
        let a = match rows_of {
            Operand::Queries => &self.q[..len * dim_k],
            Operand::Keys => &self.k[..len * dim_k],
        };
        let keys = &self.k[..len * dim_k];
        let visible = |i: usize, j: usize| if strict { j < i } else { j <= i };
        let g = &self.log_decay;
        if width <= 1 {
            matmul(
                MatMut::contiguous(scores, len, len),
                MatRef::contiguous(a, len, dim_k),
                MatRef::contiguous(keys, len, dim_k).t(),
                false,
                T::one(),
            );
            for (i, row) in scores.chunks_exact_mut(len).enumerate() {
                let seen = if strict { i } else { i + 1 };
                row[seen..].fill(T::zero());
                if width == 1 {
                    // e^{G_i − G_j} for the keys row i sees.
                    simd::scale_by_exp_from(&mut row[..seen], g[i], &g[..seen]);
                }
            }
            return;
        }
        scores.fill(T::zero());
        for block in (0..len).step_by(SUB) {
            let end = (block + SUB).min(len);
            // Exponents against R, G just before the block (0 before the chunk): G_i − R ≤ 0
            // for the block's rows, R − G_j ≤ 0 for every earlier key, and R − G_j at most
            // the block's own decay for its keys.
            let reference = if block > 0 {
                &g[(block - 1) * dim_k..block * dim_k]
            } else {
                &self.zero_row
            };
            let last = &g[(end - 1) * dim_k..end * dim_k];
            let span = reference
                .iter()
                .zip(last)
                .fold(T::zero(), |m, (&r, &l)| m.max(r - l));
            // A block whose keys' factors stay small is one product, its diagonal included;
            // a strongly decaying one sums its diagonal pair by pair.
            let factored = span <= T::of_f64(FACTORED_SPAN);
            let keys_to = if factored { end } else { block };
            let rows = &mut self.decayed[..(end - block) * dim_k];
            rows.copy_from_slice(&a[block * dim_k..end * dim_k]);
            for (i, row) in rows.chunks_exact_mut(dim_k).enumerate() {
                let g_t = &g[(block + i) * dim_k..][..dim_k];
                simd::scale_by_exp_difference(row, g_t, reference);
            }
            let earlier = &mut self.decayed_keys[..keys_to * dim_k];
            earlier.copy_from_slice(&keys[..keys_to * dim_k]);
            for (j, row) in earlier.chunks_exact_mut(dim_k).enumerate() {
                simd::scale_by_exp_difference(row, reference, &g[j * dim_k..][..dim_k]);
            }
            matmul(
                MatMut::strided(&mut scores[block * len..], end - block, keys_to, len),
                MatRef::contiguous(rows, end - block, dim_k),
                MatRef::contiguous(earlier, keys_to, dim_k).t(),
                false,
                T::one(),
            );
            for i in block..end {
                let row = &mut scores[i * len..(i + 1) * len];
                if factored {
                    let seen = if strict { i } else { i + 1 };
                    row[seen..end].fill(T::zero());
                    continue;
                }
                for j in (block..=i).filter(|&j| visible(i, j)) {
                    let (a_i, k_j) = (&a[i * dim_k..][..dim_k], &keys[j * dim_k..][..dim_k]);
                    let (g_i, g_j) = (&g[i * dim_k..][..dim_k], &g[j * dim_k..][..dim_k]);
                    row[j] = simd::decayed_dot(a_i, k_j, g_i, g_j);
                }
            }
        }
    }
}

/// Where [`Scratch::decay_rows`] carries each row's decay: from the chunk's start to the
/// row, or from the row to the chunk's last token.
#[derive(Clone, Copy)]
enum Towards {
    Start,
    Last,
}

/// The largest decay within a block (in log space, over any channel) for which its keys'
/// factors `e^{R − G_j}`, at most `e^20 ≈ 5·10⁸`, are taken in one product: far from f32's
/// range, and each factor rounded once.
const FACTORED_SPAN: f64 = 20.0;

/// Which rows a product reads.
#[derive(Clone, Copy)]
enum Operand {
    Queries,
    Keys,
}
